"""Prometheus metrics through Ray's own metrics agent on every node (`/metrics` on its metrics export port, which
Ray's Prometheus service discovery and Grafana dashboards already scrape): `RunMetrics` on the driver
(`ray_pipeline_images_done_total`, `..._failed_total`, absent until one, `..._per_second`, by `output`),
`BatchLatency` in model actors (`ray_pipeline_batch_latency_seconds{stage}`: decode, if the actor decodes, + model).
Best effort: without the agent (a minimal install) nothing is recorded and the job runs the same.
The list and queries: infra/README.md#observe"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Seconds: a CPU detector batch takes seconds, a GPU classifier batch milliseconds.
LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


class RunMetrics:
    """The driver's counters for one run, tagged with its output folder."""

    def __init__(self, output: str):
        self.tags = {"output": output}
        try:
            from ray.util.metrics import Counter, Gauge

            self.done = Counter("pipeline_images_done", "inputs finished (predicted or failed)", tag_keys=("output",))
            self.failed = Counter("pipeline_images_failed", "inputs that became error rows", tag_keys=("output",))
            self.rate = Gauge("pipeline_images_per_second", "images per second of the run so far",
                              tag_keys=("output",))
        except Exception as exc:  # noqa: BLE001 - metrics never stop a job
            log.debug("metrics disabled: %s", exc)
            self.done = None

    def record(self, inputs: int, failed: int, rate: float) -> None:
        if self.done is None:
            return
        try:
            if inputs:
                self.done.inc(inputs, tags=self.tags)
            if failed:
                self.failed.inc(failed, tags=self.tags)
            self.rate.set(rate, tags=self.tags)
        except Exception as exc:  # noqa: BLE001 - metrics never stop a job
            log.debug("metrics not recorded: %s", exc)


class BatchLatency:
    """A model actor's batch times (built in the actor, where the work happens)."""

    def __init__(self, stage: str):
        self.tags = {"stage": stage}
        self.histogram = None
        try:
            import ray
            from ray.util.metrics import Histogram

            if not ray.is_initialized():  # a stage used outside Ray (tests, benchmarks)
                return

            self.histogram = Histogram("pipeline_batch_latency_seconds", "seconds one model-actor batch takes",
                                       boundaries=LATENCY_BOUNDARIES, tag_keys=("stage",))
        except Exception as exc:  # noqa: BLE001
            log.debug("metrics disabled: %s", exc)
            self.histogram = None

    def observe(self, seconds: float) -> None:
        if self.histogram is None:
            return
        try:
            self.histogram.observe(seconds, tags=self.tags)
        except Exception as exc:  # noqa: BLE001
            log.debug("metrics not recorded: %s", exc)
