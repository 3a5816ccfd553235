"""jobs/backfill_medical.yaml end to end on the test S3 server over pydicom's files and files written here:
every input accounted for once, a row per frame, partitions by modality, the README's query, no patient data
in the Parquet, the records or the logs, and an incremental rerun."""

from __future__ import annotations

import io
import os
import re
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as pads
import pytest
import ray
import torch
import torchvision

from conftest import ensure_bucket
from dicom_files import PHI, SHIPPED, dicom_bytes, shipped
from pipeline.cli.commands import main
from pipeline.decode.dicom import DicomSettings, read_dicom
from pipeline.models.resolve import _fit_stem

ROOT = Path(__file__).resolve().parent.parent
SPEC = str(ROOT / "jobs" / "backfill_medical.yaml")
BUCKET = "medical-archive"  # the job spec's own bucket, so the spec runs unchanged
OUTPUT = f"s3://{BUCKET}/predictions/densenet121-grey-v1/"
LABELS = ["no finding", "opacity", "device"]


def written_files() -> dict[str, bytes]:
    hu = np.array([[-1000, -600, -100, 0], [40, 80, 400, 1200]], dtype=np.int16) + 1024
    frames = np.stack([np.full((16, 16), v, dtype=np.int16) for v in (10, 500, 900)])
    ct = dicom_bytes(np.tile(hu, (8, 8)), slope=1, intercept=-1024, window=(-600, 1500), phi=True)
    return {
        "dicom/patients/ct-chest.dcm": ct,
        "dicom/patients/cr-mono1-3frames.dcm": dicom_bytes(frames, photometric="MONOCHROME1", modality="CR",
                                                            signed=False, phi=True),
        "dicom/patients/truncated.dcm": ct[:-40],
        "dicom/odd keys/scan ü 01.dcm": dicom_bytes(np.tile(hu, (4, 4)), slope=1, intercept=-1024, phi=True),
    }


@pytest.fixture
def archive(storage, tmp_path):
    ensure_bucket(storage, BUCKET)
    files = {f"dicom/pydicom/{name}": shipped(name) for name in sorted(os.listdir(SHIPPED)) if name.endswith(".dcm")}
    files.update(written_files())
    for key, data in files.items():
        storage.write_bytes(f"s3://{BUCKET}/{key}", data)
    storage.write_bytes(f"s3://{BUCKET}/dicom/patients/notes.txt", f"{PHI['PatientName']} called".encode())
    torch.manual_seed(0)
    model = torchvision.models.densenet121(num_classes=len(LABELS))
    _fit_stem(model, 1, None)
    checkpoint = tmp_path / "densenet121-grey.pt"
    torch.save(model.state_dict(), checkpoint)
    storage.write_bytes(f"s3://{BUCKET}/models/densenet121-grey-v1.pt", checkpoint.read_bytes())
    storage.write_bytes(f"s3://{BUCKET}/models/densenet121-grey-v1.labels.txt", ("\n".join(LABELS) + "\n").encode())
    yield {f"s3://{BUCKET}/{key}": data for key, data in files.items()}
    storage.remove_folder(OUTPUT)


def expected_rows(data: bytes) -> int:
    """Frames the file gives (all of them), or 1 for its error row."""
    try:
        return len(read_dicom(data, DicomSettings(), 89_478_485).frames)
    except Exception:  # noqa: BLE001
        return 1


def shipped_identifying_values(archive: dict[str, bytes]) -> set[str]:
    """Names, IDs, institutions and free text that pydicom's own files carry in identifying attributes."""
    from pydicom import dcmread

    from pipeline.privacy.identifying import IDENTIFYING

    values = set()
    for uri, data in archive.items():
        try:
            ds = dcmread(io.BytesIO(data), force=True)
        except Exception:  # noqa: BLE001 - broken on purpose
            continue
        for keyword in IDENTIFYING:
            element = ds.get(keyword)
            if element is not None and ds[keyword].VR in ("PN", "LO", "SH", "LT", "ST", "UT"):
                text = str(element).strip()
                if len(text) >= 6 and re.search(r"[A-Za-z]", text) and text not in uri:
                    values.add(text)
    assert len(values) > 10  # the scan has teeth
    return values


def readme_query() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Backfill medical scans", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.S)[0]


