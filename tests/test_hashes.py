"""Content hashes on every row: `content_hash` (BLAKE2b-128 of the bytes, of the pixels for a DICOM frame) and
`phash` (imagehash's pHash of the upright image), as hashlib and imagehash compute them; outputs written before
these columns existed take appends in all three formats."""

from __future__ import annotations

import hashlib
import io

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from PIL import Image, ImageFilter
from pydicom.uid import RLELossless

from conftest import encode, encoded_batch, photo
from dicom_files import dicom_bytes
from pipeline.cli.commands import main
from pipeline.decode.dicom import DicomSettings
from pipeline.decode.hashes import content_hash, hamming, perceptual_hash
from pipeline.decode.image import Decoder, Preprocess
from pipeline.job import rows as row_schema
from pipeline.job.config import load_job
from pipeline.run.inline import InlineExecutor
from pipeline.run.job import run_job

PREPROCESS = Preprocess(resize_size=64, crop_size=56, mean=(0.5,) * 3, std=(0.5,) * 3)
# Pillow's steps that store an upright image so that EXIF orientation N shows it upright again.
STORED_AS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_270}


def signed(h: imagehash.ImageHash) -> int:
    value = int(str(h), 16)
    return value - (1 << 64) if value >= 1 << 63 else value


def test_the_helpers_equal_hashlib_and_imagehash():
    image = photo(90, 70, seed=3)
    assert content_hash(b"abc") == hashlib.blake2b(b"abc", digest_size=16).hexdigest()
    assert perceptual_hash(image) == signed(imagehash.phash(image))
    grey16 = np.asarray(image.convert("L"), dtype=np.uint16) * 257
    assert perceptual_hash(grey16) == signed(imagehash.phash(image.convert("L")))
    a = np.array([perceptual_hash(image), -1, 0], dtype=np.int64)
    assert hamming(a, np.array([perceptual_hash(image), 0, 0])).tolist() == [0, 64, 0]


def test_a_12_megapixel_photo_is_reduced_before_hashing_and_keeps_its_hash_but_a_few_bits():
    big = photo(200, 150, seed=4).filter(ImageFilter.GaussianBlur(3)).resize((4000, 3000), Image.Resampling.BICUBIC)
    assert hamming(perceptual_hash(big), signed(imagehash.phash(big))) <= 6


def test_decoded_rows_carry_the_hashes_of_their_bytes_and_images():
    payloads = [encode(photo(seed=1), "PNG"), encode(photo(seed=2), "JPEG"), encode(photo(seed=2), "JPEG")[:300]]
    batch = Decoder(PREPROCESS, 10**8)(encoded_batch(payloads))
    assert list(batch["content_hash"]) == [hashlib.blake2b(p, digest_size=16).hexdigest() for p in payloads]
    expected = [signed(imagehash.phash(Image.open(io.BytesIO(p)))) for p in payloads[:2]]
    assert [int(p) for p in batch["phash"][:2]] == expected
    assert batch["error_type"][2] == "decode.truncated" and batch["phash"][2] is None


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_an_exif_rotated_copy_gets_the_phash_of_the_upright_image(orientation):
    upright = photo(96, 64, seed=5)
    exif = Image.Exif()
    exif[0x0112] = orientation
    turned = encode(upright.transpose(STORED_AS[orientation]), "PNG", exif=exif.tobytes())
    batch = Decoder(PREPROCESS, 10**8)(encoded_batch([encode(upright, "PNG"), turned]))
    assert batch["phash"][0] == batch["phash"][1] == str(signed(imagehash.phash(upright)))
    assert batch["content_hash"][0] != batch["content_hash"][1]


