"""Grants: the watts the coordinator gives a cluster, with a lease; and the agent's view of its
own (what it plans under, and what it says about it every cycle).

A grant holds until `issued_unix + lease_s`. The agent keeps its last grant until then even when
it hears nothing more (the coordinator or etcd gone), and falls back to its configured safe share
after. To stay safe across two hosts' clocks, the agent also ends a grant `lease_s` after it
received it (by its own monotonic clock), whichever comes first; the coordinator counts a grant
as possibly in force until `issued_unix + lease_s + clock_skew_s`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.core.clock import Clock


class GrantError(ValueError):
    """A grant read from the store that cannot be used."""


@dataclass(frozen=True)
class Grant:
    cluster: str
    watts: float
    epoch: int  # the coordinator's round: a newer grant has a larger one
    issued_unix: float
    lease_s: float
    coordinator: str = ""
    # What the cluster falls back to when this grant lapses (its safe share, scaled down where
    # a demand-response target leaves less); None: its configured safe share.
    fallback_w: float | None = None

    @property
    def expires_unix(self) -> float:
        return self.issued_unix + self.lease_s

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "watts": self.watts,
            "epoch": self.epoch,
            "issued_unix": round(self.issued_unix, 3),
            "lease_s": self.lease_s,
            "coordinator": self.coordinator,
            "fallback_w": self.fallback_w,
        }

    @staticmethod
    def from_json(data: object) -> Grant:
        if not isinstance(data, Mapping):
            raise GrantError("not an object")
        try:
            cluster = data["cluster"]
            watts, issued, lease = data["watts"], data["issued_unix"], data["lease_s"]
            epoch = data["epoch"]
        except KeyError as exc:
            raise GrantError(f"{exc.args[0]}: missing") from None
        numbers = {"watts": watts, "issued_unix": issued, "lease_s": lease}
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise GrantError(f"{name}: not a number")
            if not math.isfinite(value) or value < 0:
                raise GrantError(f"{name}: not a finite, non-negative number")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise GrantError("epoch: not a non-negative integer")
        if not isinstance(cluster, str):
            raise GrantError("cluster: not a string")
        fallback = data.get("fallback_w")
        if fallback is not None and (
            isinstance(fallback, bool)
            or not isinstance(fallback, int | float)
            or not math.isfinite(fallback)
            or fallback < 0
        ):
            raise GrantError("fallback_w: not a finite, non-negative number")
        return Grant(
            cluster=cluster,
            watts=float(watts),
            epoch=epoch,
            issued_unix=float(issued),
            lease_s=float(lease),
            coordinator=str(data.get("coordinator", "")),
            fallback_w=None if fallback is None else float(fallback),
        )


# Where an agent's budget comes from (BudgetView.source; a bounded set: metrics label by it).
BUDGET_SOURCES = ("grant", "grant_kept", "lapsing", "safe_share")


@dataclass(frozen=True)
class BudgetView:
    """What the agent plans under this cycle and why; `problem` is said every cycle it holds."""

    watts: float | None
    # "grant", "grant_kept" (heard nothing new, still valid), "lapsing" (held at the lapsed
    # grant before rising to the safe share), "safe_share"
    source: str
    grant: Grant | None
    problem: str | None = None
    expires_in_s: float | None = None  # the grant's remaining lease


class GrantKeeper:
    """The agent's last grant and its safe share. `wall`: Unix time; `mono`: a clock that only
    moves forward (MonotonicClock), for the receipt-based end of a lease."""

    def __init__(
        self,
        cluster: str,
        safe_share_w: float,
        wall: Clock,
        mono: Clock,
        rise_delay_s: float = 0.0,
    ) -> None:
        """`rise_delay_s`: after a lapse, a budget that would go up (a grant below the safe
        share) stays at the grant this long: the clusters coming down at the same lapse are
        down first (one cycle interval and the clocks' skew)."""
        self.cluster = cluster
        self.safe_share_w = safe_share_w
        self.rise_delay_s = rise_delay_s
        self.wall = wall
        self.mono = mono
        self.grant: Grant | None = None
        self._received_mono: float | None = None

    def offer(self, grant: Grant) -> bool:
        """A grant read from the store: taken if it is this cluster's and newer (or the same
        epoch renewed). False: ignored."""
        if grant.cluster != self.cluster:
            return False
        current = self.grant
        if current is not None and (grant.epoch, grant.issued_unix) <= (
            current.epoch,
            current.issued_unix,
        ):
            return False
        self.grant = grant
        self._received_mono = self.mono.now()
        return True

    def fallback_w(self, grant: Grant | None) -> float:
        """The safe share after `grant` lapses: the configured one, or less if it says so."""
        if grant is None or grant.fallback_w is None:
            return self.safe_share_w
        return min(self.safe_share_w, grant.fallback_w)

    def remaining_s(self) -> float | None:
        """Seconds the last grant still holds (<= 0: lapsed); None: none was received."""
        grant, received = self.grant, self._received_mono
        if grant is None or received is None:
            return None
        by_wall = grant.expires_unix - self.wall.now()
        by_receipt = received + grant.lease_s - self.mono.now()
        return min(by_wall, by_receipt, grant.lease_s)

    def view(self, store_problem: str | None = None) -> BudgetView:
        """The budget to plan under now. `store_problem`: why nothing new can be heard (etcd
        unreachable), said with whatever budget results."""
        remaining = self.remaining_s()
        grant = self.grant
        if grant is None or remaining is None:
            why = "no grant from the site coordinator yet"
            return BudgetView(
                self.safe_share_w,
                "safe_share",
                None,
                _join(
                    store_problem, f"{why}: planning under the safe share {self.safe_share_w:.0f} W"
                ),
            )
        if remaining > 0:
            source = "grant" if store_problem is None else "grant_kept"
            problem = None
            if store_problem is not None:
                until = time.strftime("%H:%M:%S", time.gmtime(grant.expires_unix))
                problem = (
                    f"{store_problem}: keeping the grant of {grant.watts:.0f} W until "
                    f"{until} UTC ({remaining:.0f} s left), then the safe share "
                    f"{self.fallback_w(grant):.0f} W"
                )
            return BudgetView(grant.watts, source, grant, problem, remaining)
        safe = self.fallback_w(grant)
        if grant.watts < safe and -remaining < self.rise_delay_s:
            wait = (
                f"the grant of {grant.watts:.0f} W (epoch {grant.epoch}) lapsed: rising to the "
                f"safe share {safe:.0f} W in {self.rise_delay_s + remaining:.0f} s (the clusters "
                "coming down go first)"
            )
            return BudgetView(grant.watts, "lapsing", grant, _join(store_problem, wait), remaining)
        lapsed = (
            f"the grant of {grant.watts:.0f} W (epoch {grant.epoch}) lapsed {-remaining:.0f} s "
            f"ago: planning under the safe share {safe:.0f} W"
        )
        return BudgetView(safe, "safe_share", grant, _join(store_problem, lapsed), remaining)


def _join(first: str | None, second: str) -> str:
    return second if first is None else f"{first}; {second}"
