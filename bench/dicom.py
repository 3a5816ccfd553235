"""DICOM images/s: the decode stage alone per transfer syntax, and whole jobs with 1-channel models.

    .venv/bin/python bench/dicom.py                      # the figures in docs/performance.md
    .venv/bin/python bench/dicom.py --files 200 --models resnet18

Inputs are synthetic 512x512 16-bit CT slices (a smooth body phantom with noise, RescaleIntercept -1024,
a soft-tissue window in the file) written by pydicom in each transfer syntax it can encode here.

1. Decode stage, one core: `Decoder` (read, modality LUT, VOI window, resize 256 + crop 224, 1 channel) over
   the files of each syntax, in this process; frames/s.
2. Whole job: `pipeline run` in a fresh process on N and on 2N uncompressed files in a local folder -> Parquet,
   model = a torchvision architecture with a 1-channel stem and seeded weights; steady images/s =
   N / (t(2N) - t(N)), which cancels Ray's start and model loading (as bench/throughput.py does).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from dicom_files import dicom_bytes  # noqa: E402 - the tests' DICOM writer


def ct_slice(seed: int) -> np.ndarray:
    """Stored values of a 512x512 CT slice: air, a body ellipse of soft tissue, a bone ring, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-256:256, -256:256]
    body = (x / 200.0) ** 2 + (y / 150.0) ** 2 < 1
    bone = ((x / 60.0) ** 2 + (y / 60.0) ** 2 < 1) & ((x / 45.0) ** 2 + (y / 45.0) ** 2 > 1)
    hu = np.where(body, 40.0, -1000.0) + np.where(bone, 700.0, 0.0) + rng.normal(0, 12, (512, 512))
    return np.clip(hu + 1024, 0, 4095).astype(np.uint16)


def write_dicom(pixels: np.ndarray, syntax) -> bytes:
    """A 12-bit CT slice as a scanner stores it: RescaleIntercept -1024, a soft-tissue window in the file."""
    return dicom_bytes(pixels, slope=1, intercept=-1024, window=(40, 400), signed=False, bits_stored=12,
                       syntax=syntax)


def syntaxes() -> dict:
    from pydicom.uid import (JPEG2000Lossless, JPEGLSLossless, ExplicitVRLittleEndian, RLELossless)

    return {"Explicit VR Little Endian": ExplicitVRLittleEndian, "RLE Lossless": RLELossless,
            "JPEG 2000 Lossless": JPEG2000Lossless, "JPEG-LS Lossless": JPEGLSLossless}


def decode_rates(count: int) -> dict[str, float]:
    from pipeline.decode.image import Decoder, Preprocess
    from pipeline.decode.dicom import DicomSettings

    decoder = Decoder(Preprocess(256, 224, (0.5,), (0.25,)), 89_478_485, 1, DicomSettings())
    slices = [ct_slice(i) for i in range(count)]
    rates = {}
    for name, syntax in syntaxes().items():
        try:
            files = [write_dicom(s, syntax) for s in slices]
        except Exception as exc:  # noqa: BLE001 - an encoder this machine lacks
            print(f"{name}: cannot encode here ({type(exc).__name__}: {exc})")
            continue
        data = np.empty(count, dtype=object)
        data[:] = files
        batch = {"uri": np.array([str(i) for i in range(count)], dtype=object), "bytes": data,
                 "error": np.full(count, None, dtype=object), "error_type": np.full(count, None, dtype=object)}
        start = time.perf_counter()
        out = decoder(batch)
        seconds = time.perf_counter() - start
        assert all(e is None for e in out["error"]), out["error"]
        rates[name] = count / seconds
        print(f"decode {name}: {count} frames in {seconds:.2f}s = {rates[name]:.1f} frames/s "
              f"({np.mean([len(f) for f in files]) / 1024:.0f} KiB/file)", flush=True)
    return rates


def job_seconds(model: str, folder: str, count: int, work: str) -> float:
    import torch
    import torchvision

    from pipeline.models.resolve import _fit_stem

    checkpoint, labels = os.path.join(work, f"{model}-grey.pt"), os.path.join(work, "labels.txt")
    if not os.path.exists(checkpoint):
        torch.manual_seed(0)
        built = torchvision.models.get_model(model, num_classes=3)
        _fit_stem(built, 1, None)
        torch.save(built.state_dict(), checkpoint)
        with open(labels, "w") as f:
            f.write("a\nb\nc\n")
    spec = os.path.join(work, "job.yaml")
    with open(spec, "w") as f:
        f.write(f"input: {{uri: {folder}}}\noutput: {{uri: {work}/out-{model}-{count}, partitioning: modality}}\n"
                f"model: {{name: {model}, weights: {checkpoint}, labels: {labels}}}\ndicom: {{window: soft_tissue}}\n")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", spec], capture_output=True, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    seconds = time.perf_counter() - start
    if result.returncode != 0 or f"predicted   {count}" not in result.stdout:
        raise SystemExit(f"{model} on {count} files failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return seconds


def forward_ms(model: str) -> float:
    """One thread, batch 16 of 1x224x224: the model's own CPU time per image."""
    import torch
    import torchvision

    from pipeline.models.resolve import _fit_stem

    torch.set_num_threads(1)
    built = torchvision.models.get_model(model, num_classes=3)
    _fit_stem(built, 1, None)
    built = built.eval().to(memory_format=torch.channels_last)
    x = torch.rand(16, 1, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        built(x)
        start = time.perf_counter()
        for _ in range(3):
            built(x)
    return (time.perf_counter() - start) / 48 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode-files", type=int, default=100)
    parser.add_argument("--files", type=int, default=100, help="N for the whole job (runs N and 2N)")
    parser.add_argument("--models", nargs="+", default=["resnet18", "densenet121"])
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}", flush=True)
    rates = decode_rates(args.decode_files)
    decode_ms = 1000 / rates["Explicit VR Little Endian"]
    from pydicom.uid import ExplicitVRLittleEndian

    with tempfile.TemporaryDirectory(prefix="bench-dicom-") as work:
        folders = {}
        for n in (args.files, 2 * args.files):
            folders[n] = os.path.join(work, f"ct-{n}")
            os.makedirs(folders[n])
            for i in range(n):
                with open(os.path.join(folders[n], f"slice-{i:05d}.dcm"), "wb") as f:
                    f.write(write_dicom(ct_slice(i), ExplicitVRLittleEndian))
        for model in args.models:
            small, large = (job_seconds(model, folders[n], n, work) for n in (args.files, 2 * args.files))
            model_ms = forward_ms(model)
            bound = (os.cpu_count() or 1) * 1000 / (decode_ms + model_ms)
            print(f"job {model} (1-channel stem): {args.files} files {small:.1f}s, {2 * args.files} files "
                  f"{large:.1f}s, steady {args.files / max(1e-9, large - small):.1f} images/s; bound "
                  f"{bound:.1f} images/s (cores / ({decode_ms:.1f} ms decode + {model_ms:.1f} ms forward))",
                  flush=True)


if __name__ == "__main__":
    main()
