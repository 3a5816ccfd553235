"""Keyed pseudonymisation (`privacy.pseudonymize`): input URIs and DICOM instance UIDs become HMAC-SHA256 tokens.

A token is `hmac:` + the hex HMAC-SHA256 of the value's UTF-8 bytes under the job's key, so the same value under the
same key is always the same token: joins across runs, incremental runs and resume keep working. Whoever holds the
key (or the mapping file) can re-identify, so this is pseudonymisation, not anonymisation. The key comes from an
environment variable or a secret file, never the spec, and no message, record or log ever shows it.

On the driver, `RowPseudonymizer` replaces the columns before a row is staged. The stages of such a job build their
error messages from known-safe parts only (job/safe_errors.py: no library text, which may spell the path in any
way); as a last line, the sink also removes every spelling of the input's path and folders from them. `PseudonymMap` writes token -> uri pairs only where `privacy.mapping_uri` says, each ahead of the staged
chunk holding its rows, so a resumed run's mapping is complete. The listing tokenises what it lists
(`history.DoneFilter`), because the output holds no raw URI to compare against.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import posixpath
import unicodedata
from pathlib import Path
from urllib.parse import quote, quote_plus

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.storage import Storage, is_s3, join, split_s3
from pipeline.job.config import PrivacyConfig
from pipeline.job.errors import UserError

TOKEN_PREFIX = "hmac:"
MIN_KEY_BYTES = 32
KEY_HINT = f"at least {MIN_KEY_BYTES} bytes, e.g. from `openssl rand -hex 32`"
# DICOM UIDs whose values tie a row to a patient's study; class and syntax UIDs are the standard's own constants.
KEY_UID_COLUMNS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid")


class Pseudonymizer:
    """The keyed token function. Picklable (the listing task tokenises what it lists); its repr hides the key."""

    def __init__(self, key: bytes):
        self._key = key

    def __repr__(self) -> str:
        return f"Pseudonymizer(key id {self.key_id})"

    def token(self, value: str) -> str:
        return TOKEN_PREFIX + hmac.new(self._key, value.encode("utf-8"), hashlib.sha256).hexdigest()

    @property
    def key_id(self) -> str:
        """Names the key in records (a changed key is refused, not mixed in) without revealing anything of it."""
        return hmac.new(self._key, b"pipeline pseudonym key id", hashlib.sha256).hexdigest()[:16]


def load_pseudonymizer(cfg: PrivacyConfig) -> Pseudonymizer | None:
    """The job's Pseudonymizer (None when off), its key checked; a missing or weak key is one UserError line."""
    if not cfg.pseudonymize:
        return None
    key = _key_from_env(cfg.key_env) if cfg.key_env else _key_from_file(cfg.key_file)
    return Pseudonymizer(key)


def _key_from_env(name: str) -> bytes:
    value = os.environ.get(name)
    if value is None:
        raise UserError(f"privacy.key_env: environment variable {name} is not set; export the pseudonymisation "
                        f"key in it ({KEY_HINT})")
    return _checked(value.strip().encode("utf-8"), "privacy.key_env", f"environment variable {name}")


