"""Running a job, on Ray: the only part of the package that imports Ray. The checks before a run (preflight.py),
the dataset wiring and the driver's loop (runner.py) with its progress (progress.py), the listing's datasource,
what a model actor runs (actors.py), the cluster's shape, the run's ledger actor, crash isolation, metrics and
`pipeline submit`. The stages it wires (pipeline.io, pipeline.decode, pipeline.models) are plain Python."""

import sys


def stop_ray() -> None:
    """Stop the Ray this process started or joined, if it did (a no-op in a process that never imported Ray)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
