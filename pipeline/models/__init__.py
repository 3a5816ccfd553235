"""Pixels to predictions: which model (resolve.py), the stage every model shares (stage.py), classifiers and
detectors, embeddings."""
