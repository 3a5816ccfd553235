"""`pipeline submit JOB.yaml --address http://HEAD:8265`: the same job, run on an existing Ray cluster. The spec
(with any command-line overrides applied) is validated here, then shipped as the job's working directory through
Ray's job-submission API; the cluster runs `pipeline run job.yaml` as the job's driver, with the pipeline installed
in its image. This command streams the job's output and exits with its exit code: 0 done, 2 a problem in the spec
or its inputs (the driver's one line), 1 otherwise. What travels: docs/design-notes.md#pipelineraysubmitpy"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import yaml

from pipeline.io.uris import is_remote
from pipeline.job.config import merged_spec, validate_spec
from pipeline.job.errors import UserError

# Where the stores are, never a credential: the cluster's nodes bring their own (instance role, Workload Identity).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT",
                 "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_BLOB_ENDPOINT")
SPEC_NAME = "job.yaml"
AGENT_WAIT_S = 60.0


def submit(spec_path: str | None, overrides: dict[str, Any], address: str | None, out: TextIO,
           wait: bool = True) -> int:
    raw = merged_spec(spec_path, overrides)
    cfg = validate_spec(raw, spec_path)  # a spec that cannot run fails here, not on the cluster
    local = [value for value in (cfg.input.uri, cfg.output.uri, cfg.model.checkpoint, cfg.model.labels)
             if isinstance(value, str) and value and not is_remote(value)]
    if local:
        print(f"note: {', '.join(local)} will be read on the cluster's nodes, not on this machine", file=out)
    if cfg.compute.executor == "local":
        raise UserError("compute.executor: local runs a job on this machine; `pipeline submit` runs it on a Ray "
                        "cluster: drop the setting (or run `pipeline run` here)")
    raw["compute"] = {**(raw.get("compute") or {}), "executor": "ray"}  # on the cluster, as its driver
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("--address: give the Ray cluster's dashboard, e.g. --address http://HEAD:8265 (or set "
                        "RAY_ADDRESS)")
    client = _client(address)
    with tempfile.TemporaryDirectory(prefix="pipeline-submit-") as folder:
        Path(folder, SPEC_NAME).write_text(yaml.safe_dump(raw, sort_keys=False))
        env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
        job_id = _submit_job(client, address, entrypoint=f"pipeline run {SPEC_NAME}",
                             runtime_env={"working_dir": folder, "env_vars": env},
                             submission_id=f"pipeline-{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(3).hex()}",
                             metadata={"spec": Path(spec_path).name if spec_path else "flags"})
    print(f"Submitted {job_id} to {address}", file=out, flush=True)
    if not wait:
        return 0
    print(f"Following its output (Ctrl-C stops following; the job goes on: `ray job stop {job_id}` stops it)",
          file=out, flush=True)
    asyncio.run(_follow(client, job_id, out))
    return _exit_code(client, job_id, out)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, ValueError for a bad scheme, auth errors...
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"--address: cannot reach Ray's job API at {address} ({type(exc).__name__}: {detail}); "
                        "give the head's dashboard address, http://HEAD:8265") from None


def _submit_job(client, address: str, timeout_s: float = AGENT_WAIT_S, **job) -> str:
    """Submits, waiting while a freshly started head's job agent is not registered yet (Ray answers 500,
    'No available agent to submit job, please try again later')."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())
            if "try again later" in detail and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise UserError(f"--address: the Ray cluster at {address} refused the job ({detail[:300]})") from None


async def _follow(client, job_id: str, out: TextIO) -> None:
    async for lines in client.tail_job_logs(job_id):
        out.write(lines)
        out.flush()


def _exit_code(client, job_id: str, out: TextIO) -> int:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + 60  # the log stream can end a moment before the status is final
    info = client.get_job_info(job_id)
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    found = re.search(r"exit code (\d+)", info.message or "")
    code = int(found.group(1)) if found else 1
    print(f"job {job_id} {info.status.value.lower()}" + (f" with exit code {code}" if found else
                                                          f": {(info.message or '')[:300]}"), file=out, flush=True)
    return code if code in (1, 2) else 1
