"""The job's stages, planned for the pool the executor has: what each needs, and where decoding runs.

    ListInputs (one process) -> Read (processes waiting on storage) -> [Decode (a core each)] -> Model (a pool)

On Ray, decoding runs inside the model processes (on their own core, or through nvJPEG on their GPU) unless GPU
processes are told to leave it to the CPUs (`decode.device: cpu`): then it is a stage of its own, as it always is
on the local executor's CPU (threads beside the one model process). The table of choices and
their measurements: pipeline/ARCHITECTURE.md and docs/performance.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pipeline.decode.dicom import dicom_settings
from pipeline.decode.image import Decoder
from pipeline.io.listing import InputListing
from pipeline.io.read import Reader
from pipeline.io.storage import Storage
from pipeline.job.config import JobConfig
from pipeline.job.errors import UserError
from pipeline.job.stage import Resources, Source, Stage
from pipeline.models.inference import ModelInference
from pipeline.output.reuse import ReuseSources

if TYPE_CHECKING:
    from pipeline.models.spec import ModelSpec
    from pipeline.output.history import History

# A hand-off between stages carries up to this many bytes: ~10k listed keys or ~14 photos. Larger blocks would
# hold the listing back (at 128 MiB, until ~1M keys); 256 KiB blocks cost 2.7x in throughput (docs/performance.md).
BLOCK_BYTES = 1 << 20
# A DICOM slice is half a MiB to several MiB: 1 MiB blocks would carry one or two and the hand-offs would dominate
# (a 600-slice job: 33.7 s at 1 MiB, 24.0 s at 8 MiB).
DICOM_BLOCK_BYTES = 8 << 20


class Pool(Protocol):
    """The model processes an executor can give this job (ray/cluster.py's `PoolPlan`)."""
    min_actors: int
    max_actors: int
    num_gpus: float  # per model process
    cluster_cpus: float  # the CPUs the cluster has or can scale to
    cpus_each: float  # per model process: its torch threads on a CPU
    cpu_decode_apart: bool  # without a GPU, decoding is a stage of its own (threads beside the model) or not


@dataclass
class StagePlan:
    source: Source
    stages: list[Stage]
    block_bytes: int  # what one hand-off between stages carries at most
    reuse: ReuseSources | None = None  # where copies of exact duplicates come from; None: every input predicted


def plan_stages(cfg: JobConfig, spec: ModelSpec, storage: Storage, pool: Pool,
                history: History | None = None) -> StagePlan:
    """The source and stages of this job, each declaring what it needs."""
    decode_apart = cfg.decode.device == "cpu" if pool.num_gpus > 0 else pool.cpu_decode_apart
    if cfg.decode.device == "gpu" and pool.num_gpus == 0:
        raise UserError("decode.device: 'gpu' but the model actors get no GPU (the Ray cluster has none, or "
                        "compute.num_gpus_per_actor is 0); use 'auto' or 'cpu'")
    safe_errors = cfg.privacy.pseudonymize  # no library text in a message: it may spell the input's path
    listing = InputListing(cfg.input.uri, storage, cfg.input.extensions, history, exclude=cfg.output.uri,
                           prefix=cfg.input.prefix)
    # Sized for the cluster as its autoscaler can make it: a head with no CPUs would otherwise get 2 for the night.
    reader = Reader(storage, cfg.input.max_file_bytes, safe_errors, processes=max(2, int(pool.cluster_cpus) // 2))
    decoder = Decoder(spec.preprocess, cfg.decode.max_image_pixels, spec.input_channels, dicom_settings(cfg.dicom),
                      safe_errors)
    reuse = reuse_sources(cfg, history)
    model = model_stage(cfg, spec, storage, pool, None if decode_apart else decoder,
                        reuse.known_content(storage) if reuse is not None else None)
    return StagePlan(listing, [reader, *([decoder] if decode_apart else []), model],
                     DICOM_BLOCK_BYTES if cfg.dicom is not None else BLOCK_BYTES, reuse)


def reuse_sources(cfg: JobConfig, history: History | None) -> ReuseSources | None:
    """Earlier rows of this model identity that exact duplicates copy (README, "Exact duplicates"); None for a
    DICOM job (a frame's pixels may meet another file's window) or a pseudonymised one (a copy names its source)."""
    if cfg.dicom is not None or cfg.privacy.pseudonymize:
        return None
    if history is None:
        return ReuseSources()
    return ReuseSources(history.committed, list(history.staged_files))


def model_stage(cfg: JobConfig, spec: ModelSpec, storage: Storage, pool: Pool, decoder: Decoder | None,
                known_content=None) -> Stage:
    compute = cfg.compute
    options = {"precision": compute.precision, "channels_last": compute.channels_last,
               "num_threads": max(1, int(pool.cpus_each))}
    if spec.task == "detection":
        options["max_batch_megapixels"] = compute.max_batch_megapixels
    # A detector on a CPU core spends seconds on one block (~14 photos): a queue would pile a small job's few
    # blocks onto one process while the others idle. Elsewhere the engine's default queue hides the hand-offs.
    queue = 1 if spec.task == "detection" and pool.num_gpus == 0 else None
    resources = Resources(cpus=pool.cpus_each, gpus=pool.num_gpus,
                          memory=int(compute.memory_per_actor_gb * 2**30), batch_size=compute.batch_size,
                          concurrency=(pool.min_actors, pool.max_actors), stateful=True, queue=queue)
    return ModelInference(spec, storage, resources, decoder, known_content, **options)
