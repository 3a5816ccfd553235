"""What each model actor runs: its batch decoded where the plan says, then the model stage; timed for the
metrics, and isolated so an input that kills the process becomes an error row.

A batch arrives decoded (`pixels`, from CPU decode tasks ahead of a GPU pool) or encoded (`bytes`). An encoded
batch is decoded here, in the actor: on its GPU through nvJPEG (`DeviceDecoder`, pixels staying on the device), or
on the actor's own core when the cluster has no GPU, so one process per core decodes and infers without handing
pixels between processes (the plan is `runner._build`'s, measured in docs/performance.md).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from pipeline.decode.image import Decoder
from pipeline.io.storage import Storage
from pipeline.models.resolve import ModelSpec
from pipeline.models.stage import ModelStage
from pipeline.ray.isolation import Isolated, Ledger
from pipeline.ray.metrics import BatchLatency

Batch = dict[str, np.ndarray]


class ModelActor:
    """The callable class Ray's actor pool builds once per actor: decode (when this actor decodes), then `stage`."""

    def __init__(self, stage: type[ModelStage], spec: ModelSpec, storage: Storage, decoder: Decoder | None = None,
                 decode_on_device: bool = False, ledger: Ledger | None = None, **stage_options):
        if ledger is not None:  # a process that dies building the model is restarted by Ray: bounded here
            ledger.building()
        self.stage = stage(spec, storage, **stage_options)
        self.decode = actor_decoder(decoder, decode_on_device, self.stage)
        self.latency = BatchLatency(stage.__name__)
        # Told as each batch starts and ends: an input that kills this process becomes an error row
        # (isolation.py), and the driver counts the inputs redone after a loss.
        self.isolated = Isolated(self.timed_run, ledger, "model") if ledger is not None else None
        if ledger is not None:
            ledger.built()

    def __call__(self, batch: Batch) -> Batch:
        return self.isolated(batch) if self.isolated is not None else self.timed_run(batch)

    def timed_run(self, batch: Batch) -> Batch:
        started = time.perf_counter()
        if self.decode is not None:
            batch = self.decode(batch)
        batch = self.stage(batch)
        self.latency.observe(time.perf_counter() - started)
        return batch


def actor_decoder(decoder: Decoder | None, on_device: bool, stage: ModelStage) -> Callable[[Batch], Batch] | None:
    """Pillow's decoder on the actor's core, or nvJPEG on its GPU for a 3-channel model; None when decoded upstream."""
    if decoder is not None and on_device and stage.device.type == "cuda" and decoder.channels == 3:
        from pipeline.decode.device import DeviceDecoder

        return DeviceDecoder(decoder, stage.device)
    return decoder
