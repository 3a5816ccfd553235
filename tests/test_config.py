"""The job spec: shape validation with one-line messages that name the field and the fix."""

import re

import pytest
import yaml

from pipeline.job.config import JobConfig, is_weights_name, load_job
from pipeline.job.errors import UserError

MINIMAL = {"input": "s3://bucket/images/", "output": "/tmp/out", "model": "resnet50", "weights": "DEFAULT"}


def write(tmp_path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def test_flags_alone_make_a_job():
    cfg = load_job(None, {**MINIMAL, "batch_size": 8})
    assert cfg.input.uri == "s3://bucket/images/"
    assert cfg.model.weights == "DEFAULT" and cfg.model.checkpoint is None
    assert cfg.compute.batch_size == 8


def test_flags_override_the_spec(tmp_path):
    spec = write(tmp_path, "input: {uri: s3://bucket/b}\noutput: {uri: out}\nmodel: {name: resnet18}\n"
                           "compute: {batch_size: 4}\n")
    cfg = load_job(spec, {"batch_size": 16, "input": None})
    assert cfg.compute.batch_size == 16
    assert cfg.input.uri == "s3://bucket/b"


def test_unknown_key_suggests_the_right_one(tmp_path):
    spec = write(tmp_path, "input: {uri: s3://bucket/b}\noutput: {uri: out}\nmodel: {name: resnet18, wieghts: X}\n")
    with pytest.raises(UserError, match=r"unknown key 'model.wieghts'; did you mean 'weights'\?"):
        load_job(spec, {})


def test_unknown_section(tmp_path):
    spec = write(tmp_path, "input: {uri: s3://bucket/b}\noutput: {uri: out}\nmodel: {name: resnet18}\nmodels: {}\n")
    with pytest.raises(UserError, match="unknown key 'models'; did you mean 'model'"):
        load_job(spec, {})


def test_missing_field_names_the_flag():
    with pytest.raises(UserError, match=r"'input.uri' is required; set it in the spec or pass --input"):
        load_job(None, {"output": "/tmp/out", "model": "resnet50"})
    with pytest.raises(UserError, match=r"'model.name' is required; set it in the spec or pass --model"):
        load_job(None, {"input": "/tmp/in", "output": "/tmp/out"})


@pytest.mark.parametrize("uri, words", [
    ("http://example.com/images", "scheme 'http://' is not supported"),
    ("s3://Bad_Bucket/x", "not a valid s3://bucket/prefix URI"),
    ("s3://", "not a valid s3://bucket/prefix URI"),
    ("gs://A", "not a valid gs://bucket/prefix URI"),
    ("az://my--container/x", "not a valid az://container/prefix URI"),
    ("abfs://photos@Not-An-Account.dfs.core.windows.net/x", "abfs://container@account.dfs.core.windows.net"),
    ("wasbs://photos/x", "use s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or a local path"),
])
def test_malformed_uri(uri, words):
    with pytest.raises(UserError, match=words):
        load_job(None, {**MINIMAL, "input": uri})


@pytest.mark.parametrize("uri", ["gs://photo_archive.example/2026/", "az://photos/in", "abfs://photos/in",
                                 "abfss://photos@archive01.dfs.core.windows.net/in", "file:///data/in"])
def test_every_store_scheme_is_accepted(uri):
    assert load_job(None, {**MINIMAL, "input": uri}).input.uri == uri


def test_bad_values_name_the_field():
    with pytest.raises(UserError, match="'compute.batch_size' Input should be greater than 0"):
        load_job(None, {**MINIMAL, "batch_size": 0})


def test_invalid_yaml_says_where(tmp_path):
    with pytest.raises(UserError, match=r"not valid YAML at line \d+; fix the syntax"):
        load_job(write(tmp_path, "input:\n  uri: [unclosed\n"), {})


def test_missing_spec_file():
    with pytest.raises(UserError, match="cannot read it"):
        load_job("/nonexistent/job.yaml", {})


@pytest.mark.parametrize("spec", ["jobs/nightly_labeling.yaml", "jobs/tag_archive.yaml", "jobs/open_vocabulary_tags.yaml"])
def test_shipped_job_specs_are_valid(spec):
    cfg = load_job(spec, {})
    assert isinstance(cfg, JobConfig)


@pytest.mark.parametrize("model, words", [
    ({"outputs": []}, "'model.outputs' must name at least one of: predictions, embedding"),
    ({"outputs": ["labels"]}, "'model.outputs.0' Input should be 'predictions' or 'embedding'"),
    ({"task": "segmentation"}, "'model.task' Input should be 'auto', 'classification', 'detection' or 'zero_shot'"),
    ({"detection": {"score_threshold": 1.5}}, "'model.detection.score_threshold' Input should be less than or equal to 1"),
])
def test_task_and_output_mistakes_name_the_field(tmp_path, model, words):
    spec = write(tmp_path, yaml.safe_dump({"input": {"uri": "in/"}, "output": {"uri": "out/"},
                                           "model": {"name": "resnet18", **model}}))
    with pytest.raises(UserError, match=re.escape(words)):
        load_job(spec, {})


def test_outputs_are_deduplicated_in_a_fixed_order():
    cfg = load_job(None, MINIMAL)
    cfg.model.outputs = ["embedding", "predictions", "embedding"]
    assert cfg.model.outputs == ["predictions", "embedding"]


@pytest.mark.parametrize("value, is_name", [
    ("IMAGENET1K_V2", True), ("DEFAULT", True), ("ResNet50_Weights.IMAGENET1K_V1", True),
    ("model.pt", False), ("s3://b/ckpt.pth", False), ("./weights/best", False),
])
def test_weights_name_or_file(value, is_name):
    assert is_weights_name(value) is is_name


def test_settings_added_for_model_sources_leave_an_existing_jobs_model_identity_as_it_was():
    """An incremental job written before model sources existed keeps its model key: the new settings join the
    identity only when set (a changed key would redo the whole archive)."""
    from pipeline.job.config import ModelConfig

    before = {"name", "task", "weights", "labels", "outputs", "top_k", "preprocess", "detection", "embedding"}
    assert set(ModelConfig(name="resnet50", weights="DEFAULT").identity()) == before
    tagged = ModelConfig(source="open_clip", name="ViT-B-32", pretrained="openai", labels=["dog"],
                         zero_shot={"templates": ["a {}"]})
    assert {"source", "pretrained", "zero_shot"} <= set(tagged.identity())
    assert tagged.identity() != ModelConfig(source="open_clip", name="ViT-B-32", pretrained="openai",
                                            labels=["dog", "cat"], zero_shot={"templates": ["a {}"]}).identity()
