"""privacy.pseudonymize end to end through the CLI: a PACS export whose folders name the patient, written with keyed
HMAC-SHA256 tokens for the uri and the DICOM UIDs; nothing identifying in the rows, records, summary or output; the
mapping re-identifies; incremental runs and a killed run's resume still skip what is done; key problems are one line.

Runs are in this process on the session's Ray, with one model actor; only the run that is SIGKILLed has a process of
its own (it joins the session's Ray)."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
from pydicom import dcmread
from torch import nn

import counting_model
from dicom_files import PHI, dicom_bytes
from pipeline.cli.commands import main
from pipeline.decode.hashes import content_hash
from pipeline.privacy.pseudonyms import Pseudonymizer, RowPseudonymizer, row_pseudonymizer

KEY = "test-only-pseudonym-key-3f9c1e7a5b2d4c6e8a0b"
KEY_ENV = "PIPELINE_PSEUDONYM_KEY"
PATIENT_FOLDER = "DOE^JOHN/12345678"  # name and MRN, as PACS exports lay out folders
TRUNCATED = "1.2.840.99.7.dcm"


def token(value: str) -> str:
    """The documented token, computed here without the pipeline."""
    return "hmac:" + hmac.new(KEY.encode(), value.encode(), hashlib.sha256).hexdigest()


def pacs_export(write, root: str) -> dict[str, bytes]:
    """Scans under <root>/DOE^JOHN/12345678/<modality>/<SOP instance UID>.dcm, one of them truncated."""
    rng = np.random.default_rng(0)
    scans = [dicom_bytes(rng.integers(0, 3000, (24, 24)), phi=True, FrameOfReferenceUID=f"1.2.826.0.1.99.{i}",
                         BodyPartExamined="CHEST") for i in range(3)]
    scans.append(dicom_bytes(rng.integers(0, 3000, (3, 24, 24)), modality="MR", phi=True))
    files = {}
    for data in scans:
        ds = dcmread(io.BytesIO(data))
        files[f"{root}/{PATIENT_FOLDER}/{ds.Modality}/{ds.SOPInstanceUID}.dcm"] = data
    files[f"{root}/{PATIENT_FOLDER}/CT/{TRUNCATED}"] = scans[0][:-60]  # an error row
    for uri, data in files.items():
        write(uri, data)
    return files


def job_spec(path: Path, input_uri: str, output_uri: str, mapping_uri: str | None, model: str = "counting_model:build",
             **output) -> str:
    privacy = {"pseudonymize": True, "key_env": KEY_ENV}
    if mapping_uri:
        privacy["mapping_uri"] = mapping_uri
    path.write_text(json.dumps({
        "input": {"uri": input_uri},
        "output": {"uri": output_uri, "partitioning": "modality", **output},
        "model": {"name": model, "preprocess": {"resize_size": 32, "crop_size": 32}},
        "compute": {"batch_size": 4, "min_actors": 1, "max_actors": 1},
        "dicom": {"window": "minmax", "include_tags": ["FrameOfReferenceUID", "BodyPartExamined"]},
        "privacy": privacy}))
    return str(path)


def identifying_strings(files: dict[str, bytes]) -> set[str]:
    """Everything that must not be written: raw paths, the folder names, the UIDs, the patient data, the key."""
    found = {KEY, "DOE^JOHN", "12345678", *PHI.values()}
    for uri, data in files.items():
        found |= {uri, uri.removeprefix("s3://"), uri.rsplit("/", 1)[1]}
        try:
            ds = dcmread(io.BytesIO(data))
        except Exception:  # noqa: BLE001 - the truncated file
            continue
        found |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
        if "FrameOfReferenceUID" in ds:
            found.add(ds.FrameOfReferenceUID)
    return found


def assert_nowhere(secrets: set[str], **texts: str) -> None:
    for secret in secrets:
        for where, text in texts.items():
            assert secret not in text, f"{secret!r} found in {where}"


def test_pseudonymised_dicom_folder_named_after_the_patient(tmp_path, ray_session, monkeypatch, capfd):
    monkeypatch.setenv(KEY_ENV, KEY)
    files = pacs_export(lambda uri, data: (Path(uri).parent.mkdir(parents=True, exist_ok=True),
                                           Path(uri).write_bytes(data)), str(tmp_path / "pacs"))
    output, mapping = tmp_path / "predictions", tmp_path / "secure" / "pseudonyms"
    spec = job_spec(tmp_path / "job.json", str(tmp_path / "pacs"), str(output), str(mapping))
    assert main(["run", spec]) == 0
    out, err = capfd.readouterr()
    assert "inputs      5" in out and "privacy     uri and DICOM UIDs written as keyed tokens" in out

    rows = pads.dataset(output, format="parquet", partitioning="hive").to_table().to_pylist()
    # The uri is the token of the raw path; the rows of a file are all there (3 CT, 3 MR frames, 1 error row).
    assert Counter(r["uri"] for r in rows) == {token(u): 3 if "/MR/" in u else 1 for u in files}
    for uri, data in files.items():
        mine = [r for r in rows if r["uri"] == token(uri)]
        ds = dcmread(io.BytesIO(data))  # the truncated file's tags read too: only its pixels are short
        for row in mine:
            assert row["error_type"] == ("decode.truncated" if uri.endswith(TRUNCATED) else None)
            assert row["study_instance_uid"] == token(ds.StudyInstanceUID)
            assert row["series_instance_uid"] == token(ds.SeriesInstanceUID)
            assert row["sop_instance_uid"] == token(ds.SOPInstanceUID)
            assert row["frame_of_reference_uid"] == (token(ds.FrameOfReferenceUID) if "/CT/" in uri else None)
            assert row["body_part_examined"] == ("CHEST" if "/CT/" in uri else None)  # not a UID: as is
    # DuckDB reads the same tokens; the partition folders are the modality only.
    duck = duckdb.sql(f"SELECT uri, modality FROM read_parquet('{output}/**/*.parquet', hive_partitioning = true)")
    assert Counter(u for u, _ in duck.fetchall()) == Counter(r["uri"] for r in rows)
    assert {p.parent.name for p in output.rglob("*.parquet")} == {"modality=CT", "modality=MR"}

    # Nothing identifying anywhere: rows, every file of the output (records, summary), stdout, stderr, the mapping's names.
    secrets = identifying_strings(files)
    written = " ".join(str(v) for r in rows for v in r.values())
    folder = " ".join(p.read_text() for p in output.rglob("*.json"))
    names = " ".join(str(p.relative_to(tmp_path)) for p in [*output.rglob("*"), *mapping.rglob("*")])
    assert json.loads((output / "_summary.json").read_text())["pseudonyms"]
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    ray_logs = " ".join(p.read_text(errors="ignore") for p in logs.glob("*") if p.is_file())
    assert_nowhere(secrets, rows=written, records=folder, stdout=out, stderr=err, file_names=names, ray_logs=ray_logs)

    # The mapping re-identifies every row, and only the mapping holds the raw paths.
    pairs = pads.dataset(mapping, format="parquet").to_table()
    assert pairs.column_names == ["token", "uri"]
    assert dict(zip(pairs["token"].to_pylist(), pairs["uri"].to_pylist())) == {token(u): u for u in files}
    assert not list(output.rglob("*pseudonyms*"))

    # Its report and history obey the same rules: tokens only, no thumbnail fetched, nothing identifying.
    page = tmp_path / "report.html"
    assert main(["report", str(output), "-o", str(page)]) == 0
    assert main(["runs", str(output)]) == 0
    out, err = capfd.readouterr()
    html = page.read_text()
    assert "withheld: the output is pseudonymised" in html and 'src="data:image' not in html
    assert "decode.truncated" in html and "hmac:" in html
    assert "not estimated: the output is pseudonymised" in out
    assert_nowhere(secrets, report=html, stdout=out)

    # The next night: nothing new is read, and a run without the key's tokens cannot mix raw paths in.
    assert main(["run", spec]) == 0
    out, err = capfd.readouterr()
    assert "inputs      0" in out and "unchanged   5" in out
    assert_nowhere(secrets, stdout=out, stderr=err)
    raw = json.loads(Path(spec).read_text())
    raw["privacy"] = {}
    Path(spec).write_text(json.dumps(raw))
    assert main(["run", spec]) == 2
    err = capfd.readouterr().err
    assert "output.uri" in err and "holds pseudonymised runs" in err


SEEN = "test-privacy-images-seen"


@ray.remote(num_cpus=0)
class Seen:
    """Images the model actors of this test process's Ray job were given (a named actor of the job)."""

    def __init__(self):
        self.images = 0

    def add(self, images: int) -> None:
        self.images += images

    def get(self) -> int:
        return self.images