def test_dicom_frames_hash_their_pixels_not_their_tags_or_encoding():
    rng = np.random.default_rng(0)
    frames = rng.integers(-1000, 1000, (3, 32, 40)).astype(np.int16)
    plain = dicom_bytes(frames, window=(0, 2000))
    other = dicom_bytes(frames, window=(0, 2000), modality="MR", syntax=RLELossless)  # new UIDs, tags, encoding
    decoder = Decoder(None, 10**8, dicom=DicomSettings())
    batch = decoder(encoded_batch([plain, other]))
    pixel_hashes = [hashlib.blake2b(frame.tobytes(), digest_size=16).hexdigest() for frame in frames]
    assert list(batch["content_hash"]) == pixel_hashes * 2
    assert list(batch["phash"][:3]) == list(batch["phash"][3:]) and len(set(batch["phash"][:3])) == 3


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(encode(photo(seed=i), "PNG"))
    (folder / "truncated.jpg").write_bytes(encode(photo(seed=9), "JPEG")[:300])
    return folder


def read_rows(output: str, fmt: str) -> list[dict]:
    """The output's rows through its format's own reader."""
    if fmt == "delta":
        from deltalake import DeltaTable

        return DeltaTable(output).to_pyarrow_table().to_pylist()
    if fmt == "iceberg":
        from pyiceberg.catalog import load_catalog

        catalog = load_catalog("pipeline", type="sql", uri=f"sqlite:///{output}/_catalog/iceberg.db")
        return catalog.load_table("default.predictions").scan().to_arrow().to_pylist()
    files = pads.dataset(output, format="parquet")  # older files lack the new columns: read by their union
    schema = pa.unify_schemas([fragment.physical_schema for fragment in files.get_fragments()])
    return pads.dataset(output, format="parquet", schema=schema).to_table().to_pylist()


def run(classifier_files, input_uri: str, output: str, fmt: str):
    cfg = load_job(None, {"input": input_uri, "output": output, **classifier_files})
    cfg.output.format = fmt
    return run_job(cfg, InlineExecutor(), io.StringIO())


def test_rows_hold_the_hashes_and_a_failed_row_no_phash(classifier_files, inputs, tmp_path):
    manifest = tmp_path / "manifest.csv"
    names = ["0.png", "1.png", "truncated.jpg", "gone.png"]
    manifest.write_text("uri\n" + "".join(f"{inputs / name}\n" for name in names))
    run(classifier_files, str(manifest), str(tmp_path / "out"), "parquet")
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in read_rows(str(tmp_path / "out"), "parquet")}
    for name in ("0.png", "1.png"):
        data = (inputs / name).read_bytes()
        assert rows[name]["content_hash"] == hashlib.blake2b(data, digest_size=16).hexdigest()
        assert rows[name]["phash"] == signed(imagehash.phash(Image.open(io.BytesIO(data))))
    truncated = (inputs / "truncated.jpg").read_bytes()
    assert rows["truncated.jpg"]["content_hash"] == content_hash(truncated) and rows["truncated.jpg"]["phash"] is None
    assert rows["gone.png"]["error_type"].startswith("read.") and rows["gone.png"]["content_hash"] is None
    assert rows["gone.png"]["phash"] is None and rows["0.png"]["reused_from"] is None


@pytest.mark.parametrize("fmt", ["parquet", "delta", "iceberg"])
def test_an_output_written_before_the_hash_columns_takes_appends(classifier_files, inputs, tmp_path, monkeypatch,
                                                                 capsys, fmt):
    output = str(tmp_path / "out")
    with monkeypatch.context() as before:  # the schema as it was before these columns
        before.setattr(row_schema, "CONTENT_COLUMNS", [])
        first = run(classifier_files, str(inputs), output, fmt)
    assert "content_hash" not in pa.Table.from_pylist(read_rows(output, fmt)).column_names
    (inputs / "new.png").write_bytes(encode(photo(seed=7), "PNG"))
    summary = run(classifier_files, str(inputs), output, fmt)
    assert (summary.status, summary.inputs) == ("completed", 1)
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in read_rows(output, fmt)}
    assert len(rows) == 5 and rows["new.png"]["content_hash"] == content_hash((inputs / "new.png").read_bytes())
    assert rows["0.png"]["content_hash"] is None and rows["0.png"]["phash"] is None
    # `pipeline runs` and `pipeline report` read the table whose rows differ in columns
    assert main(["runs", output, "--no-listing"]) == 0 and first.run_id in capsys.readouterr().out
    assert main(["report", output, "--against", first.run_id, "-o", str(tmp_path / "report.html")]) == 0


