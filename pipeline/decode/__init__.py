"""Bytes to the model's pixels: Pillow and tifffile (image.py), DICOM (dicom.py), nvJPEG on the GPU (device.py)."""
