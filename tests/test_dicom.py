"""DICOM decoding: modality LUT then VOI, MONOCHROME1, frames as rows, transfer syntaxes, errors without patient data;
16-bit PNG/TIFF keep their range; channels for 1- and 3-channel models."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image
from pydicom.uid import JPEGLosslessSV1

from conftest import encode, encoded_batch, photo
from dicom_files import PHI, dicom_bytes, png16, shipped
from pipeline.decode.dicom import DicomSettings, Window, read_dicom
from pipeline.privacy.redact import redact_dicom_values
from pipeline.decode.image import Decoder, Preprocess

MAX = 10**8


def batch_of(payloads: list[bytes]) -> dict:
    return {**encoded_batch(payloads, uri="s3://scans/{}.dcm"), "size": np.arange(len(payloads))}


def decode(payloads, preprocess=None, channels=3, **settings) -> dict:
    return Decoder(preprocess, MAX, channels, DicomSettings(**settings))(batch_of(payloads))


def frame(data: bytes, **settings) -> np.ndarray:
    """The first frame's display values, (H, W) uint16."""
    image = read_dicom(data, DicomSettings(**settings), MAX)
    return image.frames[0][1][..., 0]


def hand_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR), output 0..65535."""
    y = np.where(x <= center - 0.5 - (width - 1) / 2, 0.0,
                 np.where(x > center - 0.5 + (width - 1) / 2, 1.0, (x - (center - 0.5)) / (width - 1) + 0.5))
    return np.round(y * 65535).astype(np.uint16)


STORED = np.array([[0, 824, 1004, 1024], [1064, 1224, 1500, 3000]], dtype=np.int16)  # HU = stored - 1024


def test_modality_lut_then_the_files_window_equal_a_hand_computation():
    data = dicom_bytes(STORED, slope=1, intercept=-1024, window=(40, 400))
    np.testing.assert_array_equal(frame(data), hand_window(STORED - 1024.0, 40, 400))
    # Values below, inside and above the window: 0 HU is 0.4 of the way, -200 HU and below black, 240 up white.
    assert frame(data)[0, 1] == 0 and frame(data)[1, 2] == 65535 and 0 < frame(data)[1, 0] < 65535


def test_slope_is_applied_before_the_window():
    data = dicom_bytes(STORED, slope=0.5, intercept=-100, window=(200, 600))
    np.testing.assert_array_equal(frame(data), hand_window(STORED * 0.5 - 100, 200, 600))


@pytest.mark.parametrize("window, center, width", [("lung", -600, 1500), ("brain", 40, 80),
                                                   (Window(-100, 900), -100, 900)])
def test_a_window_from_the_job_overrides_the_files(window, center, width):
    data = dicom_bytes(STORED, slope=1, intercept=-1024, window=(40, 400))
    settings_window = window if isinstance(window, Window) else Window(center, width)
    np.testing.assert_array_equal(frame(data, window=settings_window), hand_window(STORED - 1024.0, center, width))


def test_linear_exact_and_sigmoid_functions_from_the_file():
    hu = STORED - 1024.0
    exact = frame(dicom_bytes(STORED, slope=1, intercept=-1024, window=(40, 400, "LINEAR_EXACT")))
    np.testing.assert_array_equal(exact, np.round(np.clip((hu - 40) / 400 + 0.5, 0, 1) * 65535).astype(np.uint16))
    sigmoid = frame(dicom_bytes(STORED, slope=1, intercept=-1024, window=(40, 400, "SIGMOID")))
    np.testing.assert_array_equal(sigmoid, np.round(65535 / (1 + np.exp(-4 * (hu - 40) / 400))).astype(np.uint16))


def test_without_a_window_the_frame_spans_its_own_range():
    shown = frame(dicom_bytes(STORED, slope=1, intercept=-1024))
    assert shown.min() == 0 and shown.max() == 65535
    np.testing.assert_array_equal(shown, np.round((STORED - 0.0) / 3000 * 65535).astype(np.uint16))


def test_voi_lut_sequence_is_applied_when_the_file_has_no_window():
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]  # 4 entries for stored values 0..3, 16-bit output
    lut.LUTData = np.array([0, 1000, 40000, 65535], dtype="<u2").tobytes()
    data = dicom_bytes(np.array([[0, 1], [2, 3]]), signed=False, VOILUTSequence=Sequence([lut]))
    np.testing.assert_array_equal(frame(data), [[0, 1000], [40000, 65535]])


def test_monochrome1_is_inverted():
    normal = frame(dicom_bytes(STORED, slope=1, intercept=-1024, window=(40, 400)))
    inverted = frame(dicom_bytes(STORED, slope=1, intercept=-1024, window=(40, 400), photometric="MONOCHROME1"))
    np.testing.assert_array_equal(inverted.astype(int), 65535 - normal.astype(int))


def test_values_above_255_survive_to_the_batch():
    batch = decode([dicom_bytes(STORED, slope=1, intercept=-1024, window=(1000, 4000))])
    assert batch["pixels"][0].dtype == np.uint16 and batch["pixels"][0].max() > 255


FRAMES = np.stack([np.full((4, 6), v) for v in (100, 200, 300)])


@pytest.mark.parametrize("frames, expected", [("all", [0, 1, 2]), ("first", [0]), ("middle", [1]),
                                              ((-1,), [2]), ((0, 2, 7), [0, 2])])
def test_each_selected_frame_is_a_row(frames, expected):
    multi = dicom_bytes(FRAMES, window=(200, 200))
    single = dicom_bytes(FRAMES[0])
    batch = decode([multi, single], frames=frames)
    assert list(batch["frame"][:-1]) == expected and batch["frame"][-1] == 0
    assert list(batch["uri"]) == ["s3://scans/0.dcm"] * len(expected) + ["s3://scans/1.dcm"]
    assert list(batch["rows_of_input"]) == [len(expected)] * len(expected) + [1]
    assert list(batch["size"]) == [0] * len(expected) + [1]  # the input's columns go with each of its rows
    assert len(set(batch["sop_instance_uid"][:-1])) == 1 and batch["modality"][0] == "CT"
    means = [float(p.mean()) for p in batch["pixels"][:-1]]
    assert means == sorted(means) and len(set(means)) == len(expected)  # frame order, each its own pixels


def test_frames_outside_the_file_are_an_error_row():
    batch = decode([dicom_bytes(FRAMES)], frames=(5,))
    assert batch["error_type"][0] == "decode.no_frame" and len(batch["uri"]) == 1


def test_enhanced_multiframe_rescale_per_frame():
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def group(slope, intercept):
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = slope, intercept
        item = Dataset()
        item.PixelValueTransformationSequence = Sequence([transform])
        return item

    data = dicom_bytes(np.stack([np.arange(24).reshape(4, 6)] * 2),
                       PerFrameFunctionalGroupsSequence=Sequence([group(1, 0), group(2, -10)]))
    image = read_dicom(data, DicomSettings(window=Window(10, 41)), MAX)
    stored = np.arange(24).reshape(4, 6).astype(float)
    np.testing.assert_array_equal(image.frames[0][1][..., 0], hand_window(stored, 10, 41))
    np.testing.assert_array_equal(image.frames[1][1][..., 0], hand_window(stored * 2 - 10, 10, 41))


# pydicom's shipped files: one image in several transfer syntaxes decodes to the same display values.
MR_SYNTAXES = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
               "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]


def test_every_lossless_syntax_gives_the_same_pixels():
    reference = frame(shipped("MR_small.dcm"))
    assert reference.shape == (64, 64) and reference.max() > 255
    for name in MR_SYNTAXES[1:]:
        np.testing.assert_array_equal(frame(shipped(name)), reference, err_msg=name)


@pytest.mark.parametrize("name, shape", [
    ("CT_small.dcm", (128, 128, 1)), ("JPEG2000.dcm", (1024, 256, 1)), ("693_J2KI.dcm", (512, 512, 1)),
    ("JPEGLSNearLossless_16.dcm", (50, 10, 1)), ("SC_rgb_jpeg_dcmtk.dcm", (100, 100, 3)),
    ("SC_rgb_rle_16bit.dcm", (100, 100, 3)), ("ExplVR_BigEnd.dcm", (60, 80, 3)),
    ("examples_palette.dcm", (350, 800, 3)), ("image_dfl.dcm", (512, 512, 1)), ("GDCMJ2K_TextGBR.dcm", (400, 400, 3)),
])
def test_shipped_files_decode(name, shape):
    image = read_dicom(shipped(name), DicomSettings(), MAX)
    assert image.frames[0][1].shape == shape and image.frames[0][1].std() > 0
    assert image.tags["SOPInstanceUID"]


def test_ct_small_is_windowed_over_its_hounsfield_units():
    from pydicom import dcmread
    from pydicom.pixels import apply_modality_lut

    ds = dcmread(io.BytesIO(shipped("CT_small.dcm")))
    hu = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_array_equal(frame(shipped("CT_small.dcm"), window=Window(40, 400)), hand_window(hu, 40, 400))


def test_colour_frames_keep_their_depth():
    from pydicom import dcmread

    rgb16 = read_dicom(shipped("SC_rgb_rle_16bit.dcm"), DicomSettings(), MAX).frames[0][1]
    np.testing.assert_array_equal(rgb16, dcmread(io.BytesIO(shipped("SC_rgb_rle_16bit.dcm"))).pixel_array)


def test_broken_files_are_error_rows_and_the_rest_decode():
    good = dicom_bytes(STORED, window=(40, 400))
    cut = good[: len(good) - 5]
    garbage = b"\0" * 128 + b"DICM" + bytes(range(256)) * 4
    batch = decode([good, shipped("MR_truncated.dcm"), cut, garbage, shipped("rtplan.dcm"), good])
    types = list(batch["error_type"])
    assert types[0] is None and types[-1] is None
    assert types[1] == types[2] == "decode.truncated"
    assert types[3] in ("decode.corrupt", "decode.not_dicom", "decode.truncated", "decode.no_pixel_data")
    assert types[4] == "decode.no_pixel_data" and "RTPLAN" in batch["error"][4]
    assert batch["modality"][1] == "MR"  # an error row keeps what the header said
    assert len(batch["uri"]) == 6


@pytest.mark.skipif(__import__("importlib").util.find_spec("libjpeg") is not None, reason="a lossless JPEG decoder is installed")
def test_a_syntax_without_a_decoder_names_it_and_the_package():
    batch = decode([shipped("SC_rgb_jpeg_gdcm.dcm"), dicom_bytes(STORED)])
    assert batch["error_type"][0] == "decode.no_decoder" and batch["error"][1] is None
    message = batch["error"][0]
    assert str(JPEGLosslessSV1) in message and "JPEG Lossless" in message
    assert "pylibjpeg-libjpeg" in message and "python-gdcm" in message


def test_a_dicom_file_in_a_job_without_dicom_says_how_to_enable_it():
    batch = Decoder(None, MAX)(batch_of([dicom_bytes(STORED)]))
    assert batch["error_type"][0] == "decode.dicom_not_enabled" and "dicom:" in batch["error"][0]


def test_a_data_set_without_the_preamble_is_read():
    full = dicom_bytes(STORED, window=(40, 400))
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(full))
    raw = io.BytesIO()
    ds.preamble = None
    del ds.file_meta
    ds.save_as(raw, implicit_vr=True, little_endian=True)  # no preamble, no file meta: a bare data set
    assert raw.getvalue()[128:132] != b"DICM"
    batch = decode([raw.getvalue()])
    assert batch["error"][0] is None


def test_messages_never_quote_patient_data():
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(dicom_bytes(STORED, phi=True)))
    message = f"bad value {PHI['PatientName']} in {PHI['InstitutionName']}, id {PHI['PatientID']}"
    redacted = redact_dicom_values(message, ds)
    assert not any(value in redacted for value in PHI.values()) and redacted.startswith("bad value")


def test_tags_are_only_the_keys_unless_allow_listed():
    data = dicom_bytes(STORED, phi=True, BodyPartExamined="CHEST")
    plain = decode([data])
    tag_columns = {k for k in plain if k.endswith("_uid") or k in ("modality", "patient_age", "body_part_examined")}
    assert tag_columns == {"study_instance_uid", "series_instance_uid", "sop_instance_uid", "modality"}
    listed = decode([data], tags=("PatientAge", "BodyPartExamined"))
    assert listed["patient_age"][0] == "078Y" and listed["body_part_examined"][0] == "CHEST"


# 16-bit and scientific images

def test_sixteen_bit_grey_png_and_tiff_keep_their_values():
    values = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
    for fmt in ("PNG", "TIFF"):
        batch = Decoder(None, MAX)(batch_of([encode(Image.fromarray(values), fmt)]))
        pixels = batch["pixels"][0]
        assert pixels.dtype == np.uint16 and pixels.max() > 255, fmt
        np.testing.assert_array_equal(pixels[..., 0], values)
        np.testing.assert_array_equal(pixels[..., 2], values)  # replicated for a 3-channel model


def test_sixteen_bit_colour_png_and_tiff_keep_their_values():
    rgb = (np.random.default_rng(0).integers(0, 65536, (20, 30, 3))).astype(np.uint16)
    tiff = io.BytesIO()
    tifffile.imwrite(tiff, rgb, photometric="rgb")
    for data in (png16(rgb), tiff.getvalue()):
        pixels = Decoder(None, MAX)(batch_of([data]))["pixels"][0]
        np.testing.assert_array_equal(pixels, rgb)


def test_a_batch_with_a_sixteen_bit_image_keeps_eight_bit_ones_exact():
    preprocess = Preprocess(resize_size=32, crop_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    grey16 = encode(Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)), "PNG")
    eight = encode(photo(32, 32), "PNG")
    together = Decoder(preprocess, MAX)(batch_of([grey16, eight]))["pixels"]
    alone = Decoder(preprocess, MAX)(batch_of([eight]))["pixels"]
    assert together.dtype == np.uint16
    np.testing.assert_array_equal(together[1], alone[0].astype(np.uint16) * 257)


def test_one_channel_models_get_luma_and_three_channel_models_replicas():
    preprocess = Preprocess(resize_size=40, crop_size=40, mean=(0.5,), std=(0.5,))
    colour = photo(40, 40)
    grey = Decoder(preprocess, MAX, channels=1)(batch_of([encode(colour, "PNG")]))["pixels"]
    assert grey.shape == (1, 40, 40, 1)
    np.testing.assert_array_equal(grey[0, ..., 0], np.asarray(colour.convert("L")))
    dicom = decode([dicom_bytes(STORED, window=(40, 400))], Preprocess(8, 8, (0.5,) * 3, (0.5,) * 3))["pixels"]
    assert dicom.shape == (1, 8, 8, 3) and (dicom[..., 0] == dicom[..., 2]).all()


def test_a_one_channel_model_sees_the_sixteen_bit_values_normalised(tmp_path):
    import torch
    import torchvision

    from pipeline.job.config import ModelConfig
    from pipeline.models.resolve import _fit_stem, build_model, resolve_model
    from pipeline.models.classify import Classifier
    from pipeline.io.storage import Storage

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    _fit_stem(model, 1, None)
    torch.save(model.state_dict(), tmp_path / "grey.pt")
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    spec = resolve_model(ModelConfig(name="resnet18", weights=str(tmp_path / "grey.pt"),
                                     labels=str(tmp_path / "labels.txt"), top_k=3,
                                     preprocess={"resize_size": 32, "crop_size": 32, "mean": [0.5], "std": [0.25]}),
                         Storage.from_env())
    assert spec.input_channels == 1  # read from the checkpoint
    ramp = (np.arange(32 * 32).reshape(32, 32) * 3).astype(np.int16)
    pixels = decode([dicom_bytes(ramp, window=(1500, 3000))], spec.preprocess, channels=1)["pixels"]
    assert pixels.shape == (1, 32, 32, 1) and pixels.dtype == np.uint16
    scores, indexes, _ = Classifier(spec, Storage.from_env(), channels_last=False).infer(pixels)
    x = (torch.from_numpy(pixels.astype(np.float32)).permute(0, 3, 1, 2) / 65535 - 0.5) / 0.25
    with torch.inference_mode():
        expected = torch.softmax(build_model(spec, Storage.from_env())(x), dim=1)[0]
    np.testing.assert_allclose(scores[0], expected[indexes[0]].numpy(), rtol=1e-4, atol=1e-6)
