"""`pipeline report` and `pipeline runs` on the outputs of small real runs (classification on a local folder,
detection on the test S3 server, DICOM), read back as a user would: the page rendered by headless Chromium,
its sections and images checked in the browser, and its numbers against the rows in the Parquet."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import torchvision
import yaml
from PIL import Image, ImageDraw

from conftest import encode, photo, photo_jpeg
from dicom_files import dicom_bytes, shipped
from pipeline.cli.commands import main
from pipeline.io.storage import Storage
from pipeline.output.lease import OutputLease
from pipeline.output.staging import RunInfo, StagedRun, Staging
from pipeline.local.executor import run_locally
from pipeline.job.config import load_job
from test_report_truth import DOLLAR_LABELS, svg_texts

TESTS = Path(__file__).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# Where the screenshots go: docs/ when PIPELINE_SCREENSHOTS names it (how the README's picture was made).
SCREENSHOTS = os.environ.get("PIPELINE_SCREENSHOTS")


def run(spec: dict, folder: Path, name: str):
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return run_locally(load_job(str(path), {}), out=io.StringIO())


def boxes_photo(seed: int) -> bytes:
    """A grey photo with a red and (for odd seeds) a blue box: the colour-box detector finds them."""
    image = Image.new("RGB", (160, 120), (110, 110, 110))
    draw = ImageDraw.Draw(image)
    draw.rectangle([10 + seed * 3, 15, 60 + seed * 3, 70], fill=(230, 20, 20))
    if seed % 2:
        draw.rectangle([90, 40, 140, 100], fill=(20, 20, 230))
    return encode(image, "JPEG", quality=95)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, classifier_files, s3_server):
    """Three tasks' outputs, each from a real run; the classification one has a second run with other weights."""
    root = tmp_path_factory.mktemp("report")
    photos = root / "photos"
    photos.mkdir()
    for seed in range(10):
        (photos / f"p{seed:02d}.jpg").write_bytes(encode(photo(160, 120, seed=seed), "JPEG"))
    (photos / "cut.jpg").write_bytes(encode(photo(seed=99), "JPEG")[:300])
    (photos / "empty.png").write_bytes(b"")
    classify = {"input": {"uri": str(photos)}, "output": {"uri": str(root / "labels")},
                "model": {"name": "resnet18", "weights": classifier_files["weights"],
                          "labels": classifier_files["labels"]}}
    first = run(classify, root, "classify")
    torch.manual_seed(7)
    upgraded = root / "resnet18-v2.pt"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), upgraded)
    classify["model"]["weights"] = str(upgraded)
    second = run(classify, root, "classify")

    storage = Storage.from_env()
    bucket = "report-tests"
    if bucket not in [b["Name"] for b in storage.s3_client.list_buckets()["Buckets"]]:
        storage.s3_client.create_bucket(Bucket=bucket)
    for seed in range(6):
        storage.write_bytes(f"s3://{bucket}/boxes/b{seed}.jpg", boxes_photo(seed))
    (root / "colors.txt").write_text("__background__\nred\ngreen\nblue\n")
    detect = run({"input": {"uri": f"s3://{bucket}/boxes/"}, "output": {"uri": f"s3://{bucket}/boxes-out/"},
                  "model": {"name": "color_boxes:build", "task": "detection", "labels": str(root / "colors.txt")}},
                 root, "detect")

    scans = root / "scans"
    scans.mkdir()
    hu = np.linspace(-1000, 1000, 64 * 64).reshape(64, 64)
    (scans / "ct.dcm").write_bytes(dicom_bytes(hu, slope=1, intercept=-1024, window=(40, 400)))
    (scans / "mr-3frames.dcm").write_bytes(dicom_bytes(np.stack([hu * k for k in (1, 2, 3)]), modality="MR"))
    (scans / "CT_small.dcm").write_bytes(shipped("CT_small.dcm"))
    (scans / "cut.dcm").write_bytes(shipped("CT_small.dcm")[:2000])
    dicom = run({"input": {"uri": str(scans), "extensions": ["dcm"]}, "output": {"uri": str(root / "dicom-out")},
                 "model": {"name": "resnet18", "weights": classifier_files["weights"],
                           "labels": classifier_files["labels"]}, "dicom": {"window": "file"}}, root, "dicom")
    return {"root": root, "photos": photos, "bucket": bucket,
            "classification": (str(root / "labels"), first, second),
            "detection": (f"s3://{bucket}/boxes-out/", detect), "dicom": (str(root / "dicom-out"), dicom)}


