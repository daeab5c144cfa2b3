"""The staged rollout, as operators go live: which kinds of action are only advised, which nodes
and partitions the agent may touch at all, and freeze windows during which it only advises.

- Actuator kinds (`caps`, `drains`, `steering`, `requeues`, `notify`): `advisory` records that
  kind whatever `dry_run` says; `live` follows `dry_run` and the policies' own `dry_run`. A
  rollout setting can only make the agent more careful, never less.
- Scope: node names (Slurm hostlists or globs) and partitions; outside it nothing is touched (the
  guard refuses with the reason, and the refusal is audited).
- Freeze windows: recurring weekly windows with a time zone (`Mon-Fri 08:00-10:00 Europe/Paris`,
  `Sat,Sun 00:00-24:00`, `daily 22:00-02:00 UTC`: a window may run past midnight) and one-off
  ranges (`2025-12-24T18:00/2025-12-27T08:00 Europe/Paris`, or ISO times with offsets). During a
  freeze every intent is recorded, never applied (notifications still go out unless told not to:
  telling a person changes nothing on the cluster).

Times are the clock's, read as Unix seconds (the twin's clock starts at the epoch).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import hostlist
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field, field_validator

from agent.core.clock import Clock
from agent.core.intents import (
    DrainNode,
    Intent,
    Notify,
    ReleasePowerCap,
    RequeueJob,
    ResumeNode,
    SetNodeFeatures,
    SetNodeWeight,
    SetPowerCap,
)
from agent.core.settings import STRICT_SETTINGS
from agent.core.situation import NodeStates

BoolArray = npt.NDArray[np.bool_]
StrArray = npt.NDArray[np.str_]

Mode = Literal["live", "advisory"]
KINDS = ("caps", "drains", "steering", "requeues", "notify")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WEEKLY = re.compile(
    r"^(?P<days>[A-Za-z*][A-Za-z,*\-]*)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})"
    r"(?:\s+(?P<tz>\S+))?$"
)
_ONE_OFF = re.compile(r"^(?P<start>\d{4}-\d{2}-\d{2}T\S+?)\s*/\s*(?P<end>\S+)(?:\s+(?P<tz>\S+))?$")


def actuator_kind(intent: Intent) -> str:
    """The rollout kind an intent belongs to."""
    if isinstance(intent, SetPowerCap | ReleasePowerCap):
        return "caps"
    if isinstance(intent, DrainNode | ResumeNode):
        return "drains"
    if isinstance(intent, SetNodeWeight | SetNodeFeatures):
        return "steering"
    if isinstance(intent, RequeueJob):
        return "requeues"
    return "notify"


# -- freeze windows -------------------------------------------------------------------------------


def _zone(name: str | None, spec: str) -> tzinfo:
    if name is None:
        return ZoneInfo("UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"freeze window {spec!r}: unknown time zone {name!r}") from None


def _minute(text: str, spec: str) -> int:
    hours, minutes = (int(x) for x in text.split(":"))
    if not (0 <= hours <= 24 and 0 <= minutes < 60) or (hours == 24 and minutes):
        raise ValueError(f"freeze window {spec!r}: {text!r} is not a time of day (00:00-24:00)")
    return hours * 60 + minutes


def _days(text: str, spec: str) -> frozenset[int]:
    low = text.lower()
    if low in ("*", "daily"):
        return frozenset(range(7))
    out: set[int] = set()
    for part in low.split(","):
        ends = part.split("-")
        if len(ends) > 2 or any(e[:3] not in _DAYS or len(e) < 3 for e in ends):
            raise ValueError(
                f"freeze window {spec!r}: {part!r} is not a day or day range "
                "(e.g. Mon-Fri, Sat,Sun)"
            )
        first, last = _DAYS.index(ends[0][:3]), _DAYS.index(ends[-1][:3])
        k = first
        while True:  # a range may wrap the week (Fri-Mon)
            out.add(k)
            if k == last:
                break
            k = (k + 1) % 7
    return frozenset(out)


@dataclass(frozen=True)
class FreezeWindow:
    """One freeze window: weekly (days, start and end minute of the day, zone) or one-off."""

    spec: str
    zone: tzinfo
    days: frozenset[int] = frozenset()
    start_min: int = 0
    end_min: int = 0
    start_s: float | None = None  # one-off: Unix seconds
    end_s: float | None = None

    @staticmethod
    def parse(spec: str) -> FreezeWindow:
        text = " ".join(spec.split())
        one_off = _ONE_OFF.match(text)
        if one_off:
            zone = _zone(one_off["tz"], spec)
            bounds: list[float] = []
            for key in ("start", "end"):
                try:
                    when = datetime.fromisoformat(one_off[key])
                except ValueError:
                    raise ValueError(
                        f"freeze window {spec!r}: {one_off[key]!r} is not an ISO date-time"
                    ) from None
                if when.tzinfo is None:
                    when = when.replace(tzinfo=zone)
                bounds.append(when.timestamp())
            if bounds[1] <= bounds[0]:
                raise ValueError(f"freeze window {spec!r}: ends before it starts")
            return FreezeWindow(text, zone, start_s=bounds[0], end_s=bounds[1])
        weekly = _WEEKLY.match(text)
        if weekly is None:
            raise ValueError(
                f"freeze window {spec!r}: expected 'DAYS HH:MM-HH:MM [ZONE]' "
                "(e.g. 'Mon-Fri 08:00-10:00 Europe/Paris') or 'START/END [ZONE]' with ISO times"
            )
        start, end = _minute(weekly["start"], spec), _minute(weekly["end"], spec)
        if start == end:
            raise ValueError(f"freeze window {spec!r}: starts and ends at the same time")
        return FreezeWindow(
            text,
            _zone(weekly["tz"], spec),
            days=_days(weekly["days"], spec),
            start_min=start,
            end_min=end,
        )

    def active(self, now_s: float) -> bool:
        if self.start_s is not None and self.end_s is not None:
            return self.start_s <= now_s < self.end_s
        # Local wall time, so daylight-saving changes move the window with the clocks.
        local = datetime.fromtimestamp(now_s, self.zone)
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        if self.start_min < self.end_min:
            return day in self.days and self.start_min <= minute < self.end_min
        # Past midnight: the tail belongs to the day the window started.
        yesterday = (local - timedelta(days=1)).weekday()
        return (day in self.days and minute >= self.start_min) or (
            yesterday in self.days and minute < self.end_min
        )


# -- settings -------------------------------------------------------------------------------------


def _check_node_list(value: str | list[str]) -> None:
    for part in [value] if isinstance(value, str) else value:
        if any(ch in part for ch in "*?") and "[" not in part:
            continue  # a glob
        try:
            hostlist.expand_hostlist(part)
        except hostlist.BadHostlist as exc:
            raise ValueError(f"bad node list {part!r}: {exc}") from None


class RolloutSettings(BaseModel):
    """`[rollout]`: advise-only per actuator kind, the scope, freeze windows."""

    model_config = STRICT_SETTINGS

    caps: Mode = Field("live", description="GPU power caps: live (follow dry_run) or advisory.")
    drains: Mode = Field("live", description="Node drains and resumes: live or advisory.")
    steering: Mode = Field("live", description="Node weights and features: live or advisory.")
    requeues: Mode = Field("live", description="Job requeues: live or advisory.")
    notify: Mode = Field("live", description="Notifications: live or advisory.")
    nodes: str | list[str] | None = Field(
        None,
        description="Scope: the only nodes the agent may touch, as Slurm hostlists or globs "
        "('gpu[001-128]', ['rack1-*']); none: every node.",
    )
    partitions: list[str] | None = Field(
        None,
        description="Scope: the only partitions whose nodes the agent may touch; none: every "
        "partition. Nodes whose partitions the placement system does not report are refused.",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Freeze windows (advise only): 'Mon-Fri 08:00-10:00 Europe/Paris' or "
        "'2025-12-24T18:00/2025-12-27T08:00 Europe/Paris'; zone default UTC.",
    )
    notify_during_freeze: bool = Field(
        True, description="Send notifications during a freeze (they change nothing)."
    )

    @field_validator("nodes")
    @classmethod
    def _valid_nodes(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is not None:
            _check_node_list(value)
        return value

    @field_validator("freeze")
    @classmethod
    def _valid_freeze(cls, value: list[str]) -> list[str]:
        for spec in value:
            FreezeWindow.parse(spec)
        return value


# -- the rollout at run time ----------------------------------------------------------------------


class Scope:
    """Which nodes may be touched: node patterns (expanded names and globs) and partitions."""

    def __init__(
        self, members: Sequence[str] | None = None, partitions: Sequence[str] | None = None
    ) -> None:
        self.members = None if members is None else tuple(members)
        self.partitions = None if partitions is None else frozenset(partitions)
        self._cache: tuple[StrArray, BoolArray] | None = None

    @property
    def everything(self) -> bool:
        return self.members is None and self.partitions is None

    def _name_mask(self, node_names: StrArray) -> BoolArray:
        if self.members is None:
            return np.ones(node_names.shape, dtype=bool)
        cached = self._cache
        if cached is not None and np.array_equal(cached[0], node_names):
            return cached[1]
        exact = [m for m in self.members if not any(ch in m for ch in "*?[")]
        globs = [m for m in self.members if m not in exact]
        mask = np.isin(node_names, exact)
        for pattern in globs:  # per node and glob, cached while the node list stays the same
            mask |= np.array([fnmatch.fnmatchcase(str(n), pattern) for n in node_names], dtype=bool)
        mask = np.asarray(mask, dtype=bool)
        self._cache = (node_names.copy(), mask)
        return mask

    def refusals(self, node_names: StrArray, nodes: NodeStates | None) -> npt.NDArray[np.object_]:
        """Per node: why it is out of scope ("" when in scope)."""
        out = np.full(node_names.shape, "", dtype=object)
        if self.everything:
            return out
        out[~self._name_mask(node_names)] = "out of scope: not in [rollout] nodes"
        if self.partitions is not None:
            parts = None if nodes is None else nodes.partitions
            wanted = ", ".join(sorted(self.partitions))
            if parts is None:
                out[out == ""] = (
                    "out of scope: the placement system does not say which partition the node is in"
                )
            else:
                inside = np.array([bool(p & self.partitions) for p in parts], dtype=bool)
                out[(out == "") & ~inside] = f"out of scope: not in partitions {wanted}"
        return out


class Rollout:
    """The rollout at run time: the scope, the freeze calendar and the advisory kinds."""

    def __init__(
        self,
        settings: RolloutSettings | None = None,
        members: Sequence[str] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings or RolloutSettings()
        self.scope = Scope(members, self.settings.partitions)
        self.windows = tuple(FreezeWindow.parse(s) for s in self.settings.freeze)
        self.clock = clock
        self._pinned_s: float | None = None

    def pin(self, now_s: float) -> None:
        """Fix the time freeze windows are judged at for this cycle (one answer per cycle)."""
        self._pinned_s = now_s

    def freeze_at(self, now_s: float) -> str | None:
        """The freeze window in force at `now_s` (its spec), or None."""
        for window in self.windows:
            if window.active(now_s):
                return window.spec
        return None

    def _now(self) -> float | None:
        if self._pinned_s is not None:
            return self._pinned_s
        return self.clock.now() if self.clock is not None else None

    def advisory(self, intent: Intent) -> str | None:
        """Why the rollout makes this intent advisory (None: it does not)."""
        kind = actuator_kind(intent)
        if getattr(self.settings, kind) == "advisory":
            return f"rollout: {kind} advisory"
        if self.windows and not (isinstance(intent, Notify) and self.settings.notify_during_freeze):
            now = self._now()
            window = self.freeze_at(now) if now is not None else None
            if window is not None:
                return f"freeze window {window!r}"
        return None


def dry_run_reasons(
    global_dry_run: bool,
    policy_dry_run: dict[str, bool | None],
    rollout: Rollout | None = None,
) -> Callable[[Intent], str | None]:
    """Per intent: why it is only recorded (None: it is applied). A policy's own `dry_run`
    overrides the global one; the rollout (advisory kinds, freeze windows) can only add."""

    def why(intent: Intent) -> str | None:
        own = policy_dry_run.get(intent.policy)
        if own is True:
            return f"policy {intent.policy}: dry_run"
        if own is None and global_dry_run:
            return "dry_run"
        return rollout.advisory(intent) if rollout is not None else None

    return why
