"""The local executor's model process: `python -m pipeline.local.worker FD`, talking to the driver over socket FD.

It checks the model, sets the job's stages up once, then runs every chunk of inputs through them: the stages
ahead of the model (read, decode) in threads, several chunks at once, the model in the main thread, the cores
shared between them (`CoreSplit`). The driver imports no torch; this is the job's only torch.
Messages, in order: ("check", model, storage) -> ("checked", spec, gpus); ("stages", stages, cores) ->
("ready",); then ("chunk", id, table, alone, crashed) -> ("started", id) when its work begins, ("stage", id,
name) before each stage when the chunk runs `alone`, and ("rows", id, table, busy_s); ("error", kind, message)
ends the process.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

from pipeline.job.errors import UserError
from pipeline.job.rows import error_columns
from pipeline.job.stage import Batch, Stage
from pipeline.run.inline import in_batches, to_table
from pipeline.run.isolation import CRASH_MESSAGE


class DriverGone(Exception):
    """The socket to the driver closed: the driver ended, or died."""


class Worker:
    def __init__(self, conn: Connection):
        self.conn = conn
        self.sending = threading.Lock()

    def send(self, *message) -> None:
        try:
            with self.sending:
                self.conn.send(message)
        except OSError:
            raise DriverGone() from None

    def recv(self) -> tuple:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise DriverGone() from None

    def serve(self) -> None:
        """The driver's requests until it sends its chunks; then the chunks until it closes the socket."""
        while True:
            kind, *args = self.recv()
            if kind == "check":
                self.send("checked", *check(*args))
            elif kind == "stages":
                self.run_chunks(*args)
                return

    def run_chunks(self, stages: list[Stage], cores: int) -> None:
        """Chunks are prepared (the stages ahead of the first stateful one) in a thread per core while the
        model's stage is set up, then each goes through the rest here, in the order it came."""
        os.environ["PIPELINE_SERVING"] = "1"  # for a custom model: serving the job now, no longer being checked
        first_stateful = next((i for i, s in enumerate(stages) if s.resources.stateful), len(stages))
        ahead, rest = stages[:first_stateful], stages[first_stateful:]
        for stage in ahead:
            stage.setup()
        prepared: queue.Queue[tuple | None] = queue.Queue()
        split = CoreSplit(cores)
        with ThreadPoolExecutor(cores, thread_name_prefix="prepare") as pool:
            threading.Thread(target=self.receive, args=(pool, ahead, prepared, split), daemon=True).start()
            for stage in rest:
                stage.setup()
            self.send("ready")
            while True:
                item = prepared.get()
                if isinstance(item, BaseException):
                    raise item
                chunk_id, alone, crashed, future = item
                batch = future.result()
                started = time.perf_counter()
                batch = run_stages(rest, batch, self.entering(chunk_id, alone), crashed)
                split.modelled(time.perf_counter() - started, len(batch["uri"]))
                self.send("rows", chunk_id, to_table(batch), time.perf_counter() - started)

    def receive(self, pool: ThreadPoolExecutor, ahead: list[Stage], prepared: queue.Queue, split: CoreSplit) -> None:
        """The driver's chunks, each handed to a thread; the process ends when the driver is gone, and anything
        else that goes wrong here is the main thread's to report."""
        try:
            while True:
                kind, chunk_id, table, alone, crashed = self.recv()
                batch = {name: column.to_numpy(zero_copy_only=False)
                         for name, column in zip(table.column_names, table.columns)}
                future = pool.submit(split.timed, run_stages, ahead, batch, self.entering(chunk_id, alone), crashed,
                                     on_start=self.started(chunk_id))
                prepared.put((chunk_id, alone, crashed, future))
        except DriverGone:
            os._exit(0)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread, which waits on `prepared`
            prepared.put(exc)

    def started(self, chunk_id: int):
        """Tell the driver a chunk's work has begun: only a started chunk can have killed this process."""
        return lambda: self.send("started", chunk_id)

    def entering(self, chunk_id: int, alone: bool):
        """For a chunk run alone, tell the driver each stage as it starts: if this process dies, it knows where."""
        if not alone:
            return None
        return lambda stage: self.send("stage", chunk_id, stage.name)


