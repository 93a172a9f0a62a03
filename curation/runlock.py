"""One run per run directory: an exclusive lock with a record of who holds it.

Two ``curate run`` on one ``--out`` would both execute every stage and overwrite each other's
files. ``RunLock`` takes an advisory ``flock`` on ``RUN/run.lock`` without waiting: a second
acquirer fails at once with ``RunLocked``, whose message names the holder (host, pid, start
time, command) from the JSON record the holder wrote into the lock file.

The kernel drops a ``flock`` when its holder dies (SIGKILL, OOM, a crashed node's NFS lease
expiring), so a dead run never blocks the next one. Its record stays behind, though: a record
found in a lock that could be taken is *stale*, and ``took_over`` reports it (host, pid, and
whether that pid is gone) so the caller can say it resumes after an unclean stop. A clean
release empties the record.

The lock is exclusive per acquisition, not per process: the same process acquiring twice is
refused too, so take it in exactly one place. It needs a file system with working locks
(local disks, NFSv4, EFS); an NFS mount with ``nolock`` locks per machine only. On NFS, Linux
emulates ``flock`` with POSIX locks, which a process loses when it closes *any* descriptor of
the file: the holder must not open ``run.lock`` otherwise (``read_holder`` is for other processes).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

LOCK_NAME = "run.lock"
_RECORD_WAIT_S = 0.5  # a holder writes its record just after taking the lock


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a run directory's lock."""

    host: str
    pid: int
    started: str  # ISO 8601, UTC
    command: str

    @classmethod
    def current(cls, command: str | None = None) -> "Holder":
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return cls(socket.gethostname(), os.getpid(), started, command if command is not None else shlex.join(sys.argv))

    @classmethod
    def from_json(cls, text: str) -> "Holder | None":
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), str(d["started"]), str(d["command"]))
        except (ValueError, KeyError, TypeError):
            return None

    def is_local(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool | None:
        """Whether the process still runs: known only on its own host (None elsewhere)."""
        if not self.is_local():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # it exists, under another user
        return True

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}: {self.command}"


class RunLockError(RuntimeError):
    """The run directory cannot be locked at all (no such directory, a file system without locks)."""


class RunLocked(RunLockError):
    """Another process holds the run directory's lock."""

    def __init__(self, lock_path: Path, holder: Holder | None):
        self.lock_path = lock_path
        self.holder = holder
        run_dir = lock_path.parent
        if holder is None:
            msg = f"another run is using {run_dir} (it holds {lock_path} but has not written who it is)"
        else:
            msg = f"another run is using {run_dir}: {holder.describe()}"
            if holder.alive() is False:
                msg += (
                    f". That process is gone, but a process it started still holds the lock "
                    f"(see `fuser -v {lock_path}`); stop it first"
                )
        super().__init__(msg + ". Wait for it to finish, stop it, or choose another --out.")


class RunLock:
    """Exclusive lock on a run directory; use as ``with RunLock(run_dir): ...``.

    ``holder`` is this process's record; ``took_over`` the stale record of an earlier holder
    that stopped without releasing (None after a clean release or on a fresh directory).
    """

    def __init__(self, run_dir: str | Path, command: str | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.command = command
        self.holder: Holder | None = None
        self.took_over: Holder | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock or raise ``RunLocked`` at once (never waits for the holder)."""
        if self._fd is not None:
            raise RunLockError(f"{self.path} is already held by this RunLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _wait_for_record(fd)
            os.close(fd)
            raise RunLocked(self.path, holder) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise RunLockError(f"cannot lock {self.path}: the file system does not support locks ({e.strerror})") from None
            raise
        try:
            self.took_over = Holder.from_json(_read(fd))
            self.holder = Holder.current(self.command)
            _write(fd, json.dumps(asdict(self.holder), sort_keys=True) + "\n")
        except BaseException:
            os.close(fd)  # closing drops the lock
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the record (a clean stop) and drop the lock; safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            os.fsync(fd)
        finally:
            os.close(fd)  # closing the only descriptor drops the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_free(run_dir: str | Path) -> None:
    """Raise ``RunLocked`` if a live process holds the directory's lock; writes nothing (a shared
    lock tried and dropped). The CLI calls it before loading the pipeline, whose stage modules
    import torch and friends, so a busy directory is refused in about a second."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _wait_for_record(fd)
        raise RunLocked(path, holder) from None
    except OSError:
        return  # no working locks here: RunLock.acquire says so with the full story
    finally:
        os.close(fd)


def read_holder(run_dir: str | Path) -> Holder | None:
    """The record in a run directory's lock file (a current or a stale holder), or None."""
    try:
        text = (Path(run_dir) / LOCK_NAME).read_text()
    except FileNotFoundError:
        return None
    return Holder.from_json(text) if text.strip() else None


def _read(fd: int) -> str:
    return os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")


def _write(fd: int, text: str) -> None:
    data = text.encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _wait_for_record(fd: int) -> Holder | None:
    """The holder's record, waiting briefly in case it has only just taken the lock."""
    deadline = time.monotonic() + _RECORD_WAIT_S
    while True:
        holder = Holder.from_json(_read(fd))
        if holder is not None or time.monotonic() >= deadline:
            return holder
        time.sleep(0.02)
