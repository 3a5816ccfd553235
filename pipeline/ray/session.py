"""Starting a local Ray, or joining a cluster, for one job; Ray's own output kept off the job's console."""

from __future__ import annotations

import logging
import os
import warnings

import ray
from ray.util.annotations import RayDeprecationWarning

from pipeline.job.errors import UserError
from pipeline.ray.console import Console
from pipeline.ray.reaper import start_reaper

_REAPERS: list = []  # one per local Ray this process started: each ends its session when this process ends


def start_ray(address: str | None, console: Console | None = None) -> str:
    """Start a local Ray, or join the one at `address`; returns what it is, for the console. Workers' and agents'
    lines stay in the session's logs, and with `console`, so does what Ray writes into this process (console.py).
    A local Ray's processes end with this process (reaper.py)."""
    if ray.is_initialized():
        return "already started in this process"
    quiet_ray_loggers()
    # Joining a cluster is only ever on purpose: Ray's own default (address None) would join whatever cluster a
    # `ray start` left on this machine, or wait minutes for one that has died.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        # A local Ray's workers inherit this environment: let them import what the driver can from here
        # (a custom `module:build_fn` next to the job spec). A cluster needs it installed in its image.
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    try:
        context = ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                           configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "a new local Ray" if address == "local" else address
        raise UserError(f"compute.ray_address: cannot start or join Ray at {where} "
                        f"({type(exc).__name__}: {exc}); check RAY_ADDRESS / compute.ray_address") from None
    session_dir = getattr(context, "address_info", {}).get("session_dir")  # none through a Ray Client (ray://)
    if address == "local" and session_dir:
        _REAPERS.append(start_reaper(session_dir))
    if console is not None and session_dir:
        console.divert(os.path.join(session_dir, "logs"))
        # Ray's deprecation notices are for this package's developers (the tests show them), not a job's user.
        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    return f"{'a new local Ray' if address == 'local' else address}, {resources_line()}" + \
        (f"; its logs in {session_dir}/logs" if session_dir else "")


def resources_line() -> str:
    resources = ray.cluster_resources()
    size = ", ".join(f"{resources[key]:g} {name}" for key, name in (("CPU", "CPUs"), ("GPU", "GPUs"))
                     if resources.get(key))
    return size or "no CPUs yet"


def quiet_ray_loggers() -> None:
    """Ray's informational chatter would drown our own progress lines; its real warnings still reach its logs."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    for chatty in ("ray.data._internal.progress", "ray._private.authentication.authentication_token_setup"):
        logging.getLogger(chatty).setLevel(logging.ERROR)
    # Ray Data warns when a small job has fewer blocks than the pool has tasks or actors: expected, not a fault.
    warnings.filterwarnings("ignore", message=r"The (maximum|minimum) number of concurrent", category=UserWarning)


def session_logs() -> str:
    """The logs folder of the Ray session this process joined, for a failure's one line."""
    try:
        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except AttributeError:
        return "the Ray session's logs folder"
