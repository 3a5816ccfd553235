"""Command line: `pipeline run [JOB.yaml] [--flags]` (on this machine, or on Ray), `pipeline submit JOB.yaml
--address URL`, `pipeline report OUTPUT [--truth]`, `pipeline runs OUTPUT`, `pipeline search OUTPUT TEXT`, the review
loop's `pipeline dedup OUTPUT`, `pipeline export OUTPUT` and `pipeline truth import OUTPUT FILE`, and `pipeline demo`.

A problem the user can fix (UserError) is one line on stderr and exit code 2; a job that stopped itself
on its error-rate threshold exits 1 after printing what it did.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import nullcontext

from pipeline.ray import stop_ray
from pipeline.job.errors import JobFailed, JobStopped, UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description="Batch image inference on Ray Data.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a job: images in, Parquet predictions out")
    add_job_flags(run)
    run.add_argument("--ray-address", help="join this Ray cluster (default RAY_ADDRESS, else a local Ray)")
    run.add_argument("--executor", choices=["auto", "ray", "local"],
                     help="local: this machine without Ray; ray: Ray Data (a local Ray or the cluster); auto "
                          "(default): local unless a cluster is named or the machine has several GPUs")

    submit = commands.add_parser("submit", help="run a job on an existing Ray cluster through its job API, "
                                                "following its output; exits with the job's exit code")
    add_job_flags(submit)
    submit.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default RAY_ADDRESS)")
    submit.add_argument("--no-wait", action="store_true", help="submit and return without following the job")

    report = commands.add_parser("report", help="an HTML page about a committed run: labels, scores, errors, "
                                                "thumbnails, throughput; --against: what changed since another run")
    add_output_flags(report)
    report.add_argument("--run", metavar="RUN_ID", help="the run to report (default: the latest committed run)")
    report.add_argument("--against", metavar="RUN_ID", help="compare with this earlier run: inputs whose label changed")
    report.add_argument("-o", "--out", metavar="FILE.html", help="where to write the page (default: "
                                                                  "report-<run id>.html here)")
    report.add_argument("--truth", action="store_true", help="score the runs against `pipeline truth import`'s answers")

    runs = commands.add_parser("runs", help="an output's history: committed runs, a run in progress or "
                                            "interrupted, and what the next run would do (no Ray)")
    add_output_flags(runs)
    runs.add_argument("--no-listing", action="store_true",
                      help="skip listing the input to say how many inputs the next run would predict")

    search = commands.add_parser("search", help="the output's images that best match a text, by the embeddings an "
                                                "open_clip job wrote (no Ray)")
    add_output_flags(search)
    search.add_argument("text", help='what to look for, e.g. "a dog on a beach"')
    search.add_argument("--limit", type=int, default=20, help="how many images (default 20)")
    search.add_argument("-o", "--out", metavar="FILE.html", help="also write a page with their thumbnails")

    add_dedup_command(commands)
    add_export_command(commands)
    add_truth_parser(commands)
    demo = commands.add_parser("demo", help="train a digits CNN, serve images from a local S3, run a job")
    demo.add_argument("--keep", metavar="DIR", help="also copy the Parquet output to this local folder")
    return parser


def add_dedup_command(commands) -> None:
    dedup = commands.add_parser("dedup", help="near-duplicate groups of the output's live rows (pHash, embeddings), "
                                "written beside it as OUTPUT_dedup")
    add_output_flags(dedup)
    dedup.add_argument("--run", metavar="RUN_ID", help="only this committed run's rows (default: every live run)")
    dedup.add_argument("--max-distance", type=int, default=8, metavar="D",
                       help="pHash Hamming distance (of 64 bits) within which images are near-duplicates (default 8)")
    dedup.add_argument("--min-similarity", type=float, default=0.95, metavar="S",
                       help="embedding cosine similarity from which images are near-duplicates (default 0.95)")


def add_export_command(commands) -> None:
    export = commands.add_parser("export", help="a committed run's uncertain (or sampled) rows for people to review: "
                                                "Label Studio tasks (or a new project on its server), COCO, CVAT")
    add_output_flags(export)
    export.add_argument("--to", required=True, metavar="label-studio|coco|cvat", help="the review tool's format")
    export.add_argument("--run", metavar="RUN_ID", help="the run to export (default: the latest committed run)")
    export.add_argument("--select", default="uncertain:100", metavar="uncertain:N|random:N|label=NAME",
                        help="the N most uncertain rows (default 100), N seeded at random by the run id, or every "
                             "row predicting NAME; rows with errors never")
    export.add_argument("--by", default="least-confidence", metavar="least-confidence|margin|entropy",
                        help="a classifier's uncertainty, from its top-k scores (default least-confidence)")
    export.add_argument("--per-label", type=int, metavar="K", help="K rows of each predicted label first")
    export.add_argument("--band", metavar="LO:HI", help="a detector: images with boxes scored in this band are "
                                                        "uncertain (default 0.3:0.7)")
    export.add_argument("--presign", type=int, metavar="SECONDS", help="images as presigned https URLs (S3) valid "
                                                                       "this long, instead of their s3:// URIs")
    export.add_argument("-o", "--out", metavar="FILE|URL", help="a file, local or s3://; or Label Studio's "
                                                                "http(s)://HOST:PORT (a new project, key in "
                                                                "LABEL_STUDIO_API_KEY)")


def add_truth_parser(commands) -> None:
    """`pipeline truth import OUTPUT FILE`: reviewers' answers into the output's truth table."""
    truth = commands.add_parser("truth", help="reviewers' answers, the ground truth beside an output")
    answers = truth.add_subparsers(dest="truth_command", required=True).add_parser(
        "import", help="append a file of answers to the output's truth table (<output>_truth)")
    add_output_flags(answers)
    answers.add_argument("file", help="Label Studio JSON export, COCO JSON, CVAT for images 1.1 XML, or a CSV of "
                                      "uri,label; local or s3://")
    answers.add_argument("--from", dest="source", metavar="label-studio|coco|cvat|csv",
                         help="the file's format (default: told from its content)")
    answers.add_argument("--reviewer", help="who answered, where the file does not say (COCO, CVAT, CSV)")


def add_job_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument("spec", nargs="?", help="job spec (YAML); flags below override its fields")
    run.add_argument("--input", help="s3://bucket/prefix, a local folder, a .parquet/.csv manifest, or an S3 "
                                     "Inventory's manifest.json or config folder")
    run.add_argument("--prefix", help="S3 Inventory input: only keys that start with this (input.prefix)")
    run.add_argument("--output", help="output folder, local or s3:// (a table's location for delta and iceberg)")
    run.add_argument("--format", choices=["parquet", "delta", "iceberg"],
                     help="parquet: a folder of Parquet files; delta or iceberg: a table, each run one version")
    run.add_argument("--source", choices=["torchvision", "timm", "huggingface", "onnx", "exported", "open_clip"],
                     help="where the model comes from (default torchvision)")
    run.add_argument("--model", help="its name: a torchvision architecture (resnet50) or module.path:build_fn, a timm "
                                     "model, a Hugging Face hub id or folder, an open_clip architecture")
    run.add_argument("--weights", help="torchvision weights name (IMAGENET1K_V2) or a model/checkpoint file path/URI")
    run.add_argument("--pretrained", help="open_clip: a pretrained tag or a checkpoint path/URI")
    run.add_argument("--labels", help="labels file, one class name per line (for zero_shot: the vocabulary)")
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


def add_output_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument("output", help="a job's output.uri: a folder or table location, local or s3://")
    command.add_argument("--catalog", metavar="KEY=VALUE", action="append",
                         help="iceberg with its catalog elsewhere: the job's output.catalog, one property per flag "
                              "(--catalog type=sql --catalog uri=sqlite:////path/catalog.db)")
    command.add_argument("--table", default="default.predictions", help="iceberg: the table's namespace.name")


def main(argv: list[str] | None = None, own_streams: bool = False) -> int:
    """`own_streams`: this process is the `pipeline` command, whose standard streams Ray may write into (a job's
    console is then its own; see pipeline/ray/console.py). A caller in-process keeps its streams as they are."""
    args = build_parser().parse_args(argv)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does, so a custom model module beside the spec imports
    try:
        if args.command == "run":
            return _run(args, own_streams)
        if args.command == "submit":
            return _submit(args)
        if args.command in ("report", "runs"):
            return _report(args) if args.command == "report" else _runs(args)
        if args.command == "search":
            return _search(args)
        if args.command == "export":
            return _export(args)
        if args.command == "dedup":
            return _dedup(args)
        if args.command == "truth":
            return _truth_import(args)
        from pipeline.dev.demo import run_demo
        return run_demo(keep=args.keep, own_streams=own_streams)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (JobStopped, JobFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, own_streams: bool = False) -> int:
    from pipeline.job.config import load_job
    from pipeline.run.executor import choose_executor

    cfg = load_job(args.spec, _overrides(args))
    if choose_executor(cfg.compute) == "local":
        from pipeline.local.process import start_model_process

        worker = start_model_process(cfg.model.source)  # it imports torch while this process imports the rest
        print(f"Job: {cfg.input.uri} -> {cfg.output.uri}", flush=True)
        from pipeline.local.executor import run_locally

        run_locally(cfg, out=sys.stdout, worker=worker)
        return 0
    console = None
    if own_streams:
        from pipeline.ray.console import Console

        console = Console.of_this_process()
    out = console.out if console is not None else sys.stdout
    # Importing Ray and Arrow takes seconds: say what is coming first.
    print(f"Job: {cfg.input.uri} -> {cfg.output.uri}\n  loading Ray …", file=out, flush=True)
    from pipeline.ray.executor import run_on_ray

    try:
        with console.ray_failures() if console is not None else nullcontext():
            run_on_ray(cfg, out=out, console=console)
    finally:
        out.flush()
    return 0


def _submit(args: argparse.Namespace) -> int:
    from pipeline.ray.submit import submit

    return submit(args.spec, _overrides(args), args.address, sys.stdout, wait=not args.no_wait)


def _catalog(args: argparse.Namespace) -> dict[str, str] | None:
    if not args.catalog:
        return None
    pairs = [item.partition("=") for item in args.catalog]
    if any(not key or not sep for key, sep, _ in pairs):
        raise UserError("--catalog: give each catalog property as KEY=VALUE, e.g. --catalog type=sql")
    return {key: value for key, _, value in pairs}


def _open_output(args: argparse.Namespace):
    from pipeline.report.outputs import open_output_for_reading
    from pipeline.io.storage import Storage

    return open_output_for_reading(Storage.from_env(), args.output, _catalog(args), args.table)


def _report(args: argparse.Namespace) -> int:
    from pipeline.report import build_report

    table, scores = _open_output(args), None
    if args.truth:
        scores = _scores(args, table)
    run_id, html = build_report(table, args.run, args.against, scores)
    path = args.out or f"report-{run_id}.html"
    _write_page(path, html, "report")
    print(f"Report on run {run_id} written to {path} ({len(html.encode()) / 1e6:.1f} MB)")
    if scores is not None:
        from pipeline.report.scores import lines

        print("\n".join(lines(scores)))
    return 0


def _scores(args: argparse.Namespace, table):
    """The live runs scored against the output's truth table (the reported run and --against compared)."""
    from pipeline.report.outputs import find_run
    from pipeline.report.scores import score_runs
    from pipeline.review.truth import read_truth

    run_id = find_run(table, args.run)["run_id"]
    against = find_run(table, args.against, flag="--against")["run_id"] if args.against else None
    truth = read_truth(table.storage, args.output, _catalog(args), args.table)
    return score_runs(table, truth, run_id, against)


