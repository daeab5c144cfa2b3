"""What policies propose (Intents) and what became of them (Actions).

Cap intents are columnar: one `SetPowerCap` carries arrays of target GPUs and watts, so a policy
that caps 100,000 GPUs makes one object, not 100,000. Node and job intents are scalar (few).
Every intent names its policy, a reason, its evidence (the numbers that led to it; per-target
evidence as arrays aligned with the targets) and an expiry (twin or Unix seconds).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import orjson

from agent.core.keyed import frozen
from agent.core.snapshot import Snapshot

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


class IntentKind(StrEnum):
    SET_POWER_CAP = "set_power_cap"
    RELEASE_POWER_CAP = "release_power_cap"
    DRAIN_NODE = "drain_node"
    RESUME_NODE = "resume_node"
    SET_NODE_WEIGHT = "set_node_weight"
    SET_NODE_FEATURES = "set_node_features"
    REQUEUE_JOB = "requeue_job"
    NOTIFY = "notify"
    LOCK_CLOCKS = "lock_clocks"
    RESET_CLOCKS = "reset_clocks"


def gpu_names(node: npt.NDArray[np.str_], gpu: npt.NDArray[np.int64]) -> npt.NDArray[np.str_]:
    """Per GPU, its name in the audit log and in messages: `node/gpuN`."""
    return np.char.add(
        node.astype(np.str_), np.char.add("/gpu", gpu.astype(np.int64).astype(np.str_))
    )


def split_gpu_names(
    names: npt.NDArray[np.str_],
) -> tuple[npt.NDArray[np.str_], npt.NDArray[np.str_]]:
    """`gpu_names` undone: each name's node and the text of its GPU index (empty where a name
    is not `node/gpuN`; the index text is the caller's to check)."""
    parts = np.char.rpartition(names.astype(np.str_), "/gpu")
    return parts[:, 0].astype(np.str_), parts[:, 2].astype(np.str_)


@dataclass(frozen=True, eq=False)
class GpuTargets:
    """A set of GPUs, self-contained (usable after the Snapshot it came from is gone).

    Taken from a snapshot's rows (`from_rows`), they also remember those rows and the UUID
    array they index (`picked`): whoever keeps state by the snapshot's UUIDs then finds the
    targets by their rows, not by looking 100,000 strings up again."""

    node: npt.NDArray[np.str_]
    gpu: npt.NDArray[np.int64]
    uuid: npt.NDArray[np.str_]
    rows: npt.NDArray[np.int64] | None = field(default=None, repr=False)
    of_uuid: npt.NDArray[np.str_] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.node.shape == self.gpu.shape == self.uuid.shape:
            raise ValueError("GpuTargets arrays must have equal length")

    def picked(self) -> tuple[npt.NDArray[np.str_], npt.NDArray[np.int64]] | None:
        """(the read-only UUID array these GPUs were taken from, their rows in it), when
        known: `uuid` is then `of_uuid[rows]`, for good (a read-only array cannot change)."""
        if self.rows is None or self.of_uuid is None or not frozen(self.of_uuid):
            return None
        return self.of_uuid, self.rows

    def __len__(self) -> int:
        return int(self.uuid.shape[0])

    @staticmethod
    def from_rows(snapshot: Snapshot, rows: npt.ArrayLike) -> GpuTargets:
        idx = np.asarray(rows, dtype=np.int64)
        return GpuTargets(
            node=np.asarray(snapshot.node_names[snapshot.node[idx]], dtype=np.str_),
            gpu=np.asarray(snapshot.gpu[idx], dtype=np.int64),
            uuid=np.asarray(snapshot.uuid[idx], dtype=np.str_),
            rows=idx,
            of_uuid=snapshot.uuid,
        )

    @staticmethod
    def empty() -> GpuTargets:
        return GpuTargets(
            np.zeros(0, dtype=np.str_), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.str_)
        )

    def names(self) -> list[str]:
        return gpu_names(self.node, self.gpu).tolist()  # type: ignore[no-any-return]

    def subset(self, selector: npt.ArrayLike) -> GpuTargets:
        sel = np.asarray(selector)
        rows = None if self.rows is None else self.rows[sel]
        return GpuTargets(self.node[sel], self.gpu[sel], self.uuid[sel], rows, self.of_uuid)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True, eq=False, kw_only=True)
