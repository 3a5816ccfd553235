"""Every config problem the user can fix: one line naming the field and the fix, exit code 2, no traceback."""

import subprocess
import sys

import pytest
import torch

from pipeline.cli.commands import main


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["run", *args])
    err = capsys.readouterr().err
    return code, err


def assert_one_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def good_args(tmp_path, classifier_files):
    images = tmp_path / "images"
    images.mkdir()
    return ["--input", str(images), "--output", str(tmp_path / "out"), "--model", "resnet18",
            "--weights", classifier_files["weights"], "--labels", classifier_files["labels"]]


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def test_missing_bucket(capsys, s3_server, good_args):
    code, err = run_cli(capsys, *with_flag(good_args, "--input", "s3://no-such-bucket/images/"))
    assert code == 2
    assert_one_line(err, "input.uri", "bucket 'no-such-bucket' does not exist")


def test_missing_output_bucket(capsys, s3_server, good_args):
    code, err = run_cli(capsys, *with_flag(good_args, "--output", "s3://no-such-output/preds/"))
    assert code == 2
    assert_one_line(err, "output.uri", "bucket 'no-such-output' does not exist")


def test_missing_credentials(capsys, s3_server, good_args, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, err = run_cli(capsys, *with_flag(good_args, "--input", "s3://some-bucket/images/"))
    assert code == 2
    assert_one_line(err, "no AWS credentials found", "AWS_ACCESS_KEY_ID")


def test_unreachable_endpoint(capsys, good_args, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("storage: {endpoint_url: 'http://127.0.0.1:9'}\n")
    code, err = run_cli(capsys, str(spec), *with_flag(good_args, "--input", "s3://some-bucket/x/"))
    assert code == 2
    assert_one_line(err, "cannot reach http://127.0.0.1:9", "endpoint_url")


def test_missing_local_input(capsys, good_args, tmp_path):
    code, err = run_cli(capsys, *with_flag(good_args, "--input", str(tmp_path / "nope")))
    assert code == 2
    assert_one_line(err, "input.uri", "does not exist")


def test_unknown_model(capsys, good_args):
    code, err = run_cli(capsys, *with_flag(good_args, "--model", "resnet51"))
    assert code == 2
    assert_one_line(err, "model.name", "'resnet51' is not a torchvision classification or detection model; did you mean resnet50")


def test_unknown_weights_name(capsys, good_args):
    args = with_flag(with_flag(good_args, "--weights", "IMAGENET9K_V7"), "--model", "resnet50")
    code, err = run_cli(capsys, *args)
    assert code == 2
    assert_one_line(err, "model.weights", "IMAGENET1K_V2")


def test_missing_checkpoint(capsys, good_args, tmp_path):
    code, err = run_cli(capsys, *with_flag(good_args, "--weights", str(tmp_path / "missing.pt")))
    assert code == 2
    assert_one_line(err, "model.weights", "cannot read checkpoint")


def test_unreadable_checkpoint(capsys, good_args, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    code, err = run_cli(capsys, *with_flag(good_args, "--weights", str(garbage)))
    assert code == 2
    assert_one_line(err, "model.weights", "not a loadable state_dict")


def test_checkpoint_that_does_not_fit(capsys, good_args, tmp_path):
    wrong = tmp_path / "wrong.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), wrong)
    code, err = run_cli(capsys, *with_flag(good_args, "--weights", str(wrong)))
    assert code == 2
    assert_one_line(err, "model.weights", "does not fit resnet18 with 4 classes")


def test_checkpoint_without_labels(capsys, good_args):
    args = good_args[: good_args.index("--labels")]
    code, err = run_cli(capsys, *args)
    assert code == 2
    assert_one_line(err, "model.labels", "required with a checkpoint")


def test_pickled_code_is_refused(capsys, good_args, tmp_path):
    """weights_only=True: a checkpoint that would run code on load is rejected, not executed."""
    evil = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(1), "hook": print}, evil)
    code, err = run_cli(capsys, *with_flag(good_args, "--weights", str(evil)))
    assert code == 2
    assert_one_line(err, "model.weights", "not a loadable state_dict")


def test_custom_model_that_cannot_be_imported(capsys, good_args):
    code, err = run_cli(capsys, *with_flag(good_args, "--model", "no_such_module:build"))
    assert code == 2
    assert_one_line(err, "model.name", "cannot import 'no_such_module:build'")


def test_manifest_without_uri_column(capsys, good_args, tmp_path):
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\n/a.jpg\n")
    code, err = run_cli(capsys, *with_flag(good_args, "--input", str(manifest)))
    assert code == 2
    assert_one_line(err, "input.uri", "has no 'uri' column")


def test_output_that_already_holds_parquet(capsys, good_args, tmp_path):
    out = tmp_path / "out"
    (out / "sales").mkdir(parents=True)
    (out / "sales" / "2024.parquet").write_bytes(b"PAR1")
    code, err = run_cli(capsys, *good_args)
    assert code == 2
    assert_one_line(err, "output.uri", "1 Parquet file(s) this pipeline did not write", "sales/2024.parquet")
    code, err = run_cli(capsys, *good_args, "--overwrite")  # never deleted, not even by a backfill
    assert code == 2 and (out / "sales" / "2024.parquet").exists()


def test_output_with_parts_from_before_commit_records(capsys, good_args, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-20261101T000000Z-0123abcd-00000.parquet").write_bytes(b"PAR1")
    code, err = run_cli(capsys, *good_args)
    assert code == 2
    assert_one_line(err, "output.uri", "without a commit record", "--overwrite")


def test_output_that_is_the_input_folder(capsys, good_args, tmp_path):
    code, err = run_cli(capsys, *with_flag(good_args, "--output", str(tmp_path / "images")))
    assert code == 2
    assert_one_line(err, "output.uri", "is the input folder itself")


def test_corrupt_commit_record(capsys, good_args, tmp_path):
    (tmp_path / "out" / "_commits").mkdir(parents=True)
    (tmp_path / "out" / "_commits" / "x.json").write_text("{not json")
    code, err = run_cli(capsys, *good_args)
    assert code == 2
    assert_one_line(err, "output.uri", "_commits/x.json is not a valid record")


def test_console_script_prints_no_traceback(tmp_path):
    """The real entry point, in its own process: exit 2, one line on stderr, nothing on stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--input", "ftp://host/x", "--output", str(tmp_path),
         "--model", "resnet18"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert_one_line(result.stderr, "input.uri", "scheme 'ftp://' is not supported")


def test_binary_file_as_spec(capsys, tmp_path):
    spec = tmp_path / "model.pt"
    spec.write_bytes(b"\x80\x02\xff\xfe binary")
    code, err = run_cli(capsys, str(spec))
    assert code == 2
    assert_one_line(err, "not a text file")


@pytest.mark.parametrize("endpoint", ["http://", "http://my host:9000", "ftp://x"])
def test_malformed_endpoint(capsys, good_args, tmp_path, endpoint):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"storage: {{endpoint_url: '{endpoint}'}}\n")
    code, err = run_cli(capsys, str(spec), *with_flag(good_args, "--input", "s3://some-bucket/x/"))
    assert code == 2
    assert_one_line(err, "storage.endpoint_url", "http:// or https:// URL")


def test_output_that_cannot_be_written(capsys, good_args, tmp_path):
    (tmp_path / "a-file").write_text("x")
    code, err = run_cli(capsys, *with_flag(good_args, "--output", str(tmp_path / "a-file" / "out")))
    assert code == 2
    assert_one_line(err, "output.uri", "cannot write to")


def test_custom_builder_that_raises(capsys, good_args, tmp_path, monkeypatch):
    (tmp_path / "broken_models.py").write_text("def build():\n    raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = with_flag(good_args, "--model", "broken_models:build")
    code, err = run_cli(capsys, *args[: args.index("--weights")])
    assert code == 2
    assert_one_line(err, "model.name", "raised RuntimeError: no GPU here")


@pytest.mark.parametrize("spec, words", [
    ("dicom: {include_tags: [PatientAg]}", ["dicom.include_tags", "'PatientAg' is not a DICOM keyword",
                                           "did you mean 'PatientAge'"]),
    ("dicom: {include_tags: [PixelData]}", ["dicom.include_tags", "binary"]),
    ("dicom: {window: lungs}", ["dicom.window"]),
    ("dicom: {window: {center: 40, width: 0}}", ["dicom.window", "width"]),
    ("output: {partitioning: Modality}", ["output.partitioning", "string column"]),
    ("output: {partitioning: modality}", ["output.partitioning", "'modality' is not a string column",
                                           "label"]),
    ("model: {input_channels: 2}", ["model.input_channels"]),
])
def test_dicom_and_partitioning_mistakes(capsys, tmp_path, good_args, spec, words):
    (tmp_path / "job.yaml").write_text(spec + "\n")
    code, err = run_cli(capsys, str(tmp_path / "job.yaml"), *good_args)
    assert code == 2
    assert_one_line(err, *words)


def test_grey_channels_that_do_not_fit_the_checkpoint(capsys, tmp_path, good_args):
    (tmp_path / "job.yaml").write_text("model: {input_channels: 1}\n")
    code, err = run_cli(capsys, str(tmp_path / "job.yaml"), *good_args)
    assert code == 2
    assert_one_line(err, "model.input_channels", "(conv1) takes 3 channel(s), not 1", "'auto'")
