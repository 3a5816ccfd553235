"""A detector whose right answer the tests can construct: it boxes the red, green and blue patches of a photo.

It has the layout of torchvision's detectors (a list of images in, one dict of boxes, labels and scores per
image out) and uses their real `GeneralizedRCNNTransform`: every image is resized (shorter side 256, longer
at most 400), normalised and padded into one batch, and the boxes, found in the resized image, are mapped
back to the input's pixels by the transform's own `postprocess`. So a box that comes back right proves
the resize and the mapping back, not just the colour test. The backbone (a seeded 3x3 convolution, saved
as the checkpoint) gives the pooled-features embedding.

    model.name: color_boxes:build    model.task: detection    labels: __background__, red, green, blue
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

COLORS = {1: (0, 0.55), 2: (1, 0.55), 3: (2, 0.55)}  # label -> (channel, how much it must dominate the others)
LABELS = ["__background__", "red", "green", "blue"]


class ColorBoxes(nn.Module):
    def __init__(self):
        super().__init__()
        self.transform = GeneralizedRCNNTransform(min_size=256, max_size=400, image_mean=[0.0, 0.0, 0.0],
                                                  image_std=[1.0, 1.0, 1.0])
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, _ = self.transform(images)
        self.backbone(batch.tensors)  # features for the embedding only
        detections = [self.find(batch.tensors[i, :, :h, :w]) for i, (h, w) in enumerate(batch.image_sizes)]
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    @staticmethod
    def find(image: torch.Tensor) -> dict[str, torch.Tensor]:
        boxes, labels, scores = [], [], []
        for label, (channel, margin) in COLORS.items():
            others = torch.cat([image[:channel], image[channel + 1:]])
            mask = image[channel] - others.max(dim=0).values > margin
            if mask.sum() < 4:
                continue
            ys, xs = torch.nonzero(mask, as_tuple=True)
            boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
            labels.append(label)
            scores.append(0.9 - 0.1 * label)  # red 0.8, green 0.7, blue 0.6
        return {"boxes": torch.stack(boxes) if boxes else torch.zeros(0, 4),
                "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.tensor(scores)}


def build(num_classes: int | None = None) -> ColorBoxes:
    return ColorBoxes()
