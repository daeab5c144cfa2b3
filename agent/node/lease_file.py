"""The node daemon's lease table on disk, so that a restarted daemon (`Restart=on-failure` after a
crash or a SIGKILL) still lets every cap it granted lapse to the fallback when nobody renews it.

One small JSON file, rewritten atomically (temporary file, fsync, rename, directory fsync) after
every change: for each GPU (index and UUID) its state (leased, fallback, default), the limit the
daemon left it at, and for a lease its expiry and length on the daemon's clock. The clock is
CLOCK_MONOTONIC, which counts from the machine's boot and is the same for every process: a lease
read back by the next daemon runs out when it would have. The file names the boot it was written
in (the kernel's boot id); a table from another boot is ignored (the GPUs' limits were reset with
the driver, and the monotonic clock started again). SM clock locks under a lease are listed beside
the caps (`clock_locks`: range, expiry and length), and requested workload power profiles
(`power_profiles`), each absent when there are none.

The shipped unit keeps it in its runtime directory (`/run/ooda/node-leases.json`, kept across
restarts by `RuntimeDirectoryPreserve=restart`, gone at reboot with the limits it describes).
A table that cannot be read is reported and ignored: the daemon then reconciles from the GPUs
alone (agent/node/leases.py: any cap it finds is a lease about to lapse).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.core.files import write_atomically

FORMAT = "ooda-node-leases"
VERSION = 1
MAX_BYTES = 1 << 20  # a few hundred bytes per GPU; more is not a table this daemon wrote
MAX_GPUS = 1024
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

State = Literal["leased", "fallback", "default"]


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """One GPU as the daemon left it. `expires_s` and `lease_s` for a lease only."""

    index: int
    uuid: str
    state: State
    watts: float
    expires_s: float | None = None
    lease_s: float | None = None


@dataclass(frozen=True, slots=True)
class ClockLockRecord:
    """One GPU's SM clock lock under a lease (agent/node/clock_leases.py)."""

    index: int
    uuid: str
    min_mhz: float
    max_mhz: float
    expires_s: float
    lease_s: float


@dataclass(frozen=True, slots=True)
class ProfileRecord:
    """One GPU's requested workload power profile under a lease (agent/node/profile_leases.py)."""

    index: int
    uuid: str
    profile: str
    expires_s: float
    lease_s: float


class _LeverLease(BaseModel):
    """What every lever's lease records: its GPU, and when and for how long it holds."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    index: int = Field(ge=0, le=1 << 15)
    uuid: str = Field(max_length=128)
    expires_s: float
    lease_s: float = Field(gt=0)


class _Profile(_LeverLease):
    profile: str = Field(max_length=64)


class _ClockLock(_LeverLease):
    min_mhz: float = Field(ge=0, le=1e5)
    max_mhz: float = Field(ge=0, le=1e5)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    index: int = Field(ge=0, le=1 << 15)
    uuid: str = Field(max_length=128)
    state: State
    watts: float = Field(ge=0, le=1e5)
    expires_s: float | None = None
    lease_s: float | None = Field(None, gt=0)


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    format: Literal["ooda-node-leases"]
    version: Literal[1]
    boot_id: str = Field(max_length=64)
    gpus: list[_Record] = Field(max_length=MAX_GPUS)
    clock_locks: list[_ClockLock] = Field(default_factory=list, max_length=MAX_GPUS)
    power_profiles: list[_Profile] = Field(default_factory=list, max_length=MAX_GPUS)


@dataclass(frozen=True)
class Levers:
    """A lease table's records by GPU index: caps, clock locks, power profiles."""

    caps: dict[int, LeaseRecord] = field(default_factory=dict)
    clock_locks: dict[int, ClockLockRecord] = field(default_factory=dict)
    power_profiles: dict[int, ProfileRecord] = field(default_factory=dict)


def boot_id() -> str:
    """This boot's id (empty where the kernel does not say)."""
    try:
        return BOOT_ID.read_text().strip()[:64]
    except OSError:
        return ""


class LeaseFile:
    """Load and save the lease table at `path` (see the module docstring)."""

    def __init__(self, path: Path, boot: str | None = None) -> None:
        self.path = path
        self.boot = boot_id() if boot is None else boot

    def load(self) -> tuple[dict[int, LeaseRecord], str | None]:
        """(records by GPU index, None), or ({}, why the file was not used); ({}, None) when
        there is no file."""
        table, problem = self.load_all()
        return table.caps, problem

    def load_all(self) -> tuple[Levers, str | None]:
        """As `load`, with the clock locks and power profiles too."""
        table, problem = self._table()
        if table is None:
            return Levers(), problem
        levers = Levers(
            {r.index: LeaseRecord(**r.model_dump()) for r in table.gpus},
            {c.index: ClockLockRecord(**c.model_dump()) for c in table.clock_locks},
            {p.index: ProfileRecord(**p.model_dump()) for p in table.power_profiles},
        )
        return levers, None

    def _table(self) -> tuple[_Table | None, str | None]:
        try:
            with self.path.open("rb") as handle:
                data = handle.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            return None, f"lease file {self.path}: cannot read ({exc.strerror or exc})"
        if len(data) > MAX_BYTES:
            return None, f"lease file {self.path}: larger than {MAX_BYTES} bytes"
        try:
            table = _Table.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "file"
            return None, f"lease file {self.path}: {where}: {first['msg']}"
        if table.boot_id != self.boot:
            return None, f"lease file {self.path}: written before the last boot: not used"
        return table, None

    def save(
        self,
        records: list[LeaseRecord],
        clock_locks: Sequence[ClockLockRecord] = (),
        power_profiles: Sequence[ProfileRecord] = (),
    ) -> None:
        """Write the table atomically (OSError when it cannot be written)."""
        document: dict[str, object] = {
            "format": FORMAT,
            "version": VERSION,
            "boot_id": self.boot,
            "gpus": [asdict(r) for r in records],
        }
        if clock_locks:  # absent when none: a table without them reads as before
            document["clock_locks"] = [asdict(c) for c in clock_locks]
        if power_profiles:
            document["power_profiles"] = [asdict(p) for p in power_profiles]
        write_atomically(self.path, json.dumps(document, separators=(",", ":")).encode())