class Intent:
    """Base of every intent."""

    kind: ClassVar[IntentKind]
    policy: str
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    expires_s: float = float("inf")

    def fields(self) -> dict[str, Any]:
        """The kind's own fields (e.g. `watts`), JSON-ready."""
        return {}

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per target: kind, target, policy, reason, the kind's fields."""
        return [
            {
                "kind": str(self.kind),
                "target": self.target_name(),
                "policy": self.policy,
                "reason": self.reason,
                **self.fields(),
                "evidence": _jsonable(self.evidence),
            }
        ]

    def target_name(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True, eq=False, kw_only=True)
class _CapIntentBase(Intent):
    targets: GpuTargets

    def __len__(self) -> int:
        return len(self.targets)

    def _per_target(self, i: int) -> dict[str, Any]:
        return {}

    def _evidence_for(self, i: int) -> dict[str, Any]:
        n = len(self.targets)
        out: dict[str, Any] = {}
        for key, value in self.evidence.items():
            if isinstance(value, np.ndarray) and value.shape == (n,):
                out[key] = _jsonable(value[i])
            else:
                out[key] = _jsonable(value)
        return out

    def to_records(self) -> list[dict[str, Any]]:
        names = self.targets.names()
        return [
            {
                "kind": str(self.kind),
                "target": names[i],
                "uuid": str(self.targets.uuid[i]),
                "policy": self.policy,
                "reason": self.reason,
                **self._per_target(i),
                "evidence": self._evidence_for(i),
            }
            for i in range(len(names))
        ]

    def target_name(self) -> str:
        names = self.targets.names()
        return names[0] if len(names) == 1 else f"{len(names)} GPUs"

    def subset(self, selector: npt.ArrayLike) -> _CapIntentBase:
        sel = np.asarray(selector)
        n = len(self.targets)
        evidence = {
            k: (v[sel] if isinstance(v, np.ndarray) and v.shape == (n,) else v)
            for k, v in self.evidence.items()
        }
        changes: dict[str, Any] = {"targets": self.targets.subset(sel), "evidence": evidence}
        if isinstance(self, SetPowerCap):
            changes["watts"] = self.watts[sel]
        if isinstance(self, LockClocks):
            changes["min_mhz"], changes["max_mhz"] = self.min_mhz[sel], self.max_mhz[sel]
        return replace(self, **changes)


@dataclass(frozen=True, eq=False, kw_only=True)
class SetPowerCap(_CapIntentBase):
    """Cap each target GPU at `watts` (aligned with targets)."""

    kind: ClassVar[IntentKind] = IntentKind.SET_POWER_CAP
    watts: FloatArray

    def __post_init__(self) -> None:
        if self.watts.shape != (len(self.targets),):
            raise ValueError("SetPowerCap.watts must align with its targets")

    def _per_target(self, i: int) -> dict[str, Any]:
        return {"watts": round(float(self.watts[i]), 1)}


@dataclass(frozen=True, eq=False, kw_only=True)
class ReleasePowerCap(_CapIntentBase):
    """Give the target GPUs back their default limit."""

    kind: ClassVar[IntentKind] = IntentKind.RELEASE_POWER_CAP


@dataclass(frozen=True, eq=False, kw_only=True)
class LockClocks(_CapIntentBase):
    """Lock each target GPU's SM clocks to [min_mhz, max_mhz] (NVML's locked clocks; aligned
    with targets)."""

    kind: ClassVar[IntentKind] = IntentKind.LOCK_CLOCKS
    min_mhz: FloatArray
    max_mhz: FloatArray

    def __post_init__(self) -> None:
        n = len(self.targets)
        if self.min_mhz.shape != (n,) or self.max_mhz.shape != (n,):
            raise ValueError("LockClocks.min_mhz and max_mhz must align with its targets")
        if np.any(self.min_mhz > self.max_mhz):
            raise ValueError("LockClocks: min_mhz above max_mhz")

    def _per_target(self, i: int) -> dict[str, Any]:
        return {"min_mhz": round(float(self.min_mhz[i])), "max_mhz": round(float(self.max_mhz[i]))}


@dataclass(frozen=True, eq=False, kw_only=True)
class ResetClocks(_CapIntentBase):
    """Give the target GPUs their default clocks back (NVML's reset of locked clocks)."""

    kind: ClassVar[IntentKind] = IntentKind.RESET_CLOCKS


@dataclass(frozen=True, eq=False, kw_only=True)
class DrainNode(Intent):
    kind: ClassVar[IntentKind] = IntentKind.DRAIN_NODE
    node: str

    def target_name(self) -> str:
        return self.node


