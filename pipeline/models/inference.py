"""Model stage: the model built once per process (`setup`), then each batch decoded where the plan says and run.

A batch arrives decoded (`pixels`, from a decode stage ahead of GPU processes) or encoded (`bytes`). An encoded
batch is decoded here: on the GPU through nvJPEG (`DeviceDecoder`, pixels staying on the device), or on this
process's own core when there is no GPU, so one process per core decodes and infers without handing pixels
between processes (where decoding runs: run/plan.py, measured in docs/performance.md).
Building this stage is cheap and imports no torch: the driver plans with it; `setup` does the work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from pipeline.decode.image import Decoder
from pipeline.io.storage import Storage
from pipeline.job.stage import Batch, Resources, Stage
from pipeline.models.reuse import ContentReuse, timed

if TYPE_CHECKING:
    from pipeline.models.spec import ModelSpec
    from pipeline.models.stage import ModelStage


class ModelInference(Stage):
    """Predictions for a batch: decode (when this stage decodes), then the classifier or detector."""
    name = "model"
    isolates_crashes = True
    claims_content = True  # given an engine's claims across processes (`use_claims`), a content is predicted once

    def __init__(self, spec: ModelSpec, storage: Storage, resources: Resources, decoder: Decoder | None = None,
                 known_content: np.ndarray | None = None, **options):
        self.spec = spec
        self.storage = storage
        self.resources = resources
        self.decoder = decoder  # None: decoded by a stage of its own, upstream
        self.options = options  # precision, channels_last, num_threads, max_batch_megapixels (ModelStage's)
        self.model: ModelStage | None = None
        self.decode: Callable[[Batch], Batch] | None = None
        # Exact duplicates copied, not predicted (models/reuse.py); None: every row predicted (a DICOM or
        # pseudonymised job). `known_content`: sorted 16-byte hashes this model identity already predicted.
        self.reuse = ContentReuse(known_content) if known_content is not None else None

    def use_claims(self, claim: Callable[[list[str], list[str]], list[bool]]) -> None:
        """Contents this process would predict are claimed first (models/reuse.ClaimBook); a lost claim is a copy."""
        if self.reuse is not None:
            self.reuse.claim = claim

    @property
    def model_class(self) -> type[ModelStage]:
        if self.spec.source != "torchvision":  # a source may run its own stage (a Hugging Face detector does)
            from pipeline.models.resolve import source_module

            own = getattr(source_module(self.spec.source), "stage_class", None)
            if own is not None:
                return own(self.spec)
        if self.spec.task == "detection":
            from pipeline.models.detect import Detector

            return Detector
        from pipeline.models.classify import Classifier

        return Classifier

    def setup(self) -> None:
        self.model = self.model_class(self.spec, self.storage, **self.options)
        self.decode = decoder_on(self.model, self.decoder, on_device=self.resources.gpus > 0)

    def process(self, batch: Batch) -> Batch:
        if self.model is None:
            self.setup()
        if self.decode is not None:
            batch = self.decode(batch)
        if self.reuse is None:
            return timed(self.model, batch)
        copies = self.reuse.mark(batch)
        batch = timed(self.model, batch)
        self.reuse.fill(batch, copies, list(self.model.empty_columns(0)))
        return batch


def decoder_on(model: ModelStage, decoder: Decoder | None, on_device: bool) -> Callable[[Batch], Batch] | None:
    """Pillow's decoder on this process's core, or nvJPEG on its GPU for a 3-channel model; None when decoded
    upstream."""
    if decoder is not None and on_device and model.device.type == "cuda" and decoder.channels == 3:
        from pipeline.decode.device import DeviceDecoder

        return DeviceDecoder(decoder, model.device)
    return decoder
