"""Running a job on Ray: the only part of the package that imports Ray. `executor` (`RayExecutor`: start or join
Ray, plan the pool, run a plan and hand rows back), `adapter` (stages into Ray Data operators, from their
declarations), `session` (starting Ray), `datasource` (the listing as one read task), `ledger` (the run's small
actor), `cluster` (nodes, autoscaler groups, `plan_pool`), `blocks`, `metrics`, `console`, `reaper`, `submit`."""

import sys


def stop_ray() -> None:
    """Stop the Ray this process started or joined, if it did (a no-op in a process that never imported Ray)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
