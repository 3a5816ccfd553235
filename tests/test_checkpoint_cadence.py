"""`output.checkpoint_rows` (default 8 model batches) is how often progress becomes durable, as the README says:
run through `pipeline run` as a user runs it, over small images that Ray hands to the model actor in one block
(where every row used to reach the driver, and so its staging, only at the end)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import encode, photo
from counting_model import images_seen

pytestmark = pytest.mark.kill  # the driver is SIGKILLed mid-job
TESTS = Path(__file__).parent
INPUTS, BATCH = 160, 4  # 40 model batches, a checkpoint every 8: 5 chunks of 32 rows


def test_a_run_stages_a_chunk_every_eight_model_batches_as_it_goes(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    for i in range(INPUTS):  # thumbnails: all of them fit in one of Ray's 1 MiB blocks
        (images / f"{i:04d}.png").write_bytes(encode(photo(32, 24, seed=i), "PNG"))
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({"output": {"checkpoint_seconds": 3600},
                                "model": {"name": "counting_model:build",
                                          "preprocess": {"resize_size": 32, "crop_size": 32}},
                                "compute": {"min_actors": 1, "max_actors": 1}}))
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "PIPELINE_TEST_CALLS": str(calls), "PIPELINE_TEST_DELAY_S": "0.1",
           "PIPELINE_FAILPOINTS": "chunk_written:2"}  # the driver is killed right after its second checkpoint
    killed = subprocess.run([sys.executable, "-m", "pipeline", "run", str(spec), "--input", str(images),
                             "--output", str(tmp_path / "out"), "--batch-size", str(BATCH)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stdout + killed.stderr

    chunks = sorted((tmp_path / "out" / "_staging").glob("*/chunk-*"))
    assert [pq.read_metadata(c).num_rows for c in chunks] == [8 * BATCH, 8 * BATCH]
    # Durable as it went: two checkpoints were in while most of the model's batches were still to come.
    assert images_seen(calls) < INPUTS * 3 // 4, images_seen(calls)
