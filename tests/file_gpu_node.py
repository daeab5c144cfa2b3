"""A node daemon process over GPUs that outlive it, for the restart chaos test.

    python -m tests.file_gpu_node STATE_JSON SOCKET TOKEN_FILE LEASE_FILE UUID [UUID ...]

The GPUs are a hand-written fake whose power limits live in STATE_JSON (written atomically on
every change), so a daemon killed with SIGKILL leaves them as a real GPU keeps its limit, and the
next daemon finds them so. Everything else is the real daemon: `NodeDaemon`, its lease manager
and lease table (LEASE_FILE), uvicorn on a Unix socket, the token file. The fallback cap is 400 W,
leases are checked every 0.1 s, the GPUs are 200-700 W with a 700 W default.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from agent.node.server import NodeDaemon, NodeSettings
from tests.node_helpers import FakeBackend, FakeGpu

MIN_W, MAX_W, DEFAULT_W = 200.0, 700.0, 700.0
FALLBACK_W = 400.0


class FileGpus:
    """Power limits by GPU index, kept in a JSON file that outlives the process."""

    def __init__(self, path: Path, n: int) -> None:
        self.path = path
        if not path.exists():
            self._write([DEFAULT_W] * n)

    def read(self) -> list[float]:
        return [float(w) for w in json.loads(self.path.read_text())["limit_w"]]

    def _write(self, limits: list[float]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"limit_w": limits}))
        os.replace(tmp, self.path)

    def set(self, index: int, watts: float) -> None:
        limits = self.read()
        limits[index] = watts
        self._write(limits)


class FileGpu(FakeGpu):
    """The tests' fake GPU (200-700 W, 700 W default) with its power limit in the store."""

    def __init__(self, store: FileGpus, index: int, uuid: str) -> None:
        super().__init__(index, MIN_W, MAX_W, DEFAULT_W)
        self._store, self._uuid = store, uuid

    @property
    def uuid(self) -> str:
        return self._uuid

    @property
    def model_name(self) -> str:
        return "NVIDIA H100 80GB HBM3"

    def power_limit_w(self) -> float:
        return self._store.read()[self.index]

    def enforced_power_limit_w(self) -> float:
        return self.power_limit_w()

    def set_power_limit_w(self, watts: float) -> None:
        super().set_power_limit_w(watts)  # its range check
        self._store.set(self.index, watts)


def main(argv: list[str]) -> None:
    state, sock, token, lease_file, *uuids = argv
    store = FileGpus(Path(state), len(uuids))
    backend = FakeBackend([FileGpu(store, k, uuid) for k, uuid in enumerate(uuids)])
    NodeDaemon(
        backend,
        NodeSettings(
            token_file=Path(token),
            socket_path=Path(sock),
            fallback_cap_w=FALLBACK_W,
            check_interval_s=0.1,
            lease_file=Path(lease_file),
        ),
    ).run()


if __name__ == "__main__":
    main(sys.argv[1:])
