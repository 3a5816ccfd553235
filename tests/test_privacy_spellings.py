"""A pseudonymised job writes no input path, nor any folder of one, in any spelling a library may give it.

botocore quotes the endpoint URL with the key percent-encoded, a repr escapes it, JSON writes `\\u00fc`, a log may
read UTF-8 as Latin-1. The job is run as a user runs it, `pipeline run` in a subprocess that starts its own Ray, on
the S3 server behind a proxy that resets every GET of one object; patients' names and MRNs name the folders. Then
every object the job wrote (Parquet read as rows and as raw bytes, staged chunks, records, `_summary.json`), the
report's HTML, `pipeline runs`, stdout/stderr and every file of the Ray sessions it started are searched for each
spelling of each path and folder: no hit.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import unicodedata
from pathlib import Path
from urllib.parse import quote, quote_plus, unquote

import numpy as np
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError

from conftest import encode, photo
from faults import FaultyProxy
from pipeline.decode.image import Decoder, describe_decode_error
from pipeline.io.read import Reader
from pipeline.io.storage import Storage
from pipeline.privacy.safe_errors import exception_text

TESTS = Path(__file__).parent
KEY = "test-only-pseudonym-key-3f9c1e7a5b2d4c6e8a0b"
KEY_ENV = "PIPELINE_PSEUDONYM_KEY"
ROOT = "export"  # the job's input prefix: generic, as the bucket is
UNREACHABLE = "DOE^JOHN/12345678/CT/1.2.840.1.jpg"  # every GET of it is reset
# Folders name the patient (a caret, a comma and an apostrophe, a non-ASCII letter) and the MRN; names have spaces.
PATIENT_FOLDERS = ["DOE^JOHN", "12345678", "O'BRIEN, ANN", "87654321", "Müller", "55501234"]


def spelled(text: str) -> set[str]:
    """Every way a library may write `text` (this test's own list, independent of the pipeline's)."""
    found = set()
    for form in {text, unicodedata.normalize("NFC", text), unicodedata.normalize("NFD", text)}:
        found |= {form, quote(form, safe="/"), quote(form, safe=""), quote_plus(form), quote_plus(form, safe="/"),
                  repr(form), repr(form)[1:-1], ascii(form)[1:-1], form.encode("unicode_escape").decode("ascii"),
                  json.dumps(form)[1:-1], repr(form.encode("utf-8"))[2:-1], form.encode("utf-8").decode("latin-1")}
    return found


def secrets_of(bucket: str, keys: list[str]) -> dict[str, str]:
    """spelling -> what it spells: each input's URI, bucket/key, key, path under the root and name, each folder."""
    plain = set(PATIENT_FOLDERS)
    for key in keys:
        relative = key.removeprefix(f"{ROOT}/")
        plain |= {f"s3://{bucket}/{key}", f"{bucket}/{key}", key, relative, relative.rsplit("/", 1)[1]}
    return {spelling: text for text in plain for spelling in spelled(text)}


def assert_no_path(secrets: dict[str, str], where: str, text: str) -> None:
    found = sorted({f"{spelling!r} (spells {secret!r})" for spelling, secret in secrets.items() if spelling in text})
    assert not found, f"{where}: {found[:5]}"


