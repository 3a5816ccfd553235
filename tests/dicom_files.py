"""DICOM files the tests write themselves, with known pixel values and tags, and pydicom's shipped files."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SHIPPED = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")

# Identifying values no other file or message holds, so finding one anywhere is a leak.
PHI = {
    "PatientName": "Quarshie^Adwoa^Nyamekye",
    "PatientID": "MRN-55813-ZX",
    "PatientBirthDate": "19470312",
    "PatientAddress": "17 Larkspur Lane, Wexbridge",
    "InstitutionName": "Saint Orsolya Memorial Hospital",
    "ReferringPhysicianName": "Vantongeren^Piet",
    "AccessionNumber": "ACC99172264",
    "OtherPatientIDs": "ALT-4471-QQ",
    "StudyDescription": "CHEST CT FOR Quarshie follow-up",
    "ImageComments": "patient Quarshie reports pain since 2025-06-01",
}


def shipped(name: str) -> bytes:
    with open(os.path.join(SHIPPED, name), "rb") as f:
        return f.read()


def dicom_bytes(frames: np.ndarray, *, photometric: str = "MONOCHROME2", modality: str = "CT",
                slope: float | None = None, intercept: float | None = None, window: tuple | None = None,
                signed: bool = True, phi: bool = False, bits_stored: int = 16, syntax: str = ExplicitVRLittleEndian,
                **attributes) -> bytes:
    """A Part 10 file of 16-bit greyscale frames ((F,) H, W) with the given attributes, uncompressed unless
    `syntax` names a transfer syntax pydicom can encode (RLE, JPEG 2000, JPEG-LS lossless)."""
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window[:2]
        if len(window) > 2:
            ds.VOILUTFunction = window[2]
    if phi:
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
        ds.PatientAge = "078Y"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = frames.astype(np.int16 if signed else np.uint16).tobytes()
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB (H, W, 3) PNG, written by hand: Pillow writes 16-bit PNGs only in grey."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