def test_the_device_decoder_hashes_as_the_pillow_decoder_does():
    import torch

    from pipeline.decode.device import DeviceDecoder

    payloads = [encode(photo(96, 72, seed=s), "JPEG", quality=95) for s in range(4)] + [
        encode(photo(seed=8), "PNG"), b"not an image"]
    on_device = DeviceDecoder(Decoder(PREPROCESS, 10**8), torch.device("cpu"))(encoded_batch(payloads))
    on_cpu = Decoder(PREPROCESS, 10**8)(encoded_batch(payloads))
    assert list(on_device["content_hash"]) == list(on_cpu["content_hash"])
    assert on_device["phash"][4] == on_cpu["phash"][4] and on_device["phash"][5] is None
    # JPEGs: made small on the device (bicubic, not imagehash's Lanczos): the same hash but for a few bits
    distances = hamming(on_device["phash"][:4].astype(np.int64), on_cpu["phash"][:4].astype(np.int64))
    assert distances.max() <= 6


@pytest.mark.parametrize("fmt", ["parquet", "delta", "iceberg"])
def test_a_committed_row_is_copied_to_new_keys_of_its_bytes_in_every_format(classifier_files, inputs, tmp_path, fmt):
    output = str(tmp_path / "out")
    first = run(classifier_files, str(inputs), output, fmt)
    (inputs / "copy of 1.png").write_bytes((inputs / "1.png").read_bytes())
    (inputs / "copy of truncated.jpg").write_bytes((inputs / "truncated.jpg").read_bytes())  # an error: no source
    second = run(classifier_files, str(inputs), output, fmt)
    assert (second.inputs, second.reused) == (2, 1)
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in read_rows(output, fmt)}
    copy, source = rows["copy of 1.png"], rows["1.png"]
    assert (copy["reused_from"], copy["reused_run"]) == (source["uri"], first.run_id)
    assert (copy["label"], copy["score"], copy["topk_labels"]) == (source["label"], source["score"],
                                                                    source["topk_labels"])
    assert rows["copy of truncated.jpg"]["error_type"] == "decode.truncated"


def test_a_lost_claim_leaves_the_content_and_its_copies_in_the_batch_to_the_driver():
    from pipeline.models.reuse import COMMITTED, ContentReuse

    reuse = ContentReuse(np.array([], dtype="S16"))
    reuse.claim = lambda contents, uris: [c != content_hash(b"b") for c in contents]  # another process has b
    n = 4
    batch = {"uri": np.array(["a1", "b1", "a2", "b2"], dtype=object),
             "content_hash": np.array([content_hash(x) for x in (b"a", b"b", b"a", b"b")], dtype=object),
             "error": np.full(n, None, dtype=object), "error_type": np.full(n, None, dtype=object)}
    copies = reuse.mark(batch)
    assert list(batch["reused_from"]) == [None, COMMITTED, "a1", COMMITTED] and copies == [(2, 0)]


def test_known_content_is_the_rows_digests_and_none_past_its_limit(tmp_path):
    """The digests every model process holds: decoded from any string layout a reader hands out, without error
    rows or a pseudonymised job's tokens; past the limit, none (copies from earlier runs give way to memory)."""
    import pyarrow.parquet as pq

    from pipeline.io.storage import Storage
    from pipeline.output.reuse import ReuseSources, digests

    plain = [content_hash(bytes([i])) for i in range(6)]
    for layout in (pa.string(), pa.large_string(), pa.string_view()):
        assert digests(pa.chunked_array([pa.array(plain, layout)])).tolist() == [bytes.fromhex(h) for h in plain]
    pq.write_table(pa.table({"content_hash": [*plain, "hmac:" + "0" * 64, None],
                             "error": [None] * 5 + ["decode: truncated", None, None]}), tmp_path / "chunk.parquet")
    sources = ReuseSources(staged_files=[str(tmp_path / "chunk.parquet")])
    assert sources.known_content(Storage()).tolist() == sorted(bytes.fromhex(h) for h in plain[:5])
    assert len(sources.known_content(Storage(), limit=4)) == 0