def test_backfill_medical_job(archive, storage, ray_session, tmp_path, monkeypatch, capfd):
    assert main(["run", SPEC]) == 0
    out, err = capfd.readouterr()
    inputs = len(archive)
    assert f"inputs      {inputs}" in out and "1 other files skipped" in out
    assert "DICOM tags  StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, Modality  (no patient-identifying" in out

    table = pads.dataset(OUTPUT, format="parquet", partitioning="hive").to_table()
    rows = table.to_pylist()
    # Every input exactly once: a row per frame of a readable file, one error row otherwise.
    per_uri = Counter(r["uri"] for r in rows)
    assert set(per_uri) == set(archive)
    assert per_uri == {uri: expected_rows(data) for uri, data in archive.items()}
    assert len({(r["uri"], r["frame"]) for r in rows}) == len(rows)
    assert f"rows        {len(rows)}" in out

    by_name = {r["uri"].rsplit("/", 1)[1]: r for r in rows if r["frame"] in (0, None)}
    assert by_name["SC_rgb_jpeg_gdcm.dcm"]["error_type"] == "decode.no_decoder"
    assert by_name["MR_truncated.dcm"]["error_type"] == "decode.truncated"
    assert by_name["truncated.dcm"]["error_type"] == "decode.truncated"
    assert by_name["rtplan.dcm"]["error_type"] == "decode.no_pixel_data"
    for name in ("CT_small.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm",
                 "image_dfl.dcm", "MR_small_bigendian.dcm", "ct-chest.dcm", "scan ü 01.dcm"):
        assert by_name[name]["error"] is None and by_name[name]["label"] in LABELS, name
    mono1 = sorted((r for r in rows if r["uri"].endswith("cr-mono1-3frames.dcm")), key=lambda r: r["frame"])
    assert [r["frame"] for r in mono1] == [0, 1, 2] and {r["modality"] for r in mono1} == {"CR"}
    assert len({r["sop_instance_uid"] for r in mono1}) == 1 and mono1[0]["study_instance_uid"]
    assert per_uri[f"s3://{BUCKET}/dicom/pydicom/examples_ybr_color.dcm"] == 30  # a 30-frame ultrasound clip
    # Same image, different transfer syntaxes: the same prediction.
    mr = {by_name[n]["score"] for n in ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm",
                                        "MR_small_jp2klossless.dcm")}
    assert len(mr) == 1

    # Partitioned by modality, the column in the folder name only.
    keys = [o["Key"] for page in storage.s3_client.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix="predictions/") for o in page.get("Contents", [])]
    parts = [k for k in keys if k.endswith(".parquet")]
    assert {"modality=CT", "modality=MR", "modality=CR", "modality=US"} <= {k.split("/")[-2] for k in parts}

    # No patient data anywhere: the Parquet's values, the records, the summary, our output and Ray's logs.
    local = tmp_path / "analyst"
    prefix = OUTPUT.removeprefix(f"s3://{BUCKET}/")
    for key in keys:  # as `aws s3 sync <output> scans/` leaves it
        target = local / "scans" / key.removeprefix(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(f"s3://{BUCKET}/{key}"))
    written = " ".join(str(v) for r in rows for v in r.values())
    written += " ".join(p.read_text() for p in local.rglob("*.json"))
    assert (local / "scans" / "_summary.json").exists() and list(local.rglob("_commits/*.json"))
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    ray_logs = " ".join(p.read_text(errors="ignore") for p in logs.glob("*") if p.is_file())
    for value in set(PHI.values()) | shipped_identifying_values(archive):
        # As a word: a name such as "operator" also spells Ray's module actor_pool_map_operator in its logs.
        as_word = re.compile(rf"(?<!\w){re.escape(value)}(?!\w)")
        for where, text in (("rows", written), ("stdout", out), ("stderr", err), ("Ray logs", ray_logs)):
            assert not as_word.search(text), f"{value!r} found in {where}"

    # The README's query, as written, on the analyst's copy.
    monkeypatch.chdir(local)
    counted = duckdb.sql(readme_query()).fetchall()
    expected = Counter((r["modality"], r["label"]) for r in rows if r["error"] is None)
    assert {(m, label): n for m, label, n, *_ in counted} == dict(expected)

    # The next night: one new file; only it is read.
    storage.write_bytes(f"s3://{BUCKET}/dicom/patients/new.dcm", dicom_bytes(np.eye(32) * 900, window=(400, 800)))
    assert main(["run", SPEC]) == 0
    out, _ = capfd.readouterr()
    assert "inputs      1" in out and f"unchanged   {inputs}" in out


def test_killed_dicom_backfill_resumes_with_every_frame_once(tmp_path, storage, bucket):
    """SIGKILL after the first durable chunk, then rerun: each file's frames exactly once, none redone."""
    import json
    import signal
    import subprocess
    import sys

    from counting_model import images_seen
    from test_crash import env_for, wait_until_quiet

    for i in range(20):
        # Large enough (~400 KB a multi-frame file) that the files reach the model, and their rows the driver,
        # over many blocks, so the kill falls mid-run.
        rng = np.random.default_rng(i)
        frames = rng.integers(0, 4000, (5 if i % 2 else 1, 200, 200))
        storage.write_bytes(f"s3://{bucket}/scans/s{i:02d}.dcm", dicom_bytes(frames, modality="MR" if i % 3 else "CT"))
    total_rows = 10 * 5 + 10
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({
        "input": {"uri": f"s3://{bucket}/scans/"},
        "output": {"uri": f"s3://{bucket}/out/", "checkpoint_rows": 8, "partitioning": "modality"},
        "model": {"name": "counting_model:build", "preprocess": {"resize_size": 32, "crop_size": 32}},
        "compute": {"batch_size": 4}, "dicom": {"window": "minmax"}}))
    calls = tmp_path / "calls.txt"
    command = [sys.executable, "-m", "pipeline", "run", str(spec)]
    killed = subprocess.run(command, env=env_for(calls, "chunk_written:1"), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    wait_until_quiet(calls)  # the killed driver's actors can finish a batch before Ray reaps them
    fs, path = storage.fs(f"s3://{bucket}/out/")
    fs.invalidate_cache()
    import pyarrow.parquet as pq

    staged = [pq.read_table(fs.open(c, "rb")) for c in fs.find(path) if c.endswith(".parquet.staged")]
    durable = sum(t.num_rows for t in staged)
    for table in staged:  # a chunk holds whole files
        for uri, n in Counter(table["uri"].to_pylist()).items():
            assert n == (5 if int(uri[-6:-4]) % 2 else 1), uri
    assert 0 < durable <= total_rows  # mid-run as a rule; on a busy machine the first chunk may hold it all
    calls.unlink(missing_ok=True)

    rerun = subprocess.run(command, env=env_for(calls), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    fs.invalidate_cache()
    rows = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table().to_pylist()
    assert len(rows) == total_rows and len({(r["uri"], r["frame"]) for r in rows}) == total_rows
    assert {r["modality"] for r in rows} == {"CT", "MR"}
    assert images_seen(calls) == total_rows - durable  # frames made durable are not redone
