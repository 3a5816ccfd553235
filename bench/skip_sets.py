"""What incremental and resumed runs cost the listing at scale: building the done-sets and filtering pages.

    .venv/bin/python bench/skip_sets.py --inputs 1000000 10000000

For N earlier rows, builds the version-key set as the listing task does (BLAKE2b-128 of uri, ETag,
last-modified, size; sorted numpy array), then filters N listed objects, half of them changed, a page of
1,000 at a time. Reports seconds and the set's memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.io.storage import ObjectInfo  # noqa: E402
from pipeline.output.history import DoneFilter, KeySet, table_keys  # noqa: E402

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def earlier_rows(n: int, start: int) -> pa.Table:
    ids = range(start, start + n)
    return pa.table({"uri": [f"s3://photos/2026/{i:09d}.jpg" for i in ids], "etag": [f"{i:032x}" for i in ids],
                     "last_modified": pa.array([T0 + timedelta(seconds=i) for i in ids], pa.timestamp("us", "UTC")),
                     "size": pa.array([100_000 + i % 1000 for i in ids], pa.int64())})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", type=int, nargs="+", default=[1_000_000])
    args = parser.parse_args()
    print("| earlier rows | build set s | set MiB | filter N listed s | objects/s | peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.inputs:
        started = time.perf_counter()
        keys = np.concatenate([table_keys(earlier_rows(min(100_000, n - s), s), "version")
                               for s in range(0, n, 100_000)])
        done = DoneFilter(KeySet(keys), KeySet(np.array([], dtype="S16")))
        build = time.perf_counter() - started
        started = time.perf_counter()
        kept = 0
        for page_start in range(0, n, 1000):
            page = [ObjectInfo(uri=f"s3://photos/2026/{i:09d}.jpg", size=100_000 + i % 1000,
                               etag=f"{i:032x}" if i % 2 else "changed", last_modified=T0 + timedelta(seconds=i))
                    for i in range(page_start, min(page_start + 1000, n))]
            kept += len(done.todo(page))
        filtering = time.perf_counter() - started
        assert kept == n // 2
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {n:,} | {build:.1f} | {done.done_versions.keys.nbytes / 2**20:.0f} | {filtering:.1f} | "
              f"{n / filtering:,.0f} | {peak:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
