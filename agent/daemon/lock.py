"""One agent per cluster: an exclusive `flock` on `<state_dir>/<cluster>.lock`, and a host-wide
lock on the cluster's name.

The flock guards the state directory: the kernel drops it when the process dies, however it
dies, so a crash never leaves a stale lock behind, and the file holds the owner's pid so that a
second instance can say who holds it. But two agents for one cluster with different state
directories would each hold their own file and both act. So the agent also binds a Unix socket
in Linux's abstract namespace named after the cluster (`@ooda-agent/cluster/NAME`): one per
host (per network namespace, strictly), whatever the state directory, released by the kernel
with the process like the flock, and needing no file system path (the agent's unit may write
only its state directory).

What it cannot cover: two hosts. Agents for one cluster on two machines (or in two containers
with their own network namespaces) each hold their own locks and both act; only a lock both can
see (a lease in etcd or Consul, the site coordinator's job) or node daemons that accept one
agent's token each would stop that. A local user may also bind the name first, which makes the
agent refuse to start (it says so); that is a denial of service by someone who could already
stop it, never a second agent acting.

In a site, a named replica (`[site] replica`) locks its own name under the cluster's: the
replicas' election in etcd keeps one acting, so two of them may share a host.

`OODA_INSTANCE_NAMESPACE`, when set, is part of the host-wide name: test suites running side by
side on one machine set their own, so that their agents for the same cluster do not collide.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import struct
from pathlib import Path

from agent.core.errors import OodaError
from agent.daemon.state import safe_name

NAMESPACE_ENV = "OODA_INSTANCE_NAMESPACE"


class AlreadyRunningError(OodaError):
    """Another agent already runs for this cluster (it holds the lock)."""


def host_lock_name(cluster: str, replica: str | None = None) -> str:
    """The abstract socket's name for `cluster` (shown with a leading '@', as `ss -x` does);
    with `replica` (a named replica in a site, whose replicas elect one leader in etcd), the
    replica's own: two replicas of a cluster may share a host, one replica may not run twice."""
    namespace = os.environ.get(NAMESPACE_ENV, "")
    if namespace:
        namespace = hashlib.sha256(namespace.encode()).hexdigest()[:16] + "/"
    name = f"@ooda-agent/{namespace}cluster/{safe_name(cluster)}"
    return name if replica is None else f"{name}/replica/{safe_name(replica)}"


class InstanceLock:
    def __init__(self, state_dir: Path, cluster: str, replica: str | None = None) -> None:
        self.cluster = cluster
        self.path = state_dir / f"{safe_name(cluster)}.lock"
        self.host_name = host_lock_name(cluster, replica)
        self._fd: int | None = None
        self._host: socket.socket | None = None
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
        try:
            self._host = self._bind_host_lock()
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

    def _bind_host_lock(self) -> socket.socket | None:
        address = "\0" + self.host_name[1:]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(address)
            sock.listen(1)  # only so that a second instance can learn the holder's pid
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                return None  # no abstract namespace here (not Linux): the flock alone holds
            holder = _holder_pid(address)
            who = f"pid {holder}" if holder else "another process"
            raise AlreadyRunningError(
                f"an agent for cluster {self.cluster!r} is already running on this host with "
                f"another state directory ({who} holds {self.host_name}); one agent per cluster"
            ) from None
        return sock

    def release(self) -> None:
        """Unlock (the file stays: removing it would race with a starting instance)."""
        if self._host is not None:
            self._host.close()
            self._host = None
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


def _holder_pid(address: str) -> int | None:
    """The pid of the process listening on the abstract `address` (its credentials)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.setblocking(False)
    try:
        probe.connect(address)
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    finally:
        probe.close()
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid or None
