"""What identifies, taken out of a message: a DICOM file's text values (every job: a message never quotes one), and
the input's path and folders in any spelling (a pseudonymised job's last line, after safe_errors.py's rules)."""

from __future__ import annotations

import json
import posixpath
import unicodedata
from typing import TYPE_CHECKING
from urllib.parse import quote, quote_plus

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# Text value representations: what a person's name, an ID, a date or free text can hide in.
_TEXT_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "UC", "DA", "DT", "TM", "AS", "AE", "UR", "CS", "UI"}


def redact_dicom_values(text: str, ds: Dataset | None) -> str:
    """`text` with every text value of the data set (two characters or more) replaced by `[value]`."""
    if ds is None:
        return text
    from pydicom.multival import MultiValue

    values: set[str] = set()
    for element in ds.iterall():
        if element.VR in _TEXT_VRS and element.value not in (None, ""):
            items = element.value if isinstance(element.value, MultiValue) else [element.value]
            values.update(s for v in items if len(s := str(v).strip()) >= 2)
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, "[value]")
    return text


def redact_input_path(message: str, uri: str) -> str:
    """The message without the input's path, nor any folder above it (a folder may be named after a patient),
    in any spelling a library may give them (`spellings`)."""
    for form, placeholder in _path_forms(uri):
        message = message.replace(form, placeholder)
    return message


def _path_forms(uri: str) -> list[tuple[str, str]]:
    """How a message may quote the input (the URI, bucket/key, key or local path) and its folders, each in every
    spelling, longest first."""
    scheme, found, rest = uri.partition("://")
    bare = rest if found and scheme != "file" else uri
    forms = {uri: "<input>", bare: "<input>"}
    paths = [bare]
    if found and scheme != "file":
        key = bare.partition("/")[2]
        forms.setdefault(key, "<input>")
        paths.append(key)
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
