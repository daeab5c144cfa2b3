"""What `ooda replay --compare` answers: each set's change against the recording and against
every other set (energy, throughput, seconds above budget, actions), with 90% intervals.

Against the recording the interval is the set's own, moved by the recorded value (the recording
is measured, not estimated). Two sets share the model's parameter draws, so their difference's
interval is taken draw by draw (paired): a prior that is wrong is wrong for both, and the
difference is surer than either value (the report's confidence counts the same draws)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from agent.replay.engine import ReplayReport, SetResult

KPIS = ("energy_kwh", "throughput_ratio", "budget_violation_s")
DIGITS = {"energy_kwh": 3, "throughput_ratio": 4, "budget_violation_s": 1}
RECORDING = "recording"


@dataclass(frozen=True)
class Delta:
    """`policy_set` minus `against` (a set's name, or RECORDING) per KPI, with its interval;
    `actions`: the difference in actions (targets, every kind)."""

    policy_set: str
    against: str
    change: dict[str, float | None]
    interval: dict[str, list[float | None]]
    relative: dict[str, float | None]  # the change as a share of `against`'s value
    actions: int

    def to_json(self) -> dict[str, Any]:
        return {
            "set": self.policy_set,
            "against": self.against,
            **self.change,
            "relative": self.relative,
            "actions": self.actions,
            "interval": {"level": 0.9, **self.interval},
        }


def deltas(report: ReplayReport) -> list[Delta]:
    """Each set against the recording, then each set against every set before it."""
    out = [_against_recording(s, report.baseline) for s in report.sets]
    for i, later in enumerate(report.sets):
        out.extend(_between(later, earlier) for earlier in report.sets[:i])
    return out


def _total(actions: dict[str, int]) -> int:
    return int(sum(actions.values()))


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _against_recording(result: SetResult, baseline: dict[str, Any]) -> Delta:
    def interval(key: str, base: float, _diff: float) -> list[float | None]:
        lo, hi = (result.kpis.get("interval", {}).get(key) or [None, None])[:2]
        if lo is None or hi is None:
            return [None, None]
        return [round(lo - base, DIGITS[key]), round(hi - base, DIGITS[key])]

    return _delta(result, RECORDING, baseline, interval)


def _between(result: SetResult, other: SetResult) -> Delta:
    def interval(key: str, _theirs: float, diff: float) -> list[float | None]:
        return _paired(result.draws.get(key), other.draws.get(key), diff, DIGITS[key])

    return _delta(result, other.policy_set.name, other.kpis, interval)


def _delta(
    result: SetResult,
    against: str,
    their_kpis: dict[str, Any],
    interval_of: Callable[[str, float, float], list[float | None]],
) -> Delta:
    """`result` minus `their_kpis` (named `against`) per KPI; `interval_of(key, theirs, diff)`
    is the change's interval."""
    change: dict[str, float | None] = {}
    interval: dict[str, list[float | None]] = {}
    relative: dict[str, float | None] = {}
    for key in KPIS:
        mine, theirs = _num(result.kpis.get(key)), _num(their_kpis.get(key))
        if mine is None or theirs is None:
            change[key], interval[key], relative[key] = None, [None, None], None
            continue
        diff = mine - theirs
        change[key] = round(diff, DIGITS[key])
        interval[key] = interval_of(key, theirs, diff)
        relative[key] = round(diff / theirs, 4) if theirs else None
    actions = _total(result.kpis["actions"]) - _total(their_kpis["actions"])
    return Delta(result.policy_set.name, against, change, interval, relative, actions)


def _paired(mine: Any, theirs: Any, diff: float, digits: int) -> list[float | None]:
    """The 90% interval of a difference, draw by draw (it holds the point estimate's)."""
    if mine is None or theirs is None or np.shape(mine) != np.shape(theirs) or not np.size(mine):
        return [None, None]
    paired = np.asarray(mine, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)
    if not np.isfinite(paired).any():
        return [None, None]
    lo, hi = np.nanquantile(paired, [0.05, 0.95])
    return [round(min(float(lo), diff), digits), round(max(float(hi), diff), digits)]