def report(output: str, path: Path, *flags: str, capsys=None) -> str:
    assert main(["report", output, "-o", str(path), *flags]) == 0
    return path.read_text()


def in_chromium(page: Path, screenshot: Path | None = None) -> dict:
    """What headless Chromium made of the page: its sections, and each <img>'s loaded size."""
    probe = page.with_suffix(".probe.html")
    script = ("<script>window.addEventListener('load', () => { document.body.setAttribute('data-probe', "
              "JSON.stringify({sections: [...document.querySelectorAll('section')].map(s => s.id), "
              "images: [...document.images].map(i => [i.complete, i.naturalWidth]), "
              "svgs: document.querySelectorAll('svg').length, "
              "figures: [...document.querySelectorAll('figure')].map(f => [f.title, f.querySelector('figcaption')"
              ".textContent, f.querySelector('figcaption').scrollWidth <= f.querySelector('figcaption').clientWidth]), "
              "placeholders: document.querySelectorAll('.placeholder').length})); });</script>")
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--allow-file-access-from-files", "--virtual-time-budget=5000"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    found = re.search(r"data-probe=\"([^\"]*)\"", dom)
    assert found, dom[-2000:]
    if screenshot is not None:
        subprocess.run([CHROMIUM, *flags, "--hide-scrollbars", "--window-size=1200,2200",
                        f"--screenshot={screenshot}", page.as_uri()], capture_output=True, timeout=120, check=True)
        assert screenshot.stat().st_size > 10_000
    return json.loads(found.group(1).replace("&quot;", '"'))


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (`apt-get install chromium`; .ci/run installs it)")
@pytest.mark.parametrize("task", ["classification", "detection", "dicom"])
def test_report_renders_in_a_browser_with_its_images(task, outputs, tmp_path):
    output = outputs[task][0]
    page = tmp_path / f"{task}.html"
    html = report(output, page, *(["--against", outputs[task][1].run_id] if task == "classification" else []))
    assert not re.search(r"(src|href)=[\"']?(https?:|//)", html)  # nothing is fetched: it opens offline
    shot = Path(SCREENSHOTS) / f"report-{task}.png" if SCREENSHOTS else tmp_path / "shot.png"
    seen = in_chromium(page, shot)
    expected = ["facts", "provenance", "labels", "errors", "contact-sheet", "throughput"]
    assert seen["sections"] == expected + (["against"] if task == "classification" else [])
    assert seen["images"] and all(done and width > 0 for done, width in seen["images"])  # every thumbnail loads
    assert seen["svgs"] >= 3 and seen["placeholders"] == 0
    # Each thumbnail names its input in full, on hover and in a caption that wraps within the thumbnail's width.
    inputs = {r["uri"] for r in read_rows(output)}
    assert seen["figures"] and all(title.split(" · frame ")[0] in inputs and title in caption and wraps
                                   for title, caption, wraps in seen["figures"])


def read_rows(output: str) -> list[dict]:
    if output.startswith("s3://"):
        fs, path = Storage.from_env().fs(output)
        return pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()
    return pads.dataset(output, format="parquet").to_table().to_pylist()


def test_classification_report_counts_what_the_parquet_holds(outputs, tmp_path):
    output, first, second = outputs["classification"]
    rows = pads.dataset(output, format="parquet").to_table().to_pylist()
    latest = [r for r in rows if r["run_id"] == second.run_id]
    html = report(output, tmp_path / "r.html", "--against", first.run_id)
    errors = sorted({r["error_type"] for r in latest if r["error_type"]})
    assert errors == ["decode.empty", "decode.truncated"] and all(e in html for e in errors)
    for label in {r["label"] for r in latest if r["label"]}:
        count = sum(r["label"] == label for r in latest)
        assert re.search(rf"<h3>{label} <span class=\"sub\">\({count}\)</span>", html)
    before = {r["uri"]: r["label"] or f"error: {r['error_type']}" for r in rows if r["run_id"] == first.run_id}
    changed = {}
    for r in latest:
        now = r["label"] or f"error: {r['error_type']}"
        if before[r["uri"]] != now:
            changed[(before[r["uri"]], now)] = changed.get((before[r["uri"]], now), 0) + 1
    assert changed  # different random weights relabel some photos
    for (old, new), n in changed.items():
        assert f"<tr><td>{old}</td><td>{new}</td><td class=\"n\">{n}</td></tr>" in html
    # "new label in the old top-k" is a share of the inputs whose label changed, not of all compared.
    old_topk = {r["uri"]: r["topk_labels"] or [] for r in rows if r["run_id"] == first.run_id}
    moved = [r for r in latest if r["label"] and before[r["uri"]] != r["label"]]
    share = sum(r["label"] in old_topk[r["uri"]] for r in moved) / len(moved)
    assert f"<b>{share:.1%}</b><span>of the {sum(changed.values())} changed, new label in the old top-k</span>" in html
    # Every thumbnail names its input in full (on hover too), not only its file name.
    titles = re.findall(r'<figure title="([^"]+)">', html)
    assert titles and all(t in {r["uri"] for r in latest} for t in titles)
    assert second.run_id in html and "sha256:" in html or second.weights in html


