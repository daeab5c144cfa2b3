"""The loop's two hooks for running under a coordinator (agent.site): a budget that comes from
outside the config, and a gate that says whether this replica may act.

Both are optional: a loop without them plans under its configured budget and always acts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from agent.core.situation import Situation
from agent.core.snapshot import Snapshot


@dataclass(frozen=True)
class BudgetReading:
    """The budget to plan under this cycle; `problem` is said in the cycle's errors."""

    watts: float | None
    problem: str | None = None


@runtime_checkable
class BudgetSource(Protocol):
    """A budget granted from outside (the site coordinator's grant, its lease, a safe share)."""

    def read_budget(self, snapshot: Snapshot) -> BudgetReading: ...

    def oriented(self, situation: Situation) -> None:
        """What orient made of this cycle (the cluster's demand curve is built from it)."""
        ...


@dataclass(frozen=True)
class GateState:
    may_act: bool
    problem: str | None = None  # said in the cycle's errors while it holds
    took_over: bool = False  # allowed now after a cycle that was not: read what others did


@runtime_checkable
class ActGate(Protocol):
    """Whether this replica may act now (leader election); asked once per cycle."""

    def check(self) -> GateState: ...