def patient_inputs() -> dict[str, bytes]:
    jpeg = encode(photo(64, 48, seed=1), "JPEG")
    return {
        UNREACHABLE: encode(photo(64, 48, seed=2), "JPEG"),
        "DOE^JOHN/12345678/CT/1.2.840.2.jpg": jpeg,
        "O'BRIEN, ANN/87654321/CR/chest view.jpg": encode(photo(64, 48, seed=3), "JPEG"),
        "O'BRIEN, ANN/87654321/CR/referral.jpg": b"Referral for O'BRIEN, ANN, MRN 87654321: chest pain.\n",
        "Müller/55501234/XR/hand 1.jpg": jpeg[:len(jpeg) // 2],  # truncated
        "Müller/55501234/XR/hand 2.jpg": encode(photo(64, 48, seed=4), "JPEG"),
    }


def job_spec(path: Path, bucket: str, endpoint_url: str) -> str:
    path.write_text(json.dumps({
        "input": {"uri": f"s3://{bucket}/{ROOT}/"},
        "output": {"uri": f"s3://{bucket}/out/"},
        "model": {"name": "counting_model:build", "preprocess": {"resize_size": 32, "crop_size": 32}},
        "compute": {"batch_size": 4, "min_actors": 1, "max_actors": 1},
        "storage": {"endpoint_url": endpoint_url, "max_attempts": 2, "connect_timeout_s": 2, "read_timeout_s": 5},
        "privacy": {"pseudonymize": True, "key_env": KEY_ENV}}))
    return str(path)


def resets_unreachable(method: str, target: str) -> bool:
    return method == "GET" and unquote(target.split("?")[0]).endswith(UNREACHABLE)


def written_text(storage: Storage, bucket: str, prefix: str) -> dict[str, str]:
    """Every object under the prefix: its key, its bytes read as UTF-8 and as Latin-1, and a Parquet file's rows."""
    texts = {}
    pages = storage.s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for item in (item for page in pages for item in page.get("Contents", [])):
        data = storage.s3_client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        text = item["Key"] + data.decode("utf-8", "replace") + data.decode("latin-1")
        if ".parquet" in item["Key"]:
            text += repr(pq.read_table(io.BytesIO(data)).to_pylist())
        texts[item["Key"]] = text
    return texts


def session_files(ray_tmp: str) -> dict[str, str]:
    """Every file of the Ray sessions started under this temporary root (logs, among them the workers')."""
    return {str(p): (lambda b: b.decode("utf-8", "replace") + b.decode("latin-1"))(p.read_bytes())
            for p in Path(ray_tmp).rglob("*") if p.is_file() and not p.is_symlink()}


def stop_processes_under(root: str) -> None:
    """The Ray processes a killed driver left: those started with this test's own RAY_TMPDIR (`ray::` agents and
    workers rename themselves, so their environment tells, not their command line)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"RAY_TMPDIR={root}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:  # gone meanwhile, or not ours to read
            pass


def pipeline(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(900)  # two runs, each starting its own Ray, then the report and the history
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_pseudonymised_job_writes_no_path_in_any_spelling(executor, s3_server, storage, bucket, tmp_path):
    inputs = patient_inputs()
    keys = [f"{ROOT}/{name}" for name in inputs]
    for key, data in zip(keys, inputs.values()):
        storage.s3_client.put_object(Bucket=bucket, Key=key, Body=data)
    secrets = secrets_of(bucket, keys)
    ray_tmp = tempfile.mkdtemp(prefix="pz", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PIPELINE_FAILPOINTS")}
    env.update({KEY_ENV: KEY, "RAY_TMPDIR": ray_tmp, "TMPDIR": ray_tmp,  # Ray's logs, or the model process's
                "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)})
    try:
        with FaultyProxy(s3_server.endpoint_url, fail_rate=0, reset_rate=1.0, stall_rate=0) as proxy:
            proxy.only = resets_unreachable
            spec = job_spec(tmp_path / "job.json", bucket, proxy.url)
            # The first run is killed once it committed, before it drops its staged chunks: they are searched too.
            killed = pipeline("run", spec, "--executor", executor, env={**env, "PIPELINE_FAILPOINTS": "committed:1"})
            assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
            staged = written_text(storage, bucket, "out/_staging/")
            assert any(key.endswith(".parquet.staged") for key in staged), list(staged)
            stop_processes_under(ray_tmp)
            # The next run tries the unreachable input again (an I/O error says nothing about the input).
            rerun = pipeline("run", spec, "--executor", executor, env=env)
            assert rerun.returncode == 0, rerun.stderr[-3000:]
            assert proxy.stats["reset"] >= 2, proxy.stats
        page = tmp_path / "report.html"
        report = pipeline("report", f"s3://{bucket}/out/", "-o", str(page), env=env)
        runs = pipeline("runs", f"s3://{bucket}/out/", env=env)
        assert report.returncode == 0 and runs.returncode == 0, report.stderr[-2000:] + runs.stderr[-2000:]
        logs = session_files(ray_tmp)
    finally:
        stop_processes_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    written = written_text(storage, bucket, "out/")
    for where, text in {**staged, **written}.items():
        assert_no_path(secrets, where, text)
    assert_no_path(secrets, "report", page.read_text())
    for name, result in {"killed run": killed, "rerun": rerun, "report": report, "runs": runs}.items():
        assert_no_path(secrets, f"{name} stdout", result.stdout)
        assert_no_path(secrets, f"{name} stderr", result.stderr)
    if executor == "ray":
        assert any("/logs/" in path for path in logs) and len(logs) > 10, sorted(logs)[:20]
    else:
        assert any("/worker-" in path for path in logs), sorted(logs)[:20]
    for path, text in logs.items():
        assert_no_path(secrets, path, text)

    # Every input has its row; the errors say what happened, usefully, without a path.
    read = lambda key: storage.s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    rows = [row for key in written if key.endswith(".parquet") and "/_staging/" not in key
            for row in pq.read_table(io.BytesIO(read(key))).to_pylist()]
    assert len(rows) == len(inputs) + 1  # the unreachable input: an error row in each run
    errors = {r["error_type"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"read.io_error", "decode.truncated", "decode.not_an_image"}, errors
    assert "EndpointConnectionError" in errors["read.io_error"] and "tried 4 times" in errors["read.io_error"]
    assert "could not connect to the storage endpoint" in errors["read.io_error"]
    assert "errors      1  (read.io_error 1)" in rerun.stdout
    summary = json.loads(read("out/_summary.json"))
    assert summary["pseudonyms"] and summary["errors_by_type"] == {"read.io_error": 1}


@pytest.mark.parametrize("fault, words", [
    ("reset", ["EndpointConnectionError", "could not connect to the storage endpoint", "ECONNRESET"]),
    ("fail", ["OSError", "HTTP 5"]),  # SlowDown 503 or InternalError 500, as the proxy draws them
    ("cut", ["ClientPayloadError", "body was cut short"]),
])
def test_a_failed_read_says_what_happened_without_the_path(s3_server, storage, bucket, fault, words):
    keys = [f"{ROOT}/{name}" for name in patient_inputs()]
    for key in keys:
        storage.s3_client.put_object(Bucket=bucket, Key=key, Body=b"abc")
    uris = np.array([f"s3://{bucket}/{key}" for key in keys], dtype=object)
    none = np.full(len(keys), None, dtype=object)
    with FaultyProxy(s3_server.endpoint_url, fail_rate=0, reset_rate=0, stall_rate=0) as proxy:
        setattr(proxy, f"{fault}_rate", 1.0)
        proxy.only = lambda method, target: method == "GET" and "list-type" not in target
        reader = Storage.from_env(proxy.url, max_attempts=2, connect_timeout_s=2, read_timeout_s=5)
        batch = lambda: {"uri": uris.copy(), "size": none.copy(), "etag": none.copy(), "last_modified": none.copy()}
        safe = Reader(reader, 10**6, safe_errors=True)(batch())["error"]
        raw = Reader(reader, 10**6)(batch())["error"]
    secrets = secrets_of(bucket, keys)
    for error in safe:
        assert error.startswith("read: ") and "tried 4 times" in error, error
        assert all(word in error for word in words), error
        assert_no_path(secrets, "error", error)
        assert "S3 SlowDown, HTTP 503" in error or "S3 InternalError, HTTP 500" in error or fault != "fail"
    if fault == "reset":  # the library's own text, kept where privacy is off, spells the path percent-encoded
        assert all(quote(key) in error for key, error in zip(keys, raw))


def test_library_text_is_never_quoted_when_safe():
    uri = "s3://scans/export/Müller/55501234/XR/hand 1.jpg"
    cause = ClientError({"Error": {"Code": "SlowDown", "Message": f"slow down on {uri}"},
                         "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
    try:
        try:
            raise cause
        except ClientError as exc:
            raise OSError(16, f"Please reduce your request rate: {quote(uri)}") from exc
    except OSError as exc:
        translated = exc
    text = exception_text(translated, safe=True)
    assert text == "OSError (S3 SlowDown, HTTP 503)", text
    assert exception_text(FileNotFoundError(2, "No such file", repr(uri)), safe=True) == \
        "FileNotFoundError (ENOENT, no such file or directory)"
    kind, message = describe_decode_error(SyntaxError(f"broken PNG file {ascii(uri)}"), safe=True)
    assert (kind, message) == ("corrupt", "SyntaxError")
    secrets = secrets_of("scans", ["export/Müller/55501234/XR/hand 1.jpg"])
    for text in (text, message):
        assert_no_path(secrets, "message", text)


def test_a_decoder_in_a_pseudonymised_job_keeps_its_own_words():
    payloads = [b"Referral for O'BRIEN, ANN, MRN 87654321\n", encode(photo(), "JPEG")[:400], b""]
    batch = {"uri": np.array(["a", "b", "c"], dtype=object), "bytes": np.array(payloads, dtype=object),
             "error": np.full(3, None, dtype=object), "error_type": np.full(3, None, dtype=object)}
    out = Decoder(None, 10**8, safe_errors=True)(batch)
    assert list(out["error"]) == ["decode: not a recognised image format", "decode: image file is truncated",
                                  "decode: file is empty (0 bytes)"]


def test_a_manifest_value_is_never_quoted_when_pseudonymised(tmp_path, monkeypatch, capsys, caplog):
    """An unquoted comma puts part of a patient's path in the size column: the refusal and the warning name the
    column and row, not the value."""
    from pipeline.cli.commands import main
    from pipeline.io.manifest import read_manifest

    manifest = tmp_path / "scans.csv"
    manifest.write_text("uri,size\n/pacs/O'BRIEN, ANN/87654321/CR/chest.jpg\n")
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"input": {"uri": str(manifest)}, "output": {"uri": str(tmp_path / "out")},
                                "model": {"name": "resnet18"}, "privacy": {"pseudonymize": True, "key_env": KEY_ENV}}))
    monkeypatch.setenv(KEY_ENV, KEY)
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "column 'size', row 1" in err and "ANN" not in err and "87654321" not in err, err
    assert [o.uri for page in read_manifest(str(manifest), Storage(), quote=False) for o in page] == ["/pacs/O'BRIEN"]
    assert "column 'size', row 1" in caplog.text and "ANN" not in caplog.text, caplog.text
