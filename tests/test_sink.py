"""Sink: schema, provenance and the nulls that numpy batches turn into NaN."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.storage import Storage
from pipeline.output.sink import StagingSink, to_output_table
from pipeline.output.staging import Staging
from pipeline.job.rows import OUTPUT_SCHEMA

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


RUN = "20261124T000000Z-0000abcd"


def staging_sink(tmp_path, rows: int) -> StagingSink:
    return StagingSink(Staging(Storage(), str(tmp_path)), RUN, PROVENANCE, first_chunk=0, checkpoint_rows=rows, checkpoint_seconds=3600)


def test_chunks_are_cut_by_row_count(tmp_path):
    sink = staging_sink(tmp_path, rows=3)
    for start in range(0, 8, 2):
        sink.add(pa.table({"uri": [f"u{start}", f"u{start + 1}"], "error": [None, None]}))
    sink.flush()
    chunks = sorted((tmp_path / "_staging" / RUN).glob("chunk-*.parquet.staged"))
    assert [pq.read_metadata(c).num_rows for c in chunks] == [4, 4]  # a chunk holds whole batches
    assert [u for c in chunks for u in pq.read_table(c)["uri"].to_pylist()] == [f"u{i}" for i in range(8)]
    assert not list(tmp_path.glob("**/*.parquet"))  # nothing a reader would pick up


def test_batches_with_different_inferred_types_share_one_chunk(tmp_path):
    """One batch's all-null `error` is Arrow null type, another's is string; sizes int or float."""
    sink = staging_sink(tmp_path, rows=100)
    sink.add(pa.table({"uri": ["a"], "error": pa.nulls(1), "size": [1], "topk_scores": [[0.5]]}))
    sink.add(pa.table({"uri": ["b"], "error": ["decode: x"], "size": [np.nan], "topk_scores": pa.nulls(1)}))
    sink.flush()
    table = pq.read_table(next((tmp_path / "_staging" / RUN).glob("chunk-*")))
    assert table.schema == OUTPUT_SCHEMA and table["error"].to_pylist() == [None, "decode: x"]


def test_a_multi_frame_files_rows_stay_in_one_chunk(tmp_path):
    """Ray may hand a file's frame rows over in two batches; a chunk (the unit of resume) never splits them."""
    sink = staging_sink(tmp_path, rows=1)

    def batch(uris, frames, counts):
        return pa.table({"uri": uris, "frame": frames, "rows_of_input": counts, "error": [None] * len(uris)})

    released = sink.add(batch(["a", "a", "b"], [0, 1, 0], [3, 3, 1]))
    assert released["uri"].to_pylist() == ["b"]  # a's third frame has not come yet
    released = sink.add(batch(["c", "a"], [0, 2], [1, 1 + 2]))
    assert sorted(zip(released["uri"].to_pylist(), released["frame"].to_pylist())) == [
        ("a", 0), ("a", 1), ("a", 2), ("c", 0)]
    sink.flush()
    assert sink.release_partial() is None
    chunks = sorted((tmp_path / "_staging" / RUN).glob("chunk-*.parquet.staged"))
    held = [set(pq.read_table(c)["uri"].to_pylist()) for c in chunks]
    assert held == [{"b"}, {"a", "c"}]
    assert sink.rows_written == 5
