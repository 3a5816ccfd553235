"""The listing as a Ray `Datasource`: one read task that streams `InputListing.blocks`, its counts kept in a small
actor (the run's ledger, or a `ListingTally`) so the driver can show progress and, once listing ends, what remains.
Ray's streaming executor hands each page's block on while the listing goes on (see run/plan.BLOCK_BYTES)."""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.io.listing import InputListing
from pipeline.run.counts import ListingCounts
from pipeline.job.rows import SOURCE_SCHEMA

ListingTally = ray.remote(num_cpus=0)(ListingCounts)  # on its own, for a dataset built without an executor


class ListingDatasource(Datasource):
    def __init__(self, listing: InputListing, tally=None):
        super().__init__()
        self.listing = listing
        self.tally = tally

    def get_name(self) -> str:
        return self.listing.name

    @property
    def supports_distributed_reads(self) -> bool:
        # False makes Ray run the listing task on the driver's node. On a worker node that died, Ray would
        # rerun it from the first page, and a long listing would stall the job meanwhile. (Passing a
        # scheduling_strategy to read_datasource is silently ignored in Ray 2.60.)
        return False

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        metadata = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(self._blocks, metadata, schema=SOURCE_SCHEMA, per_task_row_limit=per_task_row_limit)]

    def _blocks(self) -> Iterator[pa.Table]:
        if self.tally is None:
            yield from self.listing.blocks()
            return
        yield from self.listing.blocks(lambda *counts: self.tally.listing_add.remote(*counts))
        ray.get(self.tally.listing_finished.remote())
