"""Command line: `pipeline run [JOB.yaml] [--flags]`, `pipeline submit JOB.yaml --address URL` and `pipeline demo`.

A problem the user can fix (UserError) is one line on stderr and exit code 2; a job that stopped itself
on its error-rate threshold exits 1 after printing what it did.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.errors import JobFailed, JobStopped, UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description="Batch image inference on Ray Data.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a job: images in, Parquet predictions out")
    add_job_flags(run)
    run.add_argument("--ray-address", help="join this Ray cluster (default RAY_ADDRESS, else a local Ray)")

    submit = commands.add_parser("submit", help="run a job on an existing Ray cluster through its job API, "
                                                "following its output; exits with the job's exit code")
    add_job_flags(submit)
    submit.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default RAY_ADDRESS)")
    submit.add_argument("--no-wait", action="store_true", help="submit and return without following the job")

    demo = commands.add_parser("demo", help="train a digits CNN, serve images from a local S3, run a job")
    demo.add_argument("--keep", metavar="DIR", help="also copy the Parquet output to this local folder")
    return parser


def add_job_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument("spec", nargs="?", help="job spec (YAML); flags below override its fields")
    run.add_argument("--input", help="s3://bucket/prefix, a local folder, or a .parquet/.csv manifest")
    run.add_argument("--output", help="output folder, local or s3:// (a table's location for delta and iceberg)")
    run.add_argument("--format", choices=["parquet", "delta", "iceberg"],
                     help="parquet: a folder of Parquet files; delta or iceberg: a table, each run one version")
    run.add_argument("--model", help="torchvision architecture (resnet50) or module.path:build_fn")
    run.add_argument("--weights", help="torchvision weights name (IMAGENET1K_V2) or a checkpoint path/URI")
    run.add_argument("--labels", help="labels file, one class name per line")
    run.add_argument("--batch-size", type=int, help="images per model call")
    run.add_argument("--overwrite", action="store_true", default=None,
                     help="backfill: process every input, then atomically replace the folder's earlier output")
    run.add_argument("--full", action="store_const", const=False, default=None,
                     help="process every input, not only those new or changed since earlier runs")
    run.add_argument("--reprocess-errors", action="store_true", default=None,
                     help="also retry inputs whose row in an earlier run is an error")
    run.add_argument("--partitioning", metavar="none|run_date|COLUMN",
                     help="run_date: write each run under run_date=YYYY-MM-DD/; a string column such as modality: "
                          "Hive-style folders modality=CT/")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does, so a custom model module beside the spec imports
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "submit":
            return _submit(args)
        from pipeline.demo import run_demo
        return run_demo(keep=args.keep)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (JobStopped, JobFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from pipeline.config import load_job
    from pipeline.runner import run_job

    run_job(load_job(args.spec, _overrides(args)))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from pipeline.submit import submit

    return submit(args.spec, _overrides(args), args.address, sys.stdout, wait=not args.no_wait)


def _overrides(args: argparse.Namespace) -> dict:
    from pipeline.config import OVERRIDES

    return {flag: getattr(args, flag, None) for flag in OVERRIDES}


def entry() -> None:
    """The `pipeline` command: main(), then a quick exit. Everything the job wrote is committed and closed by
    then; Python's own teardown would spend seconds collecting the heap of torch, Ray and Arrow objects."""
    code = main()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # stops the local Ray this process started (atexit would, but os._exit skips atexit)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
