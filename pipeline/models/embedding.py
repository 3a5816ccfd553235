"""Embeddings: a model's pooled features, captured during its own forward pass.

A classifier's embedding is the input of its head (`fc`, `classifier`, `head` or `heads`, else its last
Linear), global-average-pooled when it is still a feature map: the penultimate features. A detector's is
its backbone's deepest feature map (before any FPN), averaged over the image's own area: the padding
that batches images of different sizes together is left out.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from pipeline.job.errors import UserError

HEAD_NAMES = ("fc", "classifier", "head", "heads")


class EmbeddingTap:
    def __init__(self, model: nn.Module, task: str, layer: str | None = None, normalize: bool = True):
        self.normalize = normalize
        self.features: list[torch.Tensor] = []
        if task != "detection":
            head = _module(model, layer) if layer else classifier_head(model)
            self.hooks = [head.register_forward_pre_hook(lambda _, args: self.features.append(pool(args[0])))]
        else:
            self.hooks = _detector_hooks(model, self.features)

    def clear(self) -> None:
        self.features.clear()

    def take(self) -> np.ndarray:
        """(N, D) float32 for the images of the forward passes since the last take, in order."""
        features = torch.cat(self.features).float()
        self.features.clear()
        if self.normalize:
            features = torch.nn.functional.normalize(features, dim=1)
        return features.cpu().numpy()

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def classifier_head(model: nn.Module) -> nn.Module:
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("model.embedding.layer: cannot tell which module is this model's head (no fc, classifier, "
                        "head or Linear layer); name it, e.g. 'classifier'")
    return linears[-1]


def _module(model: nn.Module, layer: str) -> nn.Module:
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = ", ".join(name for name, _ in model.named_children())
        raise UserError(f"model.embedding.layer: the model has no module '{layer}'; its top-level modules are "
                        f"{names}") from None


def pool(features: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C) by averaging; anything else flattened to (N, D)."""
    if features.ndim == 4:
        return features.mean(dim=(2, 3))
    return features.flatten(1)


def _detector_hooks(model: nn.Module, sink: list[torch.Tensor]) -> list:
    """torchvision's detectors run `transform` (resize, pad into one tensor) then `backbone` on that tensor."""
    transform, backbone = getattr(model, "transform", None), getattr(model, "backbone", None)
    if transform is None or backbone is None:
        raise UserError("model.outputs: an embedding from a detector needs torchvision's detector layout (a "
                        "`transform` and a `backbone`); drop 'embedding' from model.outputs")
    backbone = getattr(backbone, "body", backbone)  # the CNN itself, before the feature pyramid
    sizes: list[tuple[int, int]] = []  # the batch's images, resized but not yet padded
    padded: list[int] = []  # the padded batch tensor's height and width

    def remember_sizes(_, __, output):
        sizes[:] = [tuple(s) for s in output[0].image_sizes]

    def remember_padded(_, args):
        padded[:] = args[0].shape[-2:]

    def pool_own_area(_, __, output):
        features = list(output.values())[-1] if isinstance(output, dict) else output
        pooled = []
        for i, (h, w) in enumerate(sizes):
            rows = max(1, math.ceil(h * features.shape[-2] / padded[0]))
            cols = max(1, math.ceil(w * features.shape[-1] / padded[1]))
            pooled.append(features[i, :, :rows, :cols].mean(dim=(1, 2)))
        sink.append(torch.stack(pooled))

    return [transform.register_forward_hook(remember_sizes), backbone.register_forward_pre_hook(remember_padded),
            backbone.register_forward_hook(pool_own_area)]