class CountedNet(nn.Module):
    """counting_model's net, telling `Seen` of each model call's images: as counting_model's PIPELINE_TEST_CALLS
    file does, but for model actors of a Ray started before the test (they do not see the test's environment)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:  # not the driver's probe
            try:
                seen = ray.get_actor(SEEN)
            except ValueError:  # another Ray job's actor (the killed driver's): not counted
                seen = None
            if seen is not None:
                ray.get(seen.add.remote(x.shape[0]))
        return self.net(x)


def counted_build(num_classes: int | None = None) -> nn.Module:
    return CountedNet(counting_model.build(num_classes))


def test_killed_pseudonymised_run_resumes_without_redoing_or_losing_the_mapping(tmp_path, ray_session, storage,
                                                                                 bucket, monkeypatch, capfd):
    from test_crash import env_for

    files = pacs_export(storage.write_bytes, f"s3://{bucket}/pacs")
    for i in range(12):  # enough single-frame scans that the kill falls after the first durable chunk
        storage.write_bytes(f"s3://{bucket}/pacs/{PATIENT_FOLDER}/CT/1.2.840.5.{i}.dcm",
                            dicom_bytes(np.random.default_rng(i).integers(0, 3000, (200, 200))))
    spec = job_spec(tmp_path / "job.json", f"s3://{bucket}/pacs/", f"s3://{bucket}/out/",
                    f"s3://{bucket}/secure/map/", model="test_privacy:counted_build", checkpoint_rows=4)
    # The killed driver needs a process of its own, not a Ray of its own: it joins the session's.
    env = {**env_for(tmp_path / "unused-calls.txt", "chunk_written:1"), KEY_ENV: KEY,
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    killed = subprocess.run([sys.executable, "-m", "pipeline", "run", spec], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    fs, _ = storage.fs(f"s3://{bucket}/")
    fs.invalidate_cache()
    staged = [pq.read_table(fs.open(c, "rb")) for c in fs.find(f"{bucket}/out") if c.endswith(".parquet.staged")]
    durable = sum(t.num_rows for t in staged)
    durable_predicted = sum(t["error"].null_count for t in staged)
    assert durable > 0

    seen = Seen.options(name=SEEN).remote()
    monkeypatch.setenv(KEY_ENV, KEY)
    capfd.readouterr()
    assert main(["run", spec, "--executor", "ray"]) == 0  # the rerun, in this process, on the session's Ray
    out, err = capfd.readouterr()
    assert "Resuming run" in out
    fs.invalidate_cache()
    rows = pads.dataset(f"{bucket}/out", filesystem=fs, format="parquet", partitioning="hive").to_table()
    total = 12 + 3 + 3 + 1  # the extra scans, 3 CT, 3 MR frames, the truncated file
    assert rows.num_rows == total and len(set(zip(rows["uri"].to_pylist(), rows["frame"].to_pylist()))) == total
    assert ray.get(seen.get.remote()) == total - 1 - durable_predicted  # durable rows are not redone
    ray.kill(seen)
    pairs = pads.dataset(f"{bucket}/secure/map", filesystem=fs, format="parquet").to_table()
    mapping = dict(zip(pairs["token"].to_pylist(), pairs["uri"].to_pylist()))
    listed = [f"s3://{k}" for k in fs.find(f"{bucket}/pacs")]
    assert {token(u): u for u in listed} == mapping  # every row re-identifiable, the killed attempt's too
    assert_nowhere(identifying_strings(files), stdout=killed.stdout + out, stderr=killed.stderr + err)


def test_error_messages_never_quote_the_input_path():
    uri = f"/data/pacs/{PATIENT_FOLDER}/CT/1.2.840.1.dcm"
    batch = pa.table({"uri": [uri], "error": [f"read: OSError: [Errno 5] Input/output error: '{uri}' "
                                              f"(folder /data/pacs/{PATIENT_FOLDER} busy)"]})
    row = RowPseudonymizer(Pseudonymizer(KEY.encode()), ["uri"])(batch).to_pylist()[0]
    assert row["uri"] == token(uri)
    assert "DOE^JOHN" not in row["error"] and "12345678" not in row["error"] and "Input/output error" in row["error"]


def test_a_pseudonymised_row_s_content_hash_is_a_token_too():
    """A plain hash of the bytes would let anyone holding a patient's file find its row."""
    plain = content_hash(b"a patient's scan")
    schema = pa.schema([("uri", pa.string()), ("content_hash", pa.string()), ("label", pa.string())])
    stage = row_pseudonymizer(Pseudonymizer(KEY.encode()), schema)
    row = stage(pa.table({"uri": ["/pacs/DOE^JOHN/1.dcm"], "content_hash": [plain], "label": ["x"]},
                         schema=schema)).to_pylist()[0]
    assert row["content_hash"] == token(plain) and row["label"] == "x"


