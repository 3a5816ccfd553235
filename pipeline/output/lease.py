"""One run at a time per output folder: a lease held for the whole run. `OutputLease.for_output` gives the one
that fits: a `FileLease` (an advisory `flock` on `<output>/_lock`, dropped by the kernel when the holder dies)
or an `ObjectLease` on S3, GCS or Azure (`<output>/_lock.json`, created only if absent, renewed only if unchanged,
taken over after LEASE_TTL_S by the store's clock). A driver that lost its lease publishes nothing more. docs/commit-protocol.md, step 2."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.io.conditional import delete_if_match, put_small, read_with_age, ready
from pipeline.io.storage import Storage, is_remote, join
from pipeline.job.errors import UserError

LEASE_TTL_S = 60.0
RENEW_EVERY_S = 10.0


@dataclass
class Holder:
    run_id: str
    host: str
    pid: int
    machine: str  # host + boot + pid namespace: a pid means something only on the same one
    heartbeat: float  # unix time of the last renewal, by the holder's clock (shown to people only)

    @classmethod
    def me(cls, run_id: str) -> "Holder":
        return cls(run_id=run_id, host=socket.gethostname(), pid=os.getpid(), machine=_machine(),
                   heartbeat=time.time())

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Holder | None":
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def died_here(self) -> bool:
        """It ran on this machine (same host, boot and pid namespace) and its process is gone."""
        return self.machine == _machine() and not _process_alive(self.pid)

    def is_me(self, run_id: str) -> bool:
        return (self.run_id, self.machine, self.pid) == (run_id, _machine(), os.getpid())

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, heartbeat {age:.0f}s ago)"


def _machine() -> str:
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(path) if path.endswith("/pid") else Path(path).read_text().strip())
        except OSError:
            parts.append("?")
    return ":".join(parts)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def busy_message(output_uri: str, holder: Holder | None) -> str:
    who = holder.describe() if holder else "another run"
    return (f"output.uri: {output_uri} is in use by {who}; wait for it to finish, or if it died on another "
            f"host, retry after its lease expires ({LEASE_TTL_S:.0f}s without a heartbeat)")


def check_conditional_writes(storage: Storage, output_uri: str) -> None:
    """Refuse a store that ignores create-if-absent writes, unless the user chose to run without them.

    The lease, the commit records and the chunks rely on a create-only write being refused when the object exists
    (S3's If-None-Match: *, GCS's ifGenerationMatch=0, Azure's If-None-Match: *). A store that ignores it would let
    two drivers both take the lease and both commit; so before anything else, create a probe object twice and
    expect the second to be refused."""
    if not storage.conditional_writes:
        return
    probe = join(output_uri, f"_probe/{uuid.uuid4().hex}")
    fix = ("use a store that honours them (AWS S3, MinIO, Ceph RGW, R2, Google Cloud Storage and Azure Blob "
           "Storage do), or, if you make sure yourself that one run at a time writes this output, set "
           "output.conditional_writes: false")
    try:
        for attempt in range(2):
            try:
                put_small(storage, probe, b"probe", if_absent=True)
            except FileExistsError:
                if attempt == 1:
                    return
                raise
            except Exception as exc:  # noqa: BLE001 - the store refused the request itself
                raise UserError(f"output.uri: the store refused a conditional write to {output_uri} "
                                f"({_reason(exc)}); the lease and commits need create-only writes; {fix}") from None
        raise UserError(f"output.uri: the store ignores conditional writes (a create-only write of an existing "
                        f"object under {output_uri} succeeded), so two runs could both commit; {fix}")
    finally:
        try:
            storage.delete([probe])
        except Exception:  # noqa: BLE001 - a probe left behind is harmless
            pass


def _reason(exc: BaseException) -> str:
    from pipeline.io.storage import error_code

    return f"{error_code(exc) or type(exc).__name__}: {exc}"


class OutputLease:
    """One run's hold on its output folder, as a context manager: `__enter__` takes it or raises UserError
    naming who holds it, and `check()` is called before every visible write. `for_output` picks the kind."""

    def __init__(self, storage: Storage, output_uri: str, run_id: str):
        self.storage = storage
        self.output_uri = output_uri
        self.run_id = run_id
        self.lost: str | None = None  # why the lease was lost, once it was

    @staticmethod
    def for_output(storage: Storage, output_uri: str, run_id: str) -> "OutputLease":
        """The lease that fits the output: an object in an object store, a flock on a local folder."""
        return (ObjectLease if is_remote(output_uri) else FileLease)(storage, output_uri, run_id)

    def __enter__(self) -> "OutputLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def check(self) -> None:
        """Raise if another driver may have taken the output over: it must not see two publishers."""
        if self.lost:
            raise UserError(f"output.uri: lost the lease on {self.output_uri} ({self.lost}); this run's staged "
                            "rows stay and a rerun resumes them")


class FileLease(OutputLease):
    """A local output held by an exclusive, non-blocking flock on `<output>/_lock`, which names the holder."""

    _fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        os.makedirs(self.output_uri, exist_ok=True)
        path = join(self.output_uri, "_lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.from_bytes(os.pread(fd, 4096, 0))
            os.close(fd)
            raise UserError(busy_message(self.output_uri, holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, Holder.me(self.run_id).to_bytes(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file itself stays, harmlessly


class ObjectLease(OutputLease):
    """An output in an object store held by the object `<output>/_lock.json`: created if absent or taken over once
    expired, then renewed by a heartbeat thread with conditional writes until released or found lost."""

    def __init__(self, storage: Storage, output_uri: str, run_id: str):
        super().__init__(storage, output_uri, run_id)
        self.uri = join(output_uri, "_lock.json")
        self._etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._renewed_at = time.monotonic()

    def acquire(self) -> None:
        self._take()
        self._renewer = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        self._stop.set()
        if not self._renewer:
            return
        self._renewer.join()
        if self.lost:
            return
        try:
            delete_if_match(self.storage, self.uri, self._etag)
        except Exception:  # noqa: BLE001 - someone else holds it now, or it expires on its own
            pass

    def check(self) -> None:
        if self._renewer and not self.lost and time.monotonic() - self._renewed_at > LEASE_TTL_S / 2:
            self.lost = f"it could not be renewed for {LEASE_TTL_S / 2:.0f}s"
        super().check()

    def _put(self, if_absent: bool = False, if_match: str | None = None) -> str:
        ready(self.storage, self.uri)
        sent = time.monotonic()  # not the reply's time: the lease runs from when the server wrote it, before that
        etag = put_small(self.storage, self.uri, Holder.me(self.run_id).to_bytes(), if_absent, if_match)
        self._renewed_at = sent
        return etag

    def _take(self) -> None:
        if not self.storage.conditional_writes:
            return self._take_unconditionally()
        try:
            self._etag = self._put(if_absent=True)
            return
        except FileExistsError:
            pass
        except Exception as exc:  # noqa: BLE001 - the store refused the request itself
            raise UserError(self._unsupported(exc)) from None
        current = read_object_lease(self.storage, self.output_uri)
        if current is None:  # released between our two requests: try once more from the top
            return self._take()
        holder, etag, age = current
        if holder is not None and holder.is_me(self.run_id):
            # Our own create took effect but its reply was lost, and the retry then found it: it is ours.
            self._etag = etag
            return
        if _still_held(holder, age):
            raise UserError(busy_message(self.output_uri, holder))
        try:
            self._etag = self._put(if_match=etag)  # of several claimants of an expired lease, exactly one wins
        except FileExistsError:
            raise UserError(busy_message(self.output_uri, None)) from None

    def _take_unconditionally(self) -> None:
        """output.conditional_writes: false. Look, then write: two drivers starting within one round trip of each
        other can both take it, which is the weaker promise the user chose."""
        current = read_object_lease(self.storage, self.output_uri)
        if current is not None:
            holder, _, age = current
            if not (holder is not None and holder.is_me(self.run_id)) and _still_held(holder, age):
                raise UserError(busy_message(self.output_uri, holder))
        self._etag = self._put()

    def _unsupported(self, exc) -> str:
        return (f"output.uri: cannot take the lease {self.uri} ({_reason(exc)}); the store must support "
                "conditional writes (create-only and replace-if-unchanged), as AWS S3, MinIO, GCS and Azure do")

    def _renew_loop(self) -> None:
        while not self._stop.wait(RENEW_EVERY_S) and not self.lost:
            self._renew_once()

    def _renew_once(self) -> None:
        try:
            self._etag = self._put(if_match=self._etag if self.storage.conditional_writes else None)
        except FileExistsError:
            self._check_still_mine()
        except Exception:  # noqa: BLE001 - transient: the next renewal retries; check() gives up after TTL/2
            pass

    def _check_still_mine(self) -> None:
        """A renewal whose reply was lost and was retried fails its own condition; look before giving up."""
        try:
            current = read_object_lease(self.storage, self.output_uri)
        except Exception:  # noqa: BLE001 - cannot tell now; the next renewal looks again
            return
        if current is not None and current[0] is not None and current[0].is_me(self.run_id):
            self._etag = current[1]
            self._renewed_at = time.monotonic() - current[2]  # written that long ago, by the server's clock
        else:
            self.lost = "another run took it over"


def _still_held(holder: Holder | None, age: float) -> bool:
    """A lease written within the TTL (server's clock) whose holder is not known to have died on this machine."""
    return age <= LEASE_TTL_S and not (holder is not None and holder.died_here())


def read_object_lease(storage: Storage, output_uri: str) -> tuple[Holder | None, str, float] | None:
    """(holder, ETag, seconds since its last write by the store's clock), or None if there is no lease."""
    found = read_with_age(storage, join(output_uri, "_lock.json"))
    if found is None:
        return None
    data, etag, age = found
    return Holder.from_bytes(data), etag, age


def lease_status(storage: Storage, output_uri: str) -> str:
    """Who holds the output now, in words, without taking anything (`pipeline runs`)."""
    if not is_remote(output_uri):
        import fcntl

        path = join(output_uri, "_lock")
        if not os.path.exists(path):
            return "free"
        with open(path, "rb") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = Holder.from_bytes(lock.read(4096))
                return f"held by {holder.describe() if holder else 'a running job'}"
        return "free"
    current = read_object_lease(storage, output_uri)
    if current is None:
        return "free"
    holder, _, age = current
    who = holder.describe() if holder else "an unreadable holder"
    if not _still_held(holder, age):
        return f"expired: last held by {who}; the next run takes it over"
    return f"held by {who}"