def test_detection_report_draws_boxes_on_thumbnails_from_s3(outputs, tmp_path):
    output, summary = outputs["detection"]
    html = report(output, tmp_path / "d.html")
    assert summary.detections > 0 and "boxes per label" in html
    assert "<h3>red <span class=\"sub\">(6)</span></h3>" in html and "<h3>blue <span class=\"sub\">(3)</span></h3>" in html
    thumbs = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', html)
    assert len(thumbs) >= 6
    import base64

    from pipeline.report.thumbnails import label_colour

    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(thumbs[0]))).convert("RGB")).astype(int)
    # The box is outlined in its label's colour, which is none of the photo's (grey, red and blue fills).
    outline = np.array(Image.new("RGB", (1, 1), label_colour("red")).getpixel((0, 0)))
    assert (np.abs(image - outline).sum(axis=-1) < 60).sum() > 40


def test_dicom_report_shows_windowed_frames_and_no_patient_values(outputs, tmp_path):
    output, summary = outputs["dicom"]
    html = report(output, tmp_path / "m.html")
    assert "frame 2" in html or "frame 1" in html  # a multi-frame file's rows are frames
    assert "(DICOM)" in html and len(re.findall(r'<img src="data:image/jpeg', html)) >= 3
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(shipped("CT_small.dcm")))
    for keyword in ("PatientName", "PatientID", "InstitutionName"):
        value = str(ds.get(keyword, "") or "")
        assert not value or value not in html


def test_unreadable_thumbnail_is_a_placeholder(outputs, tmp_path):
    output, first, second = outputs["classification"]
    photos = outputs["photos"]
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in photos.glob("p*.jpg"):
        shutil.copy2(f, moved / f.name)
        f.write_bytes(b"not a jpeg any more")
    try:
        html = report(output, tmp_path / "r.html")
    finally:
        for f in moved.iterdir():
            shutil.copy2(f, photos / f.name)  # with its mtime: the input is unchanged again
    assert "input unavailable or unreadable" in html and 'src="data:image' not in html


def test_runs_and_report_never_import_ray(outputs, tmp_path):
    """Both read an output as any reader would: a laptop without the cluster, a CI job, a cron check."""
    probe = ("import sys; from pipeline.cli.commands import main; code = main(sys.argv[1:]); "
             "assert 'ray' not in sys.modules and 'torch' not in sys.modules, 'imported'; sys.exit(code)")
    output = outputs["classification"][0]
    for argv in (["runs", output], ["report", output, "-o", str(tmp_path / "r.html")]):
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]


def test_runs_lists_history_staged_run_lease_and_next_run(outputs, storage, capsys):
    output, first, second = outputs["classification"]
    photos = outputs["photos"]
    (photos / "new-1.jpg").write_bytes(encode(photo(seed=41), "JPEG"))
    (photos / "new-2.jpg").write_bytes(encode(photo(seed=42), "JPEG"))
    changed = photos / "p00.jpg"
    original = changed.read_bytes()
    changed.write_bytes(encode(photo(seed=43), "JPEG"))
    os.utime(changed, (1, 1))
    staging = Staging(storage, output)
    staged = StagedRun("20991231T000000Z-feedbeef", RunInfo(
        run_id="20991231T000000Z-feedbeef", job_key="j", model_key="m", started_at="2099-12-31T00:00:00+00:00",
        input=str(photos), model="resnet18", weights="w", attempts=["2099-12-31T00:00:00+00:00"]))
    staging.begin(staged)
    staging.write_chunk(staged.run_id, 0, pads.dataset(output, format="parquet").to_table().slice(0, 3))
    try:
        with OutputLease.for_output(storage, output, staged.run_id):
            capsys.readouterr()
            assert main(["runs", output]) == 0
            held = capsys.readouterr().out
        assert main(["runs", output, "--no-listing"]) == 0
        free = capsys.readouterr().out
    finally:
        staging.drop(StagedRun(staged.run_id, chunks=[staging.chunk_uri(staged.run_id, 0)]))
        changed.write_bytes(original)
        for name in ("new-1.jpg", "new-2.jpg"):
            (photos / name).unlink()
    assert first.run_id in held and second.run_id in held and "2 committed run(s)" in held
    assert re.search(rf"{second.run_id}\s+\S+ \S+\s+append\s+resnet18\s+\S+\s+12\s+2\s+1", held)
    assert "3 rows of 3 inputs staged in 1 chunk(s)" in held and f"lease held by run {staged.run_id}" in held
    # 12 listed before: 10 photos (one now changed) and 2 broken files, whose error rows count as done.
    assert "2 new, 1 changed or to retry, 11 unchanged" in held
    assert "lease free" in free and "Next run" not in free and "resumes after the staged rows" in free


