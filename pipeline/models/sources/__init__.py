"""Model sources beyond torchvision's (which pipeline/models/resolve.py holds). Each module has two functions:

- `resolve(cfg, storage) -> ModelSpec`, on the driver: checks the name, reads the labels and the model's own
  preprocessing, digests the weights and runs one forward pass, so that a wrong model is one line before any work;
- `build(spec, storage) -> nn.Module`, in each model process: a module taking normalised NCHW images and returning
  class scores (`Classifier` does the rest), or the source's own stage for detectors.

A source's library is imported only here, when a job names it: the CLI's start does not pay for it.
"""

from __future__ import annotations

import hashlib
import importlib

from pipeline.job.errors import UserError


def require(package: str, source: str):
    """The source's library, or one line saying which extra installs it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(f"model.source: {source} needs the '{package}' package; install it with "
                        f"pip install 'pipeline[models]'") from None


def download_failed(what: str, exc: Exception, fix: str) -> UserError:
    """One line for weights that could not be fetched (no network, unknown id, a gated repository)."""
    detail = " ".join(str(exc).split())[:200]
    return UserError(f"model: cannot load {what} ({type(exc).__name__}: {detail}); {fix}")


def digest(state_dict: dict) -> str:
    """The weights' identity when they come from the hub: sha256 over every tensor's bytes, in order."""
    import torch

    hasher = hashlib.sha256()
    for name, tensor in state_dict.items():
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + hasher.hexdigest()
