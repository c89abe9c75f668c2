"""Lock files, so that independent jobs (SLURM array tasks, other machines) can share one folder: one lock per
bag of a feature extraction (OUT/locks/<bag>.lock, `qgmil.extract`), one per run directory (RUN_DIR/run.lock,
`qgmil.rundir`).

A job creates FOLDER/<name>.lock exclusively (O_CREAT | O_EXCL: of two jobs, one wins), holding JSON {name, host,
pid, job (SLURM), started, token}. Other jobs keep off while the lock lives. A background thread renews the mtime
of every lock the job holds every HEARTBEAT_SECONDS, so a lock is stale when

  - its host is this host and its pid is not running (a killed job: recovered at once), or
  - its mtime is older than `stale_after` (STALE_MINUTES by default): its job stopped beating (killed on
    another host, frozen). The margin allows for clocks of different hosts a few minutes apart.

Jobs that find the same stale lock compete for a marker file named after it (O_EXCL again): the one that
creates it removes the lock if it is still the one judged stale, then the name is claimed anew with O_EXCL. So
exactly one job wins however many recover a lock at once, with only create, stat and unlink (no renames or hard
links, which some shared file systems lack). A job removes its lock once its work is done or has failed.
`verify`, just before a result is written, tells a job whose lock was taken over while it had stopped beating
(e.g. a suspended job) not to write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

HEARTBEAT_SECONDS = 30.0
STALE_MINUTES = 10.0  # 20 missed heartbeats
RECOVER_SECONDS = 60.0  # removing a stale lock takes milliseconds: a marker this old was left by a killed job


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file says."""

    host: str
    pid: int
    job: str | None = None  # SLURM job id (array_job_task for array tasks)
    started: str = ""
    token: str = ""  # unique per claim: tells two claims of one process apart

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}" + (f" (SLURM job {self.job})" if self.job else "")

    @classmethod
    def this_process(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), slurm_job())