@pytest.mark.parametrize("argv, message", [
    (["runs", "{root}/photos"], "is not an output of this pipeline"),
    (["report", "{root}/nowhere"], "is not an output of this pipeline"),
    (["report", "{labels}", "--run", "20200101T000000Z-00000000"], "no such committed run"),
    (["report", "{labels}", "--against", "nope"], "--against nope: no such committed run"),
    (["runs", "s3://no-such-bucket-here/out"], "cannot list s3://no-such-bucket-here/out"),
    (["runs", "{root}/labels", "--catalog", "type"], "KEY=VALUE"),
    (["report", "{labels}", "-o", "/no/such/folder/r.html"], "-o /no/such/folder/r.html: cannot write the report"),
])
def test_bad_input_is_one_line_exit_2(argv, message, outputs, capsys):
    argv = [a.format(root=outputs["root"], labels=outputs["classification"][0]) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_the_run_records_its_throughput(outputs):
    output = outputs["classification"][0]
    records = sorted(Path(output, "_commits").glob("*.json"))
    record = json.loads(records[-1].read_text())
    progress = record["progress"]
    assert progress[0] == [0.0, 0] and progress[-1][1] == record["rows"] == 12
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(progress, progress[1:]))
    assert record["elapsed_s"] > 0 and record["images_per_s"] > 0 and record["extensions"]


