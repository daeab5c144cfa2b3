"""One agent per cluster: an exclusive `flock` on `<state_dir>/<cluster>.lock`.

The kernel drops the lock when the process dies, however it dies, so a crash never leaves a stale
lock behind. The file holds the owner's pid, so a second instance can say who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from agent.core.errors import OodaError
from agent.daemon.state import safe_name


class AlreadyRunningError(OodaError):
    """Another agent already runs for this cluster (it holds the lock)."""


class InstanceLock:
    def __init__(self, state_dir: Path, cluster: str) -> None:
        self.cluster = cluster
        self.path = state_dir / f"{safe_name(cluster)}.lock"
        self._fd: int | None = None
        self.pid_error: str | None = None  # why the pid could not be written, if it could not

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise AlreadyRunningError(
                f"an agent for cluster {self.cluster!r} is already running ({who} holds "
                f"{self.path}); one agent per cluster"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        # The pid only lets a second instance say who holds the lock: a full disk must not
        # stop the agent from starting (it then refuses to act until its audit log is writable).
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
        except OSError as exc:
            self.pid_error = f"cannot write the pid to {self.path} ({exc.strerror or exc})"

    def release(self) -> None:
        """Unlock (the file stays: removing it would race with a starting instance)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdecimal() else None
