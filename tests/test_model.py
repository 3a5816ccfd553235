"""Model resolution and the model stage, without Ray."""

import numpy as np
import pytest
import torch

from pipeline.io.storage import Storage
from pipeline.models.classify import Classifier
from pipeline.models.resolve import resolve_model
from pipeline.job.config import ModelConfig
from pipeline.job.errors import UserError


def test_weights_metadata_sets_preprocessing_and_labels(cached_imagenet_resnet18):
    spec = resolve_model(ModelConfig(name="resnet18", weights="IMAGENET1K_V1"), Storage.from_env())
    assert (spec.preprocess.resize_size, spec.preprocess.crop_size) == (256, 224)
    assert spec.preprocess.mean == (0.485, 0.456, 0.406)
    assert len(spec.labels) == 1000 and spec.weights_id == "ResNet18_Weights.IMAGENET1K_V1"


def test_spec_overrides_preprocessing(classifier_files):
    cfg = ModelConfig(name="resnet18", weights=classifier_files["weights"], labels=classifier_files["labels"],
                      preprocess={"resize_size": 160, "crop_size": 128})
    spec = resolve_model(cfg, Storage.from_env())
    assert (spec.preprocess.resize_size, spec.preprocess.crop_size) == (160, 128)
    assert spec.preprocess.std == (0.229, 0.224, 0.225)  # unset fields keep the ImageNet defaults


def test_crop_larger_than_resize_is_refused(classifier_files):
    cfg = ModelConfig(name="resnet18", weights=classifier_files["weights"], labels=classifier_files["labels"],
                      preprocess={"resize_size": 100, "crop_size": 224})
    with pytest.raises(UserError, match="crop_size 224 is larger than resize_size 100"):
        resolve_model(cfg, Storage.from_env())


def test_training_checkpoints_are_unwrapped(tmp_path, classifier_files):
    """{'state_dict': ...} with DataParallel's 'module.' prefixes loads like a bare state_dict."""
    state = torch.load(classifier_files["weights"], weights_only=True)
    wrapped = tmp_path / "trainer.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    bare = resolve_model(ModelConfig(name="resnet18", weights=classifier_files["weights"],
                                     labels=classifier_files["labels"]), Storage.from_env())
    spec = resolve_model(ModelConfig(name="resnet18", weights=str(wrapped), labels=classifier_files["labels"]),
                         Storage.from_env())
    pixels = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)
    a = Classifier(bare, Storage.from_env()).infer(pixels)
    b = Classifier(spec, Storage.from_env()).infer(pixels)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)


def test_custom_model_without_labels_names_classes_by_index():
    spec = resolve_model(ModelConfig(name="pipeline.dev.demo:build_lenet",
                                     preprocess={"resize_size": 32, "crop_size": 32}), Storage.from_env())
    assert spec.labels == tuple(str(i) for i in range(10)) and spec.weights_id == "none"


def classify(spec, **options) -> dict:
    classifier = Classifier(spec, Storage.from_env(), **options)
    pixels = np.random.default_rng(1).integers(0, 255, (3, 224, 224, 3), dtype=np.uint8)
    return classifier({"uri": np.array(["a", "b", "c"], dtype=object), "pixels": pixels,
                       "error": np.array([None, "decode: broken", None], dtype=object),
                       "error_type": np.array([None, "decode.corrupt", None], dtype=object)})


def test_failed_rows_pass_through_and_pixels_are_dropped(classifier_files):
    spec = resolve_model(ModelConfig(name="resnet18", weights=classifier_files["weights"],
                                     labels=classifier_files["labels"], top_k=2), Storage.from_env())
    out = classify(spec)
    assert "pixels" not in out
    assert out["label"][1] is None and np.isnan(out["score"][1]) and out["topk_labels"][1] is None
    assert out["label"][0] in spec.labels and len(out["topk_scores"][0]) == 2
    assert out["topk_scores"][0][0] >= out["topk_scores"][0][1]


def test_channels_last_gives_the_same_predictions(classifier_files):
    spec = resolve_model(ModelConfig(name="resnet18", weights=classifier_files["weights"],
                                     labels=classifier_files["labels"]), Storage.from_env())
    plain, fast = classify(spec, channels_last=False), classify(spec, channels_last=True)
    assert list(plain["label"]) == list(fast["label"])
    np.testing.assert_allclose(plain["score"][[0, 2]], fast["score"][[0, 2]], atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_autocast_agrees_with_fp32(classifier_files, precision):
    spec = resolve_model(ModelConfig(name="resnet18", weights=classifier_files["weights"],
                                     labels=classifier_files["labels"]), Storage.from_env())
    reference, mixed = classify(spec), classify(spec, precision=precision, channels_last=True)
    assert list(reference["label"]) == list(mixed["label"])
    np.testing.assert_allclose(reference["score"][[0, 2]], mixed["score"][[0, 2]], atol=2e-2)


def test_labels_that_do_not_match_the_model(tmp_path, cached_imagenet_resnet18):
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    cfg = ModelConfig(name="resnet18", weights="IMAGENET1K_V1", labels=str(tmp_path / "labels.txt"))
    with pytest.raises(UserError, match="model.labels: 3 labels, but resnet18 outputs 1000 classes"):
        resolve_model(cfg, Storage.from_env())


def test_input_size_the_model_rejects():
    cfg = ModelConfig(name="pipeline.dev.demo:build_lenet", preprocess={"resize_size": 64, "crop_size": 64})
    with pytest.raises(UserError, match="model.preprocess: pipeline.dev.demo:build_lenet fails on a 3x64x64 input"):
        resolve_model(cfg, Storage.from_env())


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "mobilenet_v3_large"])
def test_any_torchvision_architecture_with_a_checkpoint(tmp_path, name):
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(name, num_classes=3).state_dict(), tmp_path / "ckpt.pt")
    (tmp_path / "labels.txt").write_text("x\ny\nz\n")
    spec = resolve_model(ModelConfig(name=name, weights=str(tmp_path / "ckpt.pt"), labels=str(tmp_path / "labels.txt"),
                                     preprocess={"resize_size": 72, "crop_size": 64}), Storage.from_env())
    pixels = np.random.default_rng(2).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    scores, indexes, _ = Classifier(spec, Storage.from_env()).infer(pixels)
    assert scores.shape == (2, 3) and np.allclose(scores.sum(axis=1), 1, atol=1e-5)


def test_preprocessing_follows_each_weights_metadata():
    import torchvision

    from pipeline.models.resolve import resolve_preprocess

    weights = torchvision.models.EfficientNet_B3_Weights.IMAGENET1K_V1
    p = resolve_preprocess({}, weights)
    assert (p.resize_size, p.crop_size, p.interpolation) == (320, 300, "bicubic")
