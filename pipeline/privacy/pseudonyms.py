"""Keyed pseudonymisation (`privacy.pseudonymize`): input URIs and DICOM instance UIDs become HMAC-SHA256 tokens,
`hmac:` + the hex HMAC-SHA256 of the value's UTF-8 bytes under the job's key (the same value, the same token).
On the driver `RowPseudonymizer` replaces the columns before a row is staged, and `PseudonymMap` writes token -> uri
pairs ahead of each staged chunk; the listing tokenises what it lists (`history.DoneFilter`). Why, and what a user
sees: README.md#paths-that-name-patients-pseudonymised-output."""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.privacy.identifying import column_name, instance_uid_tags
from pipeline.privacy.redact import redact_input_path

if TYPE_CHECKING:  # objects passed in: privacy comes before the job's config and storage (ARCHITECTURE.md)
    from pipeline.io.storage import Storage
    from pipeline.job.config import PrivacyConfig

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
    """The job's Pseudonymizer (None when off); a missing or weak key is one UserError line (`cfg.read_key`)."""
    return Pseudonymizer(cfg.read_key()) if cfg.pseudonymize else None


def pseudonymized_columns(schema: pa.Schema, uid_tag_columns: list[str]) -> list[str]:
    """What a job's rows carry as tokens: the uri, the content hash (a plain one would let anyone holding a patient's
    file find its row), the DICOM instance UIDs and allow-listed UID tags."""
    wanted = ("uri", "content_hash", *KEY_UID_COLUMNS, *uid_tag_columns)
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
            errors = [None if e is None else redact_input_path(e, uri)
                      for e, uri in zip(batch["error"].to_pylist(), uris)]
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


def row_pseudonymizer(pseudonymizer: Pseudonymizer | None, schema: pa.Schema, dicom_tags: Sequence[str] = (),
                      mapping: PseudonymMap | None = None) -> RowPseudonymizer | None:
    """The driver's stage for a job's rows of `schema` (None when the job is not pseudonymised): `dicom_tags` are
    the job's allow-listed DICOM keywords (`dicom.include_tags`), whose instance UIDs become tokens too."""
    if pseudonymizer is None:
        return None
    uid_tags = [column_name(keyword) for keyword in instance_uid_tags(dicom_tags)]
    return RowPseudonymizer(pseudonymizer, pseudonymized_columns(schema, uid_tags), mapping)


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
        return self.uri.rstrip("/") + f"/pseudonyms-{self.run_id}-{chunk:09d}.parquet"