def _key_from_file(path: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()  # a secret on the driver's machine (a mounted secret), not data
    except OSError as exc:
        raise UserError(f"privacy.key_file: cannot read {path} ({exc.strerror}); check the path and that this user "
                        "may read it") from None
    return _checked(data.strip(), "privacy.key_file", f"file {path}")


def _checked(key: bytes, field: str, where: str) -> bytes:
    if not key:
        raise UserError(f"{field}: {where} is empty; put the pseudonymisation key in it ({KEY_HINT})")
    if len(key) < MIN_KEY_BYTES:
        raise UserError(f"{field}: the key in {where} is too short ({len(key)} bytes); use {KEY_HINT}")
    return key


def pseudonymized_columns(schema: pa.Schema, uid_tag_columns: list[str]) -> list[str]:
    """What a job's rows carry as tokens: the uri, the DICOM instance UIDs and allow-listed UID tags."""
    wanted = ("uri", *KEY_UID_COLUMNS, *uid_tag_columns)
    return [name for name in wanted if name in schema.names]


class RowPseudonymizer:
    """Driver stage between the drained batches and the sink: tokens for the columns, raw paths out of messages."""

    def __init__(self, pseudonymizer: Pseudonymizer, columns: list[str], mapping: "PseudonymMap | None" = None):
        self.pseudonymizer = pseudonymizer
        self.columns = columns
        self.mapping = mapping

    def __call__(self, batch: pa.Table) -> pa.Table:
        uris = batch["uri"].to_pylist()
        tokens = {uri: self.pseudonymizer.token(uri) for uri in uris}
        if self.mapping is not None:
            self.mapping.add(tokens)
        if "error" in batch.column_names:
            errors = [None if e is None else scrub(e, uri) for e, uri in zip(batch["error"].to_pylist(), uris)]
            batch = _replace(batch, "error", pa.array(errors, pa.string()))
        for name in self.columns:
            if name in batch.column_names:
                batch = _replace(batch, name, self._tokens(batch[name], tokens if name == "uri" else {}))
        return batch

    def _tokens(self, column: pa.ChunkedArray, known: dict[str, str]) -> pa.Array:
        # A UID column of a batch without DICOM rows arrives as nulls or NaN: those stay null.
        values = column.to_pylist()
        return pa.array([(known.get(v) or self.pseudonymizer.token(v)) if isinstance(v, str) and v else None
                         for v in values], pa.string())


def _replace(batch: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return batch.set_column(batch.column_names.index(name), name, values)


def scrub(message: str, uri: str) -> str:
    """The message without the input's path, nor any folder above it (a folder may be named after a patient),
    in any spelling a library may give them (`spellings`)."""
    for form, placeholder in _path_forms(uri):
        message = message.replace(form, placeholder)
    return message


def _path_forms(uri: str) -> list[tuple[str, str]]:
    """How a message may quote the input (the URI, bucket/key, key or local path) and its folders, each in every
    spelling, longest first."""
    bare = uri.removeprefix("s3://")
    forms = {uri: "<input>", bare: "<input>"}
    paths = [bare]
    if is_s3(uri):
        forms.setdefault(split_s3(uri)[1], "<input>")
        paths.append(split_s3(uri)[1])
    for path in paths:
        folder = posixpath.dirname(path)
        while folder.count("/") >= 1 and len(folder) > 1:  # the bucket or root alone names no one
            forms.setdefault(folder, "<input folder>")
            folder = posixpath.dirname(folder)
    spelled = {spelling: placeholder for form, placeholder in forms.items() for spelling in spellings(form)}
    return sorted(((f, p) for f, p in spelled.items() if f), key=lambda fp: -len(fp[0]))


def spellings(text: str) -> set[str]:
    """`text` as libraries write it: composed or decomposed, percent- or plus-encoded, escaped as repr, ascii(),
    unicode_escape, JSON and a bytes repr do, or UTF-8 read as Latin-1."""
    found = set()
    for form in {text, unicodedata.normalize("NFC", text), unicodedata.normalize("NFD", text)}:
        found |= {form, quote(form, safe="/"), quote(form, safe=""), quote_plus(form), repr(form)[1:-1],
                  ascii(form)[1:-1], form.encode("unicode_escape").decode("ascii"), json.dumps(form)[1:-1],
                  repr(form.encode("utf-8"))[2:-1], form.encode("utf-8").decode("latin-1")}
    return found


class PseudonymMap:
    """token -> uri pairs, written as Parquet under `privacy.mapping_uri`: one file per staged chunk of a run,
    written before that chunk, so every durable row can be re-identified, also after a resume."""

    SCHEMA = pa.schema([pa.field("token", pa.string(), nullable=False), pa.field("uri", pa.string(), nullable=False)])

    def __init__(self, storage: Storage, uri: str, run_id: str):
        self.storage = storage
        self.uri = uri
        self.run_id = run_id
        self._pending: dict[str, str] = {}  # token -> uri

    def add(self, tokens: dict[str, str]) -> None:
        self._pending.update((token, uri) for uri, token in tokens.items())

    def flush(self, chunk: int) -> None:
        """Called by the sink before it writes staged chunk number `chunk`."""
        if not self._pending:
            return
        table = pa.table({"token": list(self._pending), "uri": list(self._pending.values())}, schema=self.SCHEMA)
        table = table.sort_by("token")
        self.storage.write_atomic(self.file_uri(chunk), lambda f: pq.write_table(table, f, compression="zstd"))
        self._pending = {}

    def file_uri(self, chunk: int) -> str:
        return join(self.uri, f"pseudonyms-{self.run_id}-{chunk:09d}.parquet")