class CoreSplit:
    """The cores between the model's torch threads and the threads preparing its input, in proportion to the CPU
    each spends per image, measured on the first chunks with one torch thread: a light model leaves most cores to
    decoding, a heavy one takes them (on 2 cores, mobilenet_v3_small runs best with 1, resnet18 with 2). Then only
    as many chunks are prepared at once as there are cores torch leaves (docs/performance.md)."""
    SKIP, MEASURE = 1, 3  # chunks: warming up, then measured

    def __init__(self, cores: int):
        self.cores = cores
        self.model: list[float] = []  # CPU seconds per image of each chunk, in the model's one thread
        self.prepare: list[float] = []  # and in a preparing thread
        self.preparing = 0  # chunks being prepared now, at most `slots`: the cores torch leaves
        self.slots = cores
        self.slots_all_torch = False  # torch's threads take every core
        self.decided = False
        self.reniced = threading.local()
        self.turn = threading.Condition()

    def timed(self, run, stages: list[Stage], batch: Batch, *args, on_start) -> Batch:
        with self.turn:
            self.turn.wait_for(lambda: self.preparing < self.slots)
            self.preparing += 1
        self.yield_to_torch()
        try:
            on_start()
            started = time.thread_time()
            batch = run(stages, batch, *args)
            self.prepare.append((time.thread_time() - started) / max(1, len(batch["uri"])))
            return batch
        finally:
            with self.turn:
                self.preparing -= 1
                self.turn.notify()

    def yield_to_torch(self) -> None:
        """Once torch's threads take every core, a preparing thread runs at the lowest priority (nice 19): it still
        keeps the model fed from the time torch leaves, without preempting the forward pass (a ViT's steady rate on
        2 cores: 99 -> 116 img/s, docs/performance.md). Once per thread: a raised nice cannot be lowered again."""
        if self.slots_all_torch and not getattr(self.reniced, "done", False):
            self.reniced.done = True
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except OSError:
                pass

    def modelled(self, seconds: float, images: int) -> None:
        if self.decided:
            return
        self.model.append(seconds / max(1, images))
        measured = len(self.model) - self.SKIP
        if measured < 1 or "torch" not in sys.modules:
            return
        model, prepare = (sum(xs[self.SKIP:]) / len(xs[self.SKIP:]) for xs in (self.model, self.prepare))
        # Decided early when a third more or less on either side would not change the split (a heavy ViT on 2 cores
        # says so after one chunk instead of three, each of them run at one thread).
        threads, low, high = (self.threads_for(model * m, prepare / m) for m in (1, 0.75, 1.33))
        if measured < self.MEASURE and low != high:
            return
        import torch

        self.decided = True
        torch.set_num_threads(threads)
        with self.turn:
            self.slots = max(1, self.cores - threads)
            self.slots_all_torch = threads >= self.cores
        print(f"torch threads: {threads} of {self.cores} cores (per image: model {model * 1e3:.1f} ms, reading "
              f"and decoding {prepare * 1e3:.1f} ms)", file=sys.stderr, flush=True)

    def threads_for(self, model: float, prepare: float) -> int:
        return max(1, min(self.cores, round(self.cores * model / max(1e-9, model + prepare))))


def run_stages(stages: list[Stage], batch: Batch, entering, crashed: tuple[str, int] | None) -> Batch:
    """`batch` through `stages`; `crashed` (stage, deaths): its rows become that stage's crash error row there."""
    for stage in stages:
        if entering is not None:
            entering(stage)
        if crashed is not None and crashed[0] == stage.name:
            errors, error_types = error_columns(batch)
            errors[:] = f"{stage.name}: {CRASH_MESSAGE.format(deaths=crashed[1])}"
            error_types[:] = f"{stage.name}.worker_crashed"
            batch.update(error=errors, error_type=error_types)
        batch = in_batches(stage, batch)
    return batch


def check(model, storage) -> tuple:
    """The model resolved and built here, where it will run; the GPUs this process sees."""
    import torch

    from pipeline.models import resolve

    resolve.keep_checked = True  # this process serves next: the model checked here is the one it serves with
    return resolve.resolve_model(model, storage), torch.cuda.device_count()


def main(fd: int, source: str = "torchvision") -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; this process ends with it
    end_with_parent()
    threading.Thread(target=warm_up, args=(source,), daemon=True).start()
    worker = Worker(Connection(fd))
    try:
        worker.serve()
    except DriverGone:
        pass
    except UserError as exc:
        report(worker, "user", str(exc))
    except BaseException as exc:  # noqa: BLE001 - anything else ends the job in one line; the log has the rest
        traceback.print_exc()
        report(worker, "failed", f"{type(exc).__name__}: {exc}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def warm_up(source: str) -> None:
    """Imports what checking the job's model needs (torch, and the model source's own library) while the driver is
    still getting ready to ask, a second or so; a request that comes sooner waits on Python's import lock, and an
    import that fails here fails there again, where it is reported."""
    try:
        import importlib

        from pipeline.models.resolve import source_module

        for name in getattr(source_module(source), "LIBRARY", ()) if source != "torchvision" else ():
            importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - see above
        pass


def report(worker: Worker, kind: str, message: str) -> None:
    try:
        worker.send("error", kind, message)
    except DriverGone:
        pass


def end_with_parent() -> None:
    """Linux: this process is killed when the driver's thread that started it ends (the run's own thread), even
    while it builds the model and reads no socket."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere, the closed socket ends it once it next reads


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:3])