@pytest.mark.parametrize("orientation, upright", [(1, (160, 80)), (6, (80, 160)), (8, (80, 160)), (3, (160, 80))])
def test_thumbnails_are_upright_as_a_viewer_shows_the_photo(orientation, upright):
    """A camera's EXIF orientation is applied, as in the job's own decode: a portrait stays a portrait."""
    import base64

    from pipeline.report.facts import Sample
    from pipeline.report.thumbnails import _thumbnail

    image = Image.new("RGB", (200, 100), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    src = _thumbnail(buffer.getvalue(), Sample("s3://b/p.jpg", None, "cat"))
    shown = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert shown.size == upright


# --- a run killed and resumed, as a user's is ----------------------------------------------------------------------

RESUMED_INPUTS = 48


def counting_job(root: Path, labels: str, output: str) -> Path:
    """An Iceberg job of tests/counting_model.py (fast) over root/photos; `labels` names its labels file."""
    path = root / f"{labels}.yaml"
    path.write_text(yaml.safe_dump({
        "input": {"uri": str(root / "photos")}, "output": {"uri": output, "format": "iceberg", "checkpoint_rows": 8},
        "model": {"name": "counting_model:build", "labels": str(root / labels),
                  "preprocess": {"resize_size": 128, "crop_size": 128}}, "compute": {"batch_size": 8}}))
    return path


def runs_text(output: str) -> str:
    import contextlib

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["runs", output]) == 0
    return printed.getvalue()


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, s3_server):
    """An Iceberg output: a committed run of one model; a run of another, whose labels hold `$`, killed after its
    second staged chunk (a `pipeline run` process of its own, SIGKILLed by a failpoint); `pipeline runs` then;
    then the rerun that resumes it."""
    root = tmp_path_factory.mktemp("resumed")
    (root / "photos").mkdir()
    for i in range(RESUMED_INPUTS):  # photo-sized: rows reach the driver over several blocks
        (root / "photos" / f"photo {i:02d}.jpg").write_bytes(photo_jpeg(i))
    (root / "plain.txt").write_text("a\nb\nc\n")
    (root / "dollars.txt").write_text("\n".join(DOLLAR_LABELS) + "\n")
    output = str(root / "out")
    first = run_locally(load_job(str(counting_job(root, "plain.txt", output)), {}), out=io.StringIO())
    upgrade = counting_job(root, "dollars.txt", output)
    env = {**os.environ, "PIPELINE_FAILPOINTS": "chunk_written:2",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-m", "pipeline", "run", str(upgrade)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    staging = Staging(Storage.from_env(), output)
    (staged,) = staging.scan().values()
    stats = staging.count(staged)
    between = runs_text(output)
    printed = io.StringIO()
    second = run_locally(load_job(str(upgrade), {}), out=printed)
    return {"output": output, "first": first, "second": second, "staged_rows": stats.rows,
            "staged_inputs": staged.resumed_inputs, "runs_between": between, "summary": printed.getvalue()}


def test_runs_counts_what_the_rerun_of_a_killed_run_will_predict(resumed):
    staged, runs = resumed["staged_inputs"], resumed["runs_between"]
    second = resumed["second"]
    assert 0 < staged < RESUMED_INPUTS
    pending = RESUMED_INPUTS - staged  # a new model: nothing of the first run counts as done for it
    assert (f"Rerunning the job of run {second.run_id} ({Path(resumed['output']).parent / 'photos'}, model "
            f"counting_model:build) resumes it: {pending} inputs pending ({pending} new, 0 changed or to retry), "
            f"{staged} staged and not redone, 0 unchanged and skipped") in runs
    assert second.inputs == pending and second.resumed == staged  # what the rerun did
    # The other job's estimate is labelled as its own: a rerun of the first run's job would do nothing.
    assert f"Next run of the job of run {resumed['first'].run_id} (" in runs


def test_report_of_a_resumed_run_gives_each_attempt_and_draws_dollar_labels_as_text(resumed, tmp_path):
    second = resumed["second"]
    html = report(resumed["output"], tmp_path / "r.html")
    assert second.run_id in html
    facts = {name: value for value, name in re.findall(r'<div class="fact"><b>([^<]*)</b><span>([^<]*)</span>', html)}
    assert facts["inputs"] == str(RESUMED_INPUTS) and facts["attempts"] == "2"
    assert facts["rows resumed from interrupted attempts"] == str(resumed["staged_rows"])
    attempts = re.findall(r'<tr><td class="n">(\d)</td><td class="mono">[^<]+</td><td class="n">([^<]+)</td>'
                          r'<td class="n">([^<]+)</td><td class="n">([^<]+)</td><td>(\w+)</td></tr>', html)
    assert [(n, rows, ended) for n, rows, _, _, ended in attempts] == [
        ("1", str(resumed["staged_rows"]), "interrupted"), ("2", str(second.rows), "committed")]
    assert all(seconds.endswith(" s") and float(rate.replace(",", "")) > 0 for _, _, seconds, rate, _ in attempts)
    # Labels with `$` are text in the charts as on the page (matplotlib used to read them as maths, or raise).
    labels = {r["label"] for r in second_rows(resumed["output"], second.run_id)}
    assert labels <= set(DOLLAR_LABELS)
    drawn = [t for svg in re.findall(r"<svg.*?</svg>", html, flags=re.S) for t in svg_texts(svg)]
    assert labels <= set(drawn)


def second_rows(output: str, run_id: str) -> list[dict]:
    from pipeline.output.iceberg import IcebergFormat

    table = IcebergFormat(Storage.from_env(), output, None, "default.predictions").load()
    return [r for r in table.scan(selected_fields=("uri", "label", "run_id")).to_arrow().to_pylist()
            if r["run_id"] == run_id]


def test_an_iceberg_run_names_its_snapshot_and_metadata_file(resumed):
    """The README's time-travel SQL takes both: the run's summary and `pipeline runs` print them."""
    from pipeline.output.iceberg import IcebergFormat

    table = IcebergFormat(Storage.from_env(), resumed["output"], None, "default.predictions")
    second = resumed["second"]
    assert f"  metadata    {table.metadata_location}  (" in resumed["summary"]
    assert f"Iceberg snapshot {second.table_version}" in resumed["summary"]
    runs = runs_text(resumed["output"])
    assert f"metadata file: {table.metadata_location}\n" in runs
    for record in table.committed():
        assert re.search(rf"{record['run_id']} .*\s{record['snapshot_id']}\n", runs)
