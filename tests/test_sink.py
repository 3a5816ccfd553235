"""Sink: schema, provenance and the nulls that numpy batches turn into NaN."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.rows import OUTPUT_SCHEMA
from pipeline.sink import ParquetSink, to_output_table

PROVENANCE = {"model": "resnet18", "weights": "sha256:abc", "run_id": "r1"}


def test_nan_nulls_become_real_nulls():
    """A batch where every row is fine arrives with float NaN for `error` and `error_type`."""
    batch = pa.table({"uri": ["a", "b"], "error": [np.nan, np.nan], "error_type": [np.nan, np.nan],
                      "label": ["cat", "dog"], "score": [0.9, 0.8], "size": [10.0, np.nan]})
    table = to_output_table(batch, PROVENANCE)
    assert table.schema == OUTPUT_SCHEMA
    assert table["error"].to_pylist() == [None, None]
    assert table["size"].to_pylist() == [10, None]
    assert table["model"].to_pylist() == ["resnet18"] * 2


def test_failed_rows_have_no_score():
    batch = pa.table({"uri": ["a"], "error": ["decode: broken"], "score": [np.nan]})
    assert to_output_table(batch, PROVENANCE)["score"].to_pylist() == [None]


def test_files_roll_by_row_count(tmp_path):
    from pipeline.storage import Storage

    sink = ParquetSink(Storage(), str(tmp_path), "r1", PROVENANCE, rows_per_file=3, flush_seconds=3600)
    for start in range(0, 8, 2):
        sink.add(pa.table({"uri": [f"u{start}", f"u{start + 1}"], "error": [None, None]}))
    files = sink.close()
    assert [f["rows"] for f in files] == [3, 3, 2]
    uris = [u for f in files for u in pq.read_table(f["uri"])["uri"].to_pylist()]
    assert uris == [f"u{i}" for i in range(8)]
    assert [f["uri"].rsplit("/", 1)[1] for f in files] == [f"part-r1-{i:05d}.parquet" for i in range(3)]


def test_batches_with_different_inferred_types_share_one_file(tmp_path):
    """One batch's all-null `error` is Arrow null type, another's is string; sizes int or float."""
    from pipeline.storage import Storage

    sink = ParquetSink(Storage(), str(tmp_path), "r1", PROVENANCE, rows_per_file=100, flush_seconds=3600)
    sink.add(pa.table({"uri": ["a"], "error": pa.nulls(1), "size": [1], "topk_scores": [[0.5]]}))
    sink.add(pa.table({"uri": ["b"], "error": ["decode: x"], "size": [np.nan], "topk_scores": pa.nulls(1)}))
    files = sink.close()
    table = pq.read_table(files[0]["uri"])
    assert table.schema == OUTPUT_SCHEMA and table["error"].to_pylist() == [None, "decode: x"]
