"""A tiny classifier for crash tests that records every forward pass, so a test can tell work redone.

It is also a model that crashes on one kind of input, as a native library can: a batch holding a solid magenta
image (an impossible photo) kills its process with a segmentation fault, in a model actor (or the local executor's model process). With
PIPELINE_TEST_CRASH_IN_ACTOR_BUILD set, building it crashes every model actor.

Each call appends "<batch size> <Ray node id>" to the file named by PIPELINE_TEST_CALLS (O_APPEND: whole
lines even with several actors). Built as the custom model `counting_model:build`.
"""

import ctypes
import os
import time

import ray
import torch
from torch import nn


def in_model_actor() -> bool:
    """In a process serving the job's batches: a Ray model actor, or the local executor's model process once it
    runs the job's stages (not while it checks the model)."""
    if os.environ.get("PIPELINE_SERVING") == "1":
        return True
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def node_id() -> str:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


class CountingNet(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if in_model_actor() and bool(is_magenta(x).any()):
            ctypes.string_at(0)  # a real segmentation fault, in this thread, as a native decoder's would be
        calls = os.environ.get("PIPELINE_TEST_CALLS")
        if calls and in_model_actor():  # not the driver's up-front probe (which runs while Ray starts)
            fd = os.open(calls, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, f"{x.shape[0]} {node_id()}\n".encode())
            os.close(fd)
            time.sleep(float(os.environ.get("PIPELINE_TEST_DELAY_S", "0")))  # a slower model, to kill mid-job
            _maybe_die()
        return self.head(self.features(x))


def is_magenta(x: torch.Tensor) -> torch.Tensor:
    """Per image of a normalised batch: red and blue far above green everywhere (ImageNet statistics)."""
    means = x.float().mean(dim=(2, 3))
    return (means[:, 0] - means[:, 1] > 3) & (means[:, 2] - means[:, 1] > 3)


def _maybe_die() -> None:
    """With PIPELINE_TEST_DIE_ONCE=<marker path>, the first actor to get here exits abruptly mid-batch (once)."""
    marker = os.environ.get("PIPELINE_TEST_DIE_ONCE")
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        os._exit(1)


def build(num_classes: int | None = None) -> nn.Module:
    if os.environ.get("PIPELINE_TEST_CRASH_IN_ACTOR_BUILD") and in_model_actor():
        ctypes.string_at(0)  # a model whose weights or device crash every actor that builds it
    torch.manual_seed(0)
    return CountingNet(num_classes or 3)


def _calls(path) -> list[tuple[int, str]]:
    try:
        with open(path) as f:
            return [(int(n), node) for n, node in (line.split() for line in f if line.strip())]
    except FileNotFoundError:
        return []


def images_seen(path) -> int:
    return sum(n for n, _ in _calls(path))


def nodes_seen(path) -> set[str]:
    return {node for _, node in _calls(path)}
