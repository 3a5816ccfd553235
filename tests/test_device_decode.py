"""The GPU code paths, run on the CPU: batched JPEG decode (TorchCodec; torchvision's if it cannot load) with
per-image fallback, decoding inside the model actor, and halving the batch on CUDA out-of-memory. Tests
marked `gpu` run the same on a GPU."""

import importlib
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.decode
from conftest import encode, encoded_batch as as_batch, photo
from pipeline.decode import device as device_decode
from pipeline.decode.device import DeviceDecoder
from pipeline.decode.image import Decoder, Preprocess
from pipeline.io.storage import Storage
from pipeline.models.classify import Classifier
from pipeline.models.resolve import resolve_model
from pipeline.job.stage import Resources
from pipeline.models.inference import ModelInference
from pipeline.job.config import ComputeConfig, ModelConfig

PREPROCESS = Preprocess(resize_size=64, crop_size=56, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
needs_gpu = pytest.mark.gpu
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")



def rotated_jpeg(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: displayed rotated 90 degrees clockwise
    return encode(photo(80, 40, seed=4), "JPEG", exif=exif.tobytes(), quality=95)


def mixed_inputs() -> dict[str, bytes]:
    jpeg = encode(photo(96, 72, seed=1), "JPEG", quality=95)
    return {
        "jpeg": jpeg,
        "grey jpeg": encode(photo(70, 90, seed=2).convert("L"), "JPEG", quality=95),
        "cmyk jpeg": encode(photo(64, 64, seed=3).convert("CMYK"), "JPEG", quality=95),
        "exif-rotated jpeg": rotated_jpeg(),
        "png": encode(photo(50, 60, seed=5), "PNG"),
        "truncated jpeg": jpeg[: len(jpeg) // 3],
        "empty": b"",
        "text": b"not an image at all",
    }


def decode_both(device: str, max_image_pixels: int = 10**8, device_decoder=DeviceDecoder):
    inputs = mixed_inputs()
    decoder = device_decoder(Decoder(PREPROCESS, max_image_pixels), torch.device(device))
    on_device = decoder(as_batch(list(inputs.values())))
    pixels = on_device.pop("pixels")
    on_cpu = Decoder(PREPROCESS, max_image_pixels)(as_batch(list(inputs.values())))
    return list(inputs), on_device, pixels.cpu().numpy(), on_cpu


def check_agrees_with_cpu_decoder(device: str, device_decoder=DeviceDecoder) -> None:
    names, on_device, pixels, on_cpu = decode_both(device, device_decoder=device_decoder)
    assert pixels.shape == (len(names), 56, 56, 3) and pixels.dtype == np.uint8
    assert list(on_device["error_type"]) == list(on_cpu["error_type"])
    assert list(on_device["error"]) == list(on_cpu["error"])
    assert list(on_device["image_width"]) == list(on_cpu["image_width"])
    assert list(on_device["image_height"]) == list(on_cpu["image_height"])
    for i, name in enumerate(names):
        if on_cpu["error"][i] is None:
            # Resampling on the device is antialiased bilinear like Pillow's, not bit-identical to it.
            difference = np.abs(pixels[i].astype(int) - on_cpu["pixels"][i].astype(int)).mean()
            assert difference < 4, f"{name}: mean difference {difference:.1f} grey levels"


def test_device_decoder_on_cpu_agrees_with_the_pillow_decoder():
    """Every row accounted for: JPEGs decoded by TorchCodec in one batch, the rest (CMYK, PNG, broken) through
    Pillow."""
    assert device_decode.BACKEND == "torchcodec", "torchcodec did not load: the device path runs on torchvision's"
    check_agrees_with_cpu_decoder("cpu")


def test_without_torchcodec_the_device_decoder_falls_back_to_torchvision(monkeypatch):
    """A process where torchcodec cannot load warns once and decodes with torchvision, to the same rows."""
    monkeypatch.setitem(sys.modules, "torchcodec", None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    monkeypatch.delitem(sys.modules, "pipeline.decode.device")  # restored, with the package attribute, afterwards
    monkeypatch.setattr(pipeline.decode, "device", device_decode)
    with pytest.warns(RuntimeWarning, match="torchcodec did not load") as warned:
        fallback = importlib.import_module("pipeline.decode.device")
    assert fallback.BACKEND == "torchvision" and len(warned) == 1
    check_agrees_with_cpu_decoder("cpu", device_decoder=fallback.DeviceDecoder)


def test_every_exif_orientation_matches_pillow_on_the_device_path():
    """TorchCodec applies EXIF orientation itself; each of the eight must show the image as Pillow's
    exif_transpose does (compared at full size, where a wrong flip or turn cannot hide)."""
    inputs = [rotated_jpeg(orientation) for orientation in range(1, 9)]
    pixels = DeviceDecoder(Decoder(None, 10**8), torch.device("cpu"))(as_batch(inputs))["pixels"]
    pillow = Decoder(None, 10**8)(as_batch(inputs))
    for orientation, image, expected in zip(range(1, 9), pixels, pillow["pixels"]):
        assert image.shape == expected.shape, f"orientation {orientation}"
        difference = np.abs(image.numpy().astype(int) - expected.astype(int)).mean()
        assert difference < 1, f"orientation {orientation}: mean difference {difference:.1f} grey levels"


def test_exif_rotation_applies_on_the_device_path():
    names, on_device, _, _ = decode_both("cpu")
    i = names.index("exif-rotated jpeg")
    assert (on_device["image_width"][i], on_device["image_height"][i]) == (40, 80)


def test_one_broken_jpeg_does_not_fail_the_batched_decode():
    good = [encode(photo(96, 72, seed=s), "JPEG") for s in range(3)]
    broken = good[0][:200] + b"\xff\xd9"  # a header that opens, then no image data
    with pytest.raises(RuntimeError, match="incomplete or truncated"):  # TorchCodec fails the whole call
        device_decode.decode_jpeg([good[0], broken], device="cpu")
    batch = DeviceDecoder(Decoder(PREPROCESS, 10**8), torch.device("cpu"))(as_batch([good[0], broken, good[1], good[2]]))
    pixels = batch.pop("pixels")
    assert [e is None for e in batch["error"]] == [True, False, True, True]
    assert batch["error_type"][1].startswith("decode.")
    assert pixels[[0, 2, 3]].float().std() > 10 and not pixels[1].any()


def test_pixel_limit_applies_before_the_device_decodes():
    big = encode(Image.new("RGB", (1500, 1000), (90, 90, 90)), "JPEG")
    batch = DeviceDecoder(Decoder(PREPROCESS, 1_000_000), torch.device("cpu"))(as_batch([big]))
    assert batch["error_type"][0] == "decode.too_many_pixels"


def test_a_sixteen_bit_image_among_jpegs_keeps_its_depth_on_the_device_path():
    jpegs = [encode(photo(96, 72, seed=s), "JPEG") for s in range(2)]
    deep = encode(Image.fromarray((np.arange(72 * 96).reshape(72, 96) * 9).astype(np.uint16)), "PNG")
    pixels = DeviceDecoder(Decoder(PREPROCESS, 10**8), torch.device("cpu"))(as_batch([jpegs[0], deep, jpegs[1]]))["pixels"]
    eight = DeviceDecoder(Decoder(PREPROCESS, 10**8), torch.device("cpu"))(as_batch(jpegs))["pixels"]
    assert pixels.dtype == torch.uint16 and pixels[1].to(torch.int32).max() > 255
    assert torch.equal(pixels[[0, 2]].to(torch.int32), eight.to(torch.int32) * 257)


def test_dicom_frames_become_rows_on_the_device_path():
    from dicom_files import dicom_bytes
    from pipeline.decode.dicom import DicomSettings

    frames = np.stack([np.full((40, 40), v) for v in (10, 20)])
    cpu = Decoder(PREPROCESS, 10**8, dicom=DicomSettings())
    batch = DeviceDecoder(cpu, torch.device("cpu"))(as_batch([dicom_bytes(frames), encode(photo(), "JPEG")]))
    pixels = batch.pop("pixels")
    assert list(batch["frame"][:2]) == [0, 1] and np.isnan(batch["frame"][2]) and pixels.shape[0] == 3
    assert pixels.dtype == torch.uint16 and len(batch["uri"]) == 3


@pytest.fixture(scope="module")
def spec(classifier_files):
    return resolve_model(ModelConfig(name="resnet18", weights=classifier_files["weights"],
                                     labels=classifier_files["labels"], top_k=3,
                                     preprocess={"resize_size": 64, "crop_size": 56}), Storage.from_env())


def test_actor_that_decodes_for_itself_predicts_like_decode_tasks(spec):
    """The CPU-only plan (decode inside the actor) and the decode-tasks plan give the same rows; asking for
    device decoding on a CPU actor falls back to Pillow."""
    inputs = list(mixed_inputs().values())
    decoder = Decoder(spec.preprocess, 10**8)
    separate = Classifier(spec, Storage.from_env())(decoder(as_batch(inputs)))
    inside = model_stage(spec, decoder=decoder, decode_on_device=True)(as_batch(inputs))
    assert list(inside["error_type"]) == list(separate["error_type"])
    assert list(inside["label"]) == list(separate["label"])
    ok = [e is None for e in separate["error"]]
    np.testing.assert_allclose(inside["score"][ok], separate["score"][ok], atol=1e-5)
    assert "bytes" not in inside and "pixels" not in inside


class RunsOutOfMemoryAbove(torch.nn.Module):
    """Raises CUDA's out-of-memory error, as a GPU would, for batches larger than `limit`."""

    def __init__(self, model: torch.nn.Module, limit: int):
        super().__init__()
        self.model, self.limit, self.sizes = model, limit, []

    def forward(self, x):
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


def test_out_of_memory_halves_the_batch_and_keeps_it_halved(spec):
    pixels = np.random.default_rng(0).integers(0, 255, (8, 56, 56, 3), dtype=np.uint8)
    expected = Classifier(spec, Storage.from_env()).infer(pixels)
    classifier = Classifier(spec, Storage.from_env())
    classifier.model = RunsOutOfMemoryAbove(classifier.model, limit=3)
    scores, indexes, _ = classifier.infer(pixels)
    np.testing.assert_allclose(scores, expected[0], atol=1e-5)
    assert (indexes == expected[1]).all()
    assert classifier.max_batch == 2 and classifier.model.sizes == [8, 4, 2, 2, 2, 2]
    classifier.infer(pixels)
    assert classifier.model.sizes[6:] == [2, 2, 2, 2]  # later batches start at the size that fitted


def test_out_of_memory_on_one_image_is_an_error_row_not_a_failed_job(spec):
    classifier = Classifier(spec, Storage.from_env())
    classifier.model = RunsOutOfMemoryAbove(classifier.model, limit=0)
    out = classifier(Decoder(spec.preprocess, 10**8)(as_batch([encode(photo(), "JPEG"), b""])))
    assert list(out["error_type"]) == ["model.out_of_memory", "decode.empty"]
    assert out["label"][0] is None


@needs_gpu
@gpu_only
def test_device_decoder_on_gpu_agrees_with_the_pillow_decoder():
    check_agrees_with_cpu_decoder("cuda")


@needs_gpu
@gpu_only
def test_gpu_actor_decodes_jpegs_on_the_gpu(spec):
    inputs = list(mixed_inputs().values())
    classifier = model_stage(spec, decoder=Decoder(spec.preprocess, 10**8),
                            decode_on_device=True)
    assert isinstance(classifier.decode, DeviceDecoder)
    out = classifier(as_batch(inputs))
    cpu = Classifier(spec, Storage.from_env())(Decoder(spec.preprocess, 10**8)(as_batch(inputs)))
    assert list(out["error_type"]) == list(cpu["error_type"])
    assert sum(e is None for e in out["error"]) == 5


def test_gpu_decoding_without_gpus_is_refused_in_one_line(ray_session, tmp_path, classifier_files):
    import io

    from pipeline.job.config import load_job
    from pipeline.job.errors import UserError
    from pipeline.ray.executor import run_on_ray

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(encode(photo(), "JPEG"))
    cfg = load_job(None, {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), **classifier_files})
    cfg.decode.device = "gpu"
    with pytest.raises(UserError, match=r"decode.device: 'gpu' but the model actors get no GPU"):
        run_on_ray(cfg, out=io.StringIO())


def model_stage(spec, decoder, decode_on_device: bool = False, **options) -> ModelInference:
    """The model stage as a model process runs it, set up: on a GPU process when `decode_on_device`."""
    stage = ModelInference(spec, Storage.from_env(), Resources(gpus=1.0 if decode_on_device else 0.0), decoder,
                           **options)
    stage.setup()
    return stage