def slurm_job() -> str | None:
    """This process's SLURM job as `squeue` shows it (12345, or 12345_3 for task 3 of an array), if any."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


class LockBusy(Exception):
    """A lock belongs to another live job (or was taken over from this one)."""

    def __init__(self, path: Path, holder: Holder | None):
        self.path, self.holder = path, holder
        super().__init__(f"{path}: locked by {self.by}")

    @property
    def by(self) -> str:
        return str(self.holder) if self.holder else "another job"


@dataclass(frozen=True)
class _Seen:
    """One look at a lock file: who it names (None: unreadable, e.g. still being written) and which file it is."""

    holder: Holder | None
    inode: int
    mtime_ns: int


def _look(path: Path) -> _Seen | None:
    """The lock file at `path`, or None when there is none."""
    try:
        stat = os.stat(path)
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        holder = Holder(str(data["host"]), int(data["pid"]), data.get("job"), str(data.get("started", "")),
                        str(data.get("token", "")))
    except (ValueError, KeyError, TypeError):
        holder = None
    return _Seen(holder, stat.st_ino, stat.st_mtime_ns)


def _running(pid: int) -> bool:
    """Whether process `pid` exists on this host (signal 0 only checks, it sends nothing)."""
    if os.name == "nt":
        return True  # there os.kill would end the process: locks of this host go stale by age only
    if pid <= 0:
        return False  # not a process id (os.kill(0, ...) would mean this process group)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _marker(path: Path, seen: _Seen) -> Path:
    """The marker of taking over the lock `seen`: jobs that judged the same lock stale compete for one name."""
    identity = f"{seen.holder.token if seen.holder else ''}:{seen.inode}:{seen.mtime_ns}".encode()
    return path.with_name(f"{path.name}.{hashlib.sha1(identity, usedforsecurity=False).hexdigest()[:12]}.recover")


def stale_reason(seen: _Seen, *, host: str, stale_after: float, now: float | None = None) -> str | None:
    """Why the lock `seen` is stale, or None while its holder may still be working."""
    holder = seen.holder
    if holder is not None and holder.host == host and not _running(holder.pid):
        return f"{holder}: process not running"
    age = (time.time() if now is None else now) - seen.mtime_ns / 1e9
    if age > stale_after:
        since = f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min"
        return f"{holder or 'unreadable lock'}: no heartbeat for {since}"
    return None


class FileLocks:
    """The locks one job holds in `folder`. As a context manager: heartbeat on, every lock released at exit.

    stale_after: seconds without heartbeat after which another job may take a lock over.
    """

    def __init__(self, folder: str | Path, *, stale_after: float = STALE_MINUTES * 60,
                 heartbeat: float = HEARTBEAT_SECONDS):
        if not stale_after > 0:
            raise ValueError(f"lock staleness must be > 0 seconds, got {stale_after}")
        self.folder = Path(folder)
        self.stale_after = stale_after
        self.heartbeat = min(heartbeat, stale_after / 4)  # a live lock is renewed well before it goes stale
        self.me = Holder.this_process()
        self._held: dict[str, Holder] = {}
        self._mutex = threading.Lock()  # _held is read by the heartbeat thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.lock"

    def claim(self, name: str) -> str | None:
        """Take the lock of `name`, or raise LockBusy naming its live holder.

        Returns why the stale lock taken over was stale, or None when there was none.
        """
        path = self.path(name)
        self.folder.mkdir(parents=True, exist_ok=True)
        recovered, seen = None, None
        for _ in range(4):  # the lock may vanish or change between a look and an act: look again
            mine = self._create(path, name)
            if mine is not None:
                with self._mutex:
                    self._held[name] = mine
                return recovered
            seen = _look(path)
            if seen is None:
                continue  # released meanwhile
            reason = stale_reason(seen, host=self.me.host, stale_after=self.stale_after)
            if reason is None:
                raise LockBusy(path, seen.holder)
            if self._remove_stale(path, seen):
                recovered = reason
        raise LockBusy(path, seen.holder if seen else None)  # still contended: left to a rerun

    def verify(self, name: str) -> None:
        """Raise LockBusy when the lock of `name` is no longer this job's (taken over after a missed heartbeat)."""
        path = self.path(name)
        seen = _look(path)
        if seen is None or seen.holder is None or seen.holder.token != self._held[name].token:
            raise LockBusy(path, seen.holder if seen else None)

    def release(self, name: str) -> None:
        """Remove the lock of `name` if this job holds it (a lock taken over by another job is left alone)."""
        with self._mutex:
            mine = self._held.pop(name, None)
        path = self.path(name)
        seen = _look(path) if mine else None
        if seen is not None and seen.holder is not None and seen.holder.token == mine.token:
            path.unlink(missing_ok=True)

    def _create(self, path: Path, name: str) -> Holder | None:
        """Create the lock file exclusively -> this claim's Holder, or None when the file exists."""
        mine = dataclasses.replace(self.me, started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                   token=uuid.uuid4().hex)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"name": name, **dataclasses.asdict(mine)}, f)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return mine

    def _remove_stale(self, path: Path, seen: _Seen) -> bool:
        """Remove the stale lock `seen` at `path` as the only job doing so: True when this call removed it.

        Jobs that judged the same lock stale compete for one marker file named after it (O_EXCL: one wins). The
        winner removes the lock if it is still the one judged stale; then O_EXCL decides who claims the name.
        """
        marker = _marker(path, seen)
        if self._create(marker, path.stem) is None:
            # Another job is taking this very lock over, which takes milliseconds: it gets the name. Unless it
            # died doing so: then its marker goes, and the next round tries again.
            other = _look(marker)
            if other is None:
                return False
            if stale_reason(other, host=self.me.host, stale_after=RECOVER_SECONDS) is None:
                raise LockBusy(path, other.holder)
            marker.unlink(missing_ok=True)
            return False
        try:
            if _look(path) != seen:
                return False  # renewed or replaced since it was judged: not the stale lock
            # Only its holder could change it now, were it alive after all (frozen past stale_after): then it
            # may lose the lock it has, and `verify` stops it from writing.
            path.unlink(missing_ok=True)
            return True
        finally:
            marker.unlink(missing_ok=True)

    # --- heartbeat -----------------------------------------------------------------------------

    def __enter__(self) -> FileLocks:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="qgmil-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for name in list(self._held):
            self.release(name)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._mutex:
                held = dict(self._held)
            for name, mine in held.items():
                path = self.path(name)
                try:
                    seen = _look(path)
                    if seen is not None and seen.holder is not None and seen.holder.token == mine.token:
                        os.utime(path)
                except OSError:
                    pass  # e.g. a file-system hiccup: the next beat tries again, `verify` has the last word
