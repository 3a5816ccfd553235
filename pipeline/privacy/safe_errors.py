"""Error text a pseudonymised job may write: built from what is known safe, never from a library's free text.

A library's message may quote the input in any spelling: botocore's endpoint URL percent-encodes the key, a
repr escapes it, a decoder may name the file. So with `privacy.pseudonymize` a row's error is made only of the
stage and our own words, the exception's class name, and facts read from its fields, never from its text: an
errno (its symbol and the C library's words for it), an S3 error code and HTTP status, and counts of our own.
Everywhere else the library's text is kept: it says most about what went wrong.
"""

from __future__ import annotations

import errno
import os
import re

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_S3_CODE = re.compile(r"[A-Za-z][A-Za-z0-9.]{0,63}")  # S3's error codes are words: SlowDown, NoSuchKey, AccessDenied
# What well-known transport failures mean, in our words (matched by class name: no import of their libraries).
_MEANINGS = {
    "EndpointConnectionError": "could not connect to the storage endpoint",
    "ConnectTimeoutError": "connecting to the storage endpoint timed out",
    "ReadTimeoutError": "no answer within storage.read_timeout_s",
    "ConnectionClosedError": "the connection closed before an answer came",
    "ClientPayloadError": "the object's body was cut short",
}
_MAX_CHAIN = 6  # an exception, what it was raised from, and so on


def exception_text(exc: BaseException, safe: bool = False, ours: tuple[str, ...] = ()) -> str:
    """`Type: message` as the library wrote it; `safe`: `Type (fact; fact)` from known-safe parts only, with
    facts of `ours` (a count we made) last."""
    if not safe:
        text = str(exc)
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    facts = safe_facts(exc) + list(ours)
    return f"{class_name(exc)} ({'; '.join(facts)})" if facts else class_name(exc)


def class_name(exc: BaseException) -> str:
    name = type(exc).__name__
    return name if _IDENTIFIER.fullmatch(name) else "Exception"


def safe_facts(exc: BaseException) -> list[str]:
    """What the exception and those it was raised from say in their fields: our words for well-known failures,
    S3's error code and HTTP status, else the errno (S3's answer says more than the errno s3fs maps it to)."""
    chain = _chain(exc)
    s3 = [fact for link in chain if (fact := _s3_error(link))]
    found = [_MEANINGS.get(type(link).__name__) for link in chain] + (s3 or [_errno(link) for link in chain])
    return list(dict.fromkeys(fact for fact in found if fact))


def _chain(exc: BaseException | None) -> list[BaseException]:
    links: list[BaseException] = []
    while exc is not None and len(links) < _MAX_CHAIN and all(exc is not link for link in links):
        links.append(exc)
        exc = exc.__cause__ or exc.__context__
    return links


def _s3_error(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = (response.get("Error") or {}).get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    parts = [f"S3 {code}" if isinstance(code, str) and _S3_CODE.fullmatch(code) else None,
             f"HTTP {status}" if isinstance(status, int) and 100 <= status <= 599 else None]
    return ", ".join(p for p in parts if p) or None


def _errno(exc: BaseException) -> str | None:
    number = getattr(exc, "errno", None)
    if not isinstance(number, int) or number not in errno.errorcode:
        return None
    return f"{errno.errorcode[number]}, {os.strerror(number).lower()}"