def _truth_import(args: argparse.Namespace) -> int:
    from pipeline.io.storage import Storage
    from pipeline.review.truth import import_truth

    done = import_truth(Storage.from_env(), args.output, args.file, args.source, args.reviewer, _catalog(args),
                        args.table)
    print(f"Imported {done.answers:,} answer(s) ({done.source}) from {args.file} into {done.table_uri} (import "
          f"{done.import_id})" + (f"; {done.unanswered:,} item(s) without an answer skipped" if done.unanswered
                                  else ""))
    if done.unknown:
        print(f"{done.unknown:,} of {done.answers:,} answers name inputs the output does not have")
    return 0


def _search(args: argparse.Namespace) -> int:
    from pipeline.report.search import results_page, search

    if args.limit < 1:
        raise UserError("--limit: give a number of images, at least 1")
    table = _open_output(args)
    record, hits = search(table, args.text, args.limit)
    print(f"{len(hits)} best match(es) for {args.text!r} in {args.output} (model {record.get('model')}, run "
          f"{record['run_id']}):")
    for hit in hits:
        print(f"  {hit.score:.4f}  {hit.uri}" + (f"  frame {hit.frame}" if hit.frame is not None else ""))
    if args.out:
        _write_page(args.out, results_page(table, args.text, record, hits), "search results")
        print(f"Results with thumbnails written to {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline.review.export import ExportRequest, export
    from pipeline.review.selection import MEASURES, Selection

    if args.by not in MEASURES:
        raise UserError(f"--by {args.by}: give one of {', '.join(MEASURES)}")
    if args.per_label is not None and args.per_label < 1:
        raise UserError(f"--per-label {args.per_label}: give a number of rows per label, at least 1")
    selection = Selection.parse(args.select, args.by, args.per_label, args.band)
    request = ExportRequest(args.to, selection, args.run, args.presign, args.out)
    print(export(_open_output(args), request))
    return 0


def _dedup(args: argparse.Namespace) -> int:
    from pipeline.review.dedup import dedup

    result = dedup(_open_output(args), args.run, args.max_distance, args.min_similarity)
    print(f"{result.groups} near-duplicate group(s), {result.rows_in_groups} of {result.rows} row(s) in groups: "
          f"written to {result.table.describe()}")
    return 0


def _write_page(path: str, page: str, what: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as exc:
        raise UserError(f"-o {path}: cannot write the {what} ({exc.strerror}); choose a writable path") from None


def _runs(args: argparse.Namespace) -> int:
    from pipeline.report.runs import print_runs

    print_runs(_open_output(args), sys.stdout, next_run=not args.no_listing)
    return 0


def _overrides(args: argparse.Namespace) -> dict:
    from pipeline.job.config import OVERRIDES

    return {flag: getattr(args, flag, None) for flag in OVERRIDES}


def entry() -> None:
    """The `pipeline` command: main(), then a quick exit. Everything the job wrote is committed and closed by
    then; Python's own teardown would spend seconds collecting the heap of torch, Ray and Arrow objects."""
    code = main(own_streams=True)
    stop_ray()  # the local Ray this process started (atexit would, but os._exit skips atexit)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
