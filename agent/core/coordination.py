"""The loop's two hooks for running under a coordinator (agent.site): a budget that comes from
outside the config, and an election that says whether this replica may act.

Both are optional: a loop without them plans under its configured budget and always acts. The
loop meets them once per stage: in observe it reads the budget and this replica's standing (both
are what the world says this cycle), in orient it hands the budget source what orient made of the
cycle (a cluster's demand curve is built from it).
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
class Standing:
    """Whether this replica may act this cycle."""

    may_act: bool
    problem: str | None = None  # said in the cycle's errors while it holds


@runtime_checkable
class LeaderElection(Protocol):
    """Whether this replica leads its cluster now (leader election); asked once per cycle. The
    loop itself notices a takeover (a cycle since it last acted did not) and reads back what
    the other replica did."""

    def standing(self) -> Standing: ...