@pytest.mark.parametrize("privacy, env, words", [
    ({"pseudonymize": True}, None, ["'privacy'", "key_env", "key_file"]),
    ({"pseudonymize": True, "key": KEY}, None, ["'privacy'", "never written in the job spec"]),
    ({"pseudonymize": True, "key_env": KEY}, None, ["privacy.key_env", "must name an environment variable"]),
    ({"pseudonymize": True, "key_env": KEY_ENV}, None, ["privacy.key_env", KEY_ENV, "is not set"]),
    ({"pseudonymize": True, "key_env": KEY_ENV}, "", ["privacy.key_env", "is empty"]),
    ({"pseudonymize": True, "key_env": KEY_ENV}, KEY[:12], ["privacy.key_env", "too short (12 bytes)"]),
    ({"pseudonymize": True, "key_file": "/no/such/key"}, None, ["privacy.key_file", "cannot read /no/such/key"]),
], ids=["no key", "key in spec", "key as key_env", "variable unset", "variable empty", "key too short", "no key file"])
def test_key_problems_are_one_line_without_the_key(tmp_path, monkeypatch, capsys, privacy, env, words):
    monkeypatch.delenv(KEY_ENV, raising=False)
    if env is not None:
        monkeypatch.setenv(KEY_ENV, env)
    (tmp_path / "pacs").mkdir()
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"input": {"uri": str(tmp_path / "pacs")}, "output": {"uri": str(tmp_path / "out")},
                                "model": {"name": "resnet18"}, "dicom": {}, "privacy": privacy}))
    assert main(["run", str(spec)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert all(line.startswith(("Job: ", "  loading Ray")) for line in captured.out.splitlines())  # ours only
    for word in words:
        assert word in lines[0], lines[0]
    assert KEY[:12] not in captured.err


def test_mapping_beside_the_predictions_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, KEY)
    (tmp_path / "pacs").mkdir()
    spec = job_spec(tmp_path / "job.json", str(tmp_path / "pacs"), str(tmp_path / "out"), str(tmp_path / "out" / "map"))
    assert main(["run", spec]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "privacy.mapping_uri" in lines[0] and "inside output.uri" in lines[0]


def test_listing_logs_never_quote_a_manifest_line_when_pseudonymised(tmp_path, caplog):
    from pipeline.output.history import History
    from pipeline.io.listing import InputListing
    from pipeline.io.storage import Storage

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri,size\n/pacs/{PATIENT_FOLDER}/CT/a.dcm,1\n/pacs/{PATIENT_FOLDER}/CT/b,c.dcm,2,x\n")
    listing = InputListing(str(manifest), Storage(), None, history=History(pseudonymizer=Pseudonymizer(KEY.encode())))
    listed = [o.uri for page in listing.pages() for o in page]
    assert listed == [f"/pacs/{PATIENT_FOLDER}/CT/a.dcm"]  # the listing itself is raw: tokens are made at the sink
    assert "skipped" in caplog.text and "DOE^JOHN" not in caplog.text
