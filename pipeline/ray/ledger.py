"""The run's ledger, served from one small Ray actor on the driver's node: what the model actors and decode tasks
start and end (run/isolation.LedgerBook, one per stage) and the listing's counts (run/counts.ListingCounts).

It lives apart from executor.py on purpose: an actor's process imports the module that defines its class, and
this one needs Ray, numpy and Arrow, not Ray Data, pydantic and the output formats (a second or two of start-up).
"""

from __future__ import annotations

import ray

from pipeline.models.reuse import ClaimBook
from pipeline.run.isolation import BuildBook, LedgerBook, ModelBuildCrashed
from pipeline.run.counts import ListingCounts


@ray.remote(num_cpus=0)
class BatchLedger(ListingCounts):
    """Inputs the model actors (and decode tasks) start and end, kept on the driver's node: which inputs kill their
    process (isolation.py), and how many inputs the model actors started, lost ones included. That is more than the
    driver receives when a node or an actor died with batches (running, or done but not yet handed on) that Ray
    then ran again. It also keeps the listing's counts: one actor, not two (each is a process that imports Ray)."""

    def __init__(self):
        super().__init__()
        self.books = {"model": LedgerBook(), "decode": LedgerBook()}
        self.builds = BuildBook()
        self.claims = ClaimBook()

    def claim(self, contents: list[str], uris: list[str]) -> list[bool]:
        return self.claims.claim(contents, uris)

    def start(self, stage: str, worker: str, uris: list[str]) -> bool:
        return self.books[stage].start(worker, uris)

    def begin_input(self, stage: str, worker: str, uri: str) -> int:
        return self.books[stage].begin_input(worker, uri)

    def finish(self, stage: str, worker: str, uris: list[str]) -> None:
        self.books[stage].finish(worker, uris)

    def building(self, actor: str) -> str | None:
        self.builds.start(actor)
        return self.builds.failure

    def built(self, actor: str) -> None:
        self.builds.done(actor)

    def failure(self) -> str | None:
        """Why the job cannot go on, when the ledger knows (actors that die building the model)."""
        return self.builds.failure

    def received(self, uris: list[str]) -> None:
        """The driver has these inputs' rows (see isolation.py: only that settles an input)."""
        for book in self.books.values():
            book.received(uris)

    def model_inputs_started(self) -> int:
        return self.books["model"].inputs_started

    def model_first_finished_at(self) -> float | None:
        return self.books["model"].first_finished_at

    def model_busy_fraction(self) -> float | None:
        return self.books["model"].busy_fraction()


class RayLedger:
    """The ledger as the stages see it (they know nothing of Ray), calling from the worker process it runs in.
    `start` waits for its answer, so the driver's final count has every batch started; `finish` need not wait
    (Ray keeps one caller's calls in order)."""

    def __init__(self, actor, stage: str = "model"):
        self.actor = actor
        self.stage = stage

    def for_stage(self, stage: str) -> "RayLedger":
        return RayLedger(self.actor, stage)

    @staticmethod
    def worker() -> str:
        return ray.get_runtime_context().get_worker_id()

    def start(self, uris: list[str]) -> bool:
        return ray.get(self.actor.start.remote(self.stage, self.worker(), uris))

    def begin_input(self, uri: str) -> int:
        return ray.get(self.actor.begin_input.remote(self.stage, self.worker(), uri))

    def finish(self, uris: list[str]) -> None:
        self.actor.finish.remote(self.stage, self.worker(), uris)

    def claim(self, contents: list[str], uris: list[str]) -> list[bool]:
        return ray.get(self.actor.claim.remote(contents, uris))

    def building(self) -> None:
        try:
            failure = ray.get(self.actor.building.remote(ray.get_runtime_context().get_actor_id()))
        except ray.exceptions.RayActorError:  # the job that asked for this actor has ended: nothing to bound
            return
        if failure is not None:
            raise ModelBuildCrashed(failure)

    def built(self) -> None:
        self.actor.built.remote(ray.get_runtime_context().get_actor_id())