@dataclass(frozen=True, eq=False, kw_only=True)
class ResumeNode(Intent):
    kind: ClassVar[IntentKind] = IntentKind.RESUME_NODE
    node: str

    def target_name(self) -> str:
        return self.node


@dataclass(frozen=True, eq=False, kw_only=True)
class SetNodeWeight(Intent):
    """Scheduler weight: higher weight = less preferred (Slurm's meaning)."""

    kind: ClassVar[IntentKind] = IntentKind.SET_NODE_WEIGHT
    node: str
    weight: int

    def target_name(self) -> str:
        return self.node

    def fields(self) -> dict[str, Any]:
        return {"weight": self.weight}


@dataclass(frozen=True, eq=False, kw_only=True)
class SetNodeFeatures(Intent):
    """Add and remove node features the agent owns (others are never touched)."""

    kind: ClassVar[IntentKind] = IntentKind.SET_NODE_FEATURES
    node: str
    add: frozenset[str] = frozenset()
    remove: frozenset[str] = frozenset()

    def target_name(self) -> str:
        return self.node

    def fields(self) -> dict[str, Any]:
        return {"add": sorted(self.add), "remove": sorted(self.remove)}


@dataclass(frozen=True, eq=False, kw_only=True)
class RequeueJob(Intent):
    kind: ClassVar[IntentKind] = IntentKind.REQUEUE_JOB
    job: str
    node: str = ""  # where the job ran, for the record

    def target_name(self) -> str:
        return self.job

    def fields(self) -> dict[str, Any]:
        return {"job": self.job, "node": self.node}


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True, eq=False, kw_only=True)
class Notify(Intent):
    kind: ClassVar[IntentKind] = IntentKind.NOTIFY
    target: str
    severity: Severity = Severity.WARNING
    summary: str = ""

    def target_name(self) -> str:
        return self.target

    def fields(self) -> dict[str, Any]:
        return {"severity": str(self.severity), "summary": self.summary}


CapIntent = SetPowerCap | ReleasePowerCap
NodeIntent = DrainNode | ResumeNode | SetNodeWeight | SetNodeFeatures


class Outcome(StrEnum):
    APPLIED = "applied"  # the actuator applied it
    RECORDED = "recorded"  # dry-run: recorded instead of applied
    REFUSED = "refused"  # the guard refused it (reason in detail)
    FAILED = "failed"  # the actuator tried and failed (error in detail)


@dataclass(frozen=True, eq=False)
class Action:
    """An intent (or the part of a cap intent) and what became of it. One audit record each."""

    action_id: str
    decision_id: str
    intent: Intent
    outcome: Outcome
    dry_run: bool
    detail: str = ""
    before: Any = None  # e.g. previous caps (array aligned with targets) or node state
    time_s: float = 0.0

    def to_record(self) -> dict[str, Any]:
        after: Any
        if isinstance(self.intent, SetPowerCap):
            after = _jsonable(self.intent.watts)
        elif isinstance(self.intent, ReleasePowerCap):
            after = "default"
        else:
            after = self.intent.fields() or str(self.intent.kind)
        targets: Any
        if isinstance(self.intent, _CapIntentBase):
            targets = self.intent.targets.names()
        else:
            targets = self.intent.target_name()
        return {
            "action_id": self.action_id,
            "decision_id": self.decision_id,
            "kind": str(self.intent.kind),
            "policy": self.intent.policy,
            "target": targets,
            "outcome": str(self.outcome),
            "dry_run": self.dry_run,
            "reason": self.intent.reason,
            "detail": self.detail,
            "before": _jsonable(self.before),
            "after": after,
            "evidence": _jsonable(self.intent.evidence),
            "time_s": self.time_s,
        }


def jsonable(value: Any) -> Any:
    """Numpy values and containers to plain JSON types."""
    return _jsonable(value)


# NaN and infinities as null (strict JSON: jq and friends read it), numeric numpy arrays natively;
# dataclasses and datetimes go through `_json_default` like anything else orjson does not know.
_JSON_OPTIONS = (
    orjson.OPT_SERIALIZE_NUMPY
    | orjson.OPT_NON_STR_KEYS
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
)


def _json_default(value: Any) -> Any:
    """numpy values to JSON; anything else unknown as its string."""
    converted = _jsonable(value)
    return str(value) if converted is value else converted


def strict_json(value: Any) -> str:
    """`value` as one line of strict JSON (the audit log's records, the CLIs' `--json`)."""
    return orjson.dumps(value, default=_json_default, option=_JSON_OPTIONS).decode()
