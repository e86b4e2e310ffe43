"""One instance per user: an advisory lock on a file in the runtime dir.

The lock is `flock` on Unix (msvcrt's byte lock on Windows), so the kernel
drops it when the holder dies, however it dies: a crash leaves the file but
never a held lock, and the next start takes it over (and says so). While held,
the file says who holds it - pid, role (tray or daemon) and the endpoint URL -
so a second start can tell the user where the running one is.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LockInfo:
    pid: int
    role: str          # "tray" | "daemon"
    endpoint: str      # e.g. http://127.0.0.1:11480
    started_at: float  # unix time

    @classmethod
    def parse(cls, text: str) -> "LockInfo | None":
        try:
            raw = json.loads(text)
            return cls(int(raw["pid"]), str(raw["role"]), str(raw["endpoint"]), float(raw["started_at"]))
        except (ValueError, KeyError, TypeError):
            return None  # empty (the holder is still writing) or damaged


class AlreadyRunning(Exception):
    """Another instance holds the lock; info says which and where (None while it starts)."""

    def __init__(self, path: Path, info: LockInfo | None) -> None:
        where = f" (pid {info.pid}, {info.role}) at {info.endpoint}" if info else ""
        super().__init__(f"Ebbtide is already running{where}")
        self.path = path
        self.info = info


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 64 * 1024).decode("utf-8", "replace")


class InstanceLock:
    """Hold with `acquire()` (or `with`); raises AlreadyRunning when another process holds it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.info: LockInfo | None = None

    @property
    def is_held(self) -> bool:
        return self._fd is not None

    def acquire(self, role: str, endpoint: str) -> LockInfo:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if not _try_lock(fd):
            info = LockInfo.parse(_read(fd))
            os.close(fd)
            raise AlreadyRunning(self.path, info)
        stale = LockInfo.parse(_read(fd))
        if stale is not None:
            log.info("recovered the lock left by pid %d (%s), which is gone", stale.pid, stale.role)
        self._fd = fd
        return self.update(role, endpoint)

    def update(self, role: str, endpoint: str) -> LockInfo:
        """Rewrite who holds the lock (the endpoint can change once the daemon has bound)."""
        assert self._fd is not None, "update() needs the lock held"
        self.info = LockInfo(os.getpid(), role, endpoint, self.info.started_at if self.info else time.time())
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, json.dumps(asdict(self.info)).encode())
        os.fsync(self._fd)
        return self.info

    def release(self) -> None:
        if self._fd is None:
            return
        # Empty the file first, so nobody reads a pid that is about to be gone.
        os.ftruncate(self._fd, 0)
        _unlock(self._fd)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "InstanceLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(path: Path) -> LockInfo | None:
    """Who holds the lock now, or None when nobody does (a stale file counts as nobody)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        if _try_lock(fd):  # free: whatever the file says is stale
            _unlock(fd)
            return None
        return LockInfo.parse(_read(fd))
    finally:
        os.close(fd)
