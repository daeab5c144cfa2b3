"""power_budget: keep cluster power under its budget, losing the least throughput.

Each cycle it plans caps for every GPU it can see so that, in the worst case until the next cycle,
the fleet stays under `budget x (1 - margin_frac)`:

- what cannot be seen still draws power: stale GPUs are counted at their maximum limit (where
  that is unknown, at the largest limit known; and no cap is released while such a GPU is unseen);
- idle GPUs may start work at any moment, so while the budget binds they get their lowest cap and
  count at it; GPUs whose job is still warming up count at their cap too;
- the rest of the budget is split over busy GPUs by equal marginal throughput per watt (water-
  filling over each GPU's power curve), weighted by priority class so low-priority work is capped
  first; where accounts have shares (`account_shares`, or the scheduler's fairshare), it is first
  split over accounts by weighted max-min fairness (an account under its share is capped last;
  a share it does not use flows to the others), then within each account as above;
- when the uncapped worst case fits under the budget with `release_hysteresis_frac` to spare for
  `release_hold_s`, every cap is released.

What the budget covers is explicit: the GPUs' power plus the configured overhead per node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import Field

from agent.core.curves import allocate_power, known_natural_w
from agent.core.intents import GpuTargets, Intent, Notify, ReleasePowerCap, SetPowerCap, Severity
from agent.core.jobs import ACCOUNT_LABEL
from agent.core.reads import Reads
from agent.core.settings import IntKey
from agent.core.situation import Situation
from agent.core.snapshot import Metric
from policies.base import BasePolicy, Decision, PolicyMemory, PolicySettings
from policies.fair_share import weighted_max_min

NOISE_Z = 3.0  # fleet-level safety margin against draw noise, in standard deviations


class PowerBudgetSettings(PolicySettings):
    margin_frac: float = Field(
        0.01, ge=0.0, le=0.5, description="Share of the budget held back as a safety margin."
    )
    release_hysteresis_frac: float = Field(
        0.05,
        ge=0.0,
        le=0.5,
        description="Caps are released only when the uncapped worst case stays this far (share "
        "of the budget) below it.",
    )
    release_hold_s: float = Field(
        60.0, ge=0.0, description="Seconds the uncapped worst case must fit before caps go (s)."
    )
    priority_weights: dict[IntKey, float] = Field(
        default_factory=lambda: {0: 1.0, 1: 4.0, 2: 16.0},
        description="Priority class -> weight of its throughput; low weights are capped first.",
    )
    lease_s: float = Field(
        120.0,
        gt=0.0,
        description="Cap lease: without renewal a node falls back to its safe cap (s).",
    )
    account_shares: dict[str, Annotated[float, Field(ge=0.0)]] = Field(
        default_factory=dict,
        description="Account -> its share of the power when the budget binds (relative "
        "weights, e.g. {physics = 50, chem = 30}): weighted max-min fairness between accounts, "
        "priorities still ordering the work inside each. Empty: the scheduler's shares if "
        "scheduler_shares, else no account fairness.",
    )
    scheduler_shares: bool = Field(
        True,
        description="Without account_shares, use the scheduler's (Slurm's fairshare tree) "
        "where it gives them.",
    )
    unlisted_share: float = Field(
        0.0,
        ge=0.0,
        description="The share of an account the shares do not name (and of jobs of no known "
        "account); 0: such work is capped first and gets what the named accounts leave.",
    )


class PowerBudgetMemory(PolicyMemory):
    fits_since_s: float | None = None  # when the uncapped worst case started to fit


@dataclass(frozen=True, eq=False)
class _Fleet:
    """One cycle's view of the fleet against its budget (PowerBudget._fleet)."""

    busy: np.ndarray  # per GPU: busy, seen and with a known cap range
    idle: np.ndarray
    stale_worst: np.ndarray  # per GPU: what an unseen one may draw at worst
    stale_guessed: bool
    available: float  # what the budget leaves for what can be steered (W)
    natural_w: np.ndarray  # per GPU: its natural draw (its max cap where unknown)
    natural: np.ndarray  # the same, busy GPUs only
    idle_now: float
    learned_reserve: float | None
    worst_uncapped: float
    evidence: dict[str, Any]


class PowerBudget(BasePolicy[PowerBudgetSettings, PowerBudgetMemory]):
    name: ClassVar[str] = "power_budget"
    reads: ClassVar[Reads] = Reads.every_cycle(Metric.POWER_W)  # its draw against the budget
    safety: ClassVar[bool] = True
    holds_budget: ClassVar[bool] = True
    description: ClassVar[str] = (
        "Keep cluster power under its budget with the least throughput lost."
    )
    Settings = PowerBudgetSettings
    Memory = PowerBudgetMemory

    def decide(
        self, situation: Situation, memory: PolicyMemory, now_s: float
    ) -> Decision[PolicyMemory]:
        assert isinstance(memory, PowerBudgetMemory)
        budget = situation.budget_w
        if budget is None or situation.snapshot.n_gpus == 0:
            return Decision([], memory)
        fleet = self._fleet(situation, budget)
        groups_fit = self._groups_fit(
            situation, fleet.busy, fleet.idle, fleet.natural, fleet.stale_worst
        )
        if fleet.worst_uncapped <= fleet.available and groups_fit:
            if fleet.stale_guessed:
                # The fit rests on a guess of what unseen GPUs draw: hold the caps as they are.
                return Decision([], PowerBudgetMemory(fits_since_s=None))
            return self._maybe_release(
                situation, memory, now_s, fleet.available, fleet.worst_uncapped, fleet.evidence
            )
        return self._cap(situation, fleet, budget, now_s)

    def _fleet(self, situation: Situation, budget: float) -> _Fleet:
        """What may be spent this cycle, and what the fleet would draw uncapped at worst."""
        s = self.settings
        snap = situation.snapshot
        fresh = snap.fresh
        bounded = np.isfinite(situation.min_cap_w) & np.isfinite(situation.max_cap_w)
        control = fresh & bounded
        busy = situation.busy & control
        idle = control & ~situation.busy
        curves = situation.curves

        # Power we cannot steer this cycle, counted at its worst.
        stale_worst, stale_guessed = situation.stale_worst_w()
        stale_w = float(stale_worst.sum())
        unbounded_w = float(
            np.nansum(np.where(fresh & ~bounded, snap.column(Metric.POWER_W)[0], 0.0))
        )
        std = np.where(busy, (curves.natural_w_hi - curves.natural_w) / 2.0, 0.0)
        noise_w = NOISE_Z * float(np.sqrt(np.nansum(std**2)))
        available = (
            budget * (1.0 - s.margin_frac) - situation.overhead_w - stale_w - unbounded_w - noise_w
        )

        # A busy GPU whose natural draw is unknown counts at its max cap, as in allocate_power.
        natural_w = known_natural_w(curves.natural_w, situation.max_cap_w)
        natural = np.where(busy, natural_w, 0.0)
        draw = np.nan_to_num(snap.column(Metric.POWER_W)[0], nan=0.0)
        learned_reserve = situation.arrival_reserve_w
        # What idle GPUs may add before the next cycle: learned from history where known
        # (bounded by the worst case), else every idle GPU at its cap.
        idle_worst = float(situation.max_cap_w[idle].sum())
        idle_now = float(draw[idle].sum())
        if learned_reserve is not None:
            idle_worst = min(idle_worst, idle_now + learned_reserve)
        worst_uncapped = float(natural.sum()) + idle_worst
        evidence: dict[str, Any] = {
            "budget_w": round(budget, 1),
            "fleet_power_w": round(situation.fleet_power_w, 1),
            "available_w": round(available, 1),
            "worst_uncapped_w": round(worst_uncapped, 1),
            "stale_reserve_w": round(stale_w, 1),
            "stale_max_cap_guessed": stale_guessed,
            "arrival_reserve_w": None if learned_reserve is None else round(learned_reserve, 1),
        }
        return _Fleet(
            busy=busy,
            idle=idle,
            stale_worst=stale_worst,
            stale_guessed=stale_guessed,
            available=available,
            natural_w=natural_w,
            natural=natural,
            idle_now=idle_now,
            learned_reserve=learned_reserve,
            worst_uncapped=worst_uncapped,
            evidence=evidence,
        )

    def _cap(
        self, situation: Situation, fleet: _Fleet, budget: float, now_s: float
    ) -> Decision[PolicyMemory]:
        """Over budget at worst: caps for the busy GPUs (the least throughput lost) and the
        idle ones (their lowest cap), and a critical Notify when even that cannot hold."""
        snap = situation.snapshot
        expires = now_s + self.settings.lease_s
        intents: list[Intent] = []
        targets_rows: list[np.ndarray] = []
        caps: list[np.ndarray] = []
        idle_rows = np.flatnonzero(fleet.idle)
        idle_caps = situation.min_cap_w[idle_rows]
        idle_reserve = float(idle_caps.sum())
        if fleet.learned_reserve is not None:
            idle_reserve = min(idle_reserve, fleet.idle_now + fleet.learned_reserve)
        busy_rows = np.flatnonzero(fleet.busy)
        if busy_rows.size:
            busy_caps, feasible = self._busy_caps(
                situation, fleet, busy_rows, fleet.available - idle_reserve
            )
            targets_rows.append(busy_rows)
            caps.append(busy_caps)
            if not feasible:
                intents.append(
                    Notify(
                        policy=self.name,
                        reason="budget cannot be met even with every GPU at its lowest cap",
                        evidence=fleet.evidence,
                        expires_s=expires,
                        target="cluster",
                        severity=Severity.CRITICAL,
                        summary=f"power budget {budget:.0f} W is below the fleet's floor",
                    )
                )
        targets_rows.append(idle_rows)
        caps.append(np.floor(idle_caps))
        rows = np.concatenate(targets_rows)
        watts = np.concatenate(caps)
        if rows.size:
            power = snap.column(Metric.POWER_W)[0]
            curves = situation.curves
            intents.insert(
                0,
                SetPowerCap(
                    policy=self.name,
                    reason="fleet over its power budget in the worst case until the next cycle",
                    evidence={
                        **fleet.evidence,
                        "natural_w": np.round(np.nan_to_num(curves.natural_w[rows]), 1),
                        "power_w": np.round(np.nan_to_num(power[rows]), 1),
                        "busy": situation.busy[rows],
                        "priority": situation.priority[rows],
                    },
                    expires_s=expires,
                    targets=GpuTargets.from_rows(snap, rows),
                    watts=watts,
                ),
            )
        return Decision(intents, PowerBudgetMemory(fits_since_s=None))

    def _busy_caps(
        self,
        situation: Situation,
        fleet: _Fleet,
        busy_rows: np.ndarray,
        available_busy: float,
    ) -> tuple[np.ndarray, bool]:
        """The busy GPUs' caps within `available_busy` (weighted by priority class, group
        budgets held, one share per job), and whether the budget can be met at all."""
        curves = situation.curves
        natural_w = fleet.natural_w
        weights = np.ones(busy_rows.size)
        prio = situation.priority[busy_rows]
        for klass, weight in self.settings.priority_weights.items():
            weights[prio == klass] = weight

        def allocate(sel: np.ndarray, budget_w: float) -> tuple[np.ndarray, np.ndarray, bool]:
            r = busy_rows[sel]
            alloc = allocate_power(
                budget_w,
                natural_w[r],
                curves.a[r],
                curves.b[r],
                curves.cap_draw_frac[r],
                situation.min_cap_w[r],
                situation.max_cap_w[r],
                weight=weights[sel],
            )
            planned = np.where(alloc.binding, alloc.power_w, natural_w[r])
            return alloc.cap_w, planned, alloc.feasible

        busy_caps, busy_power, feasible, by_account = self._allocate_by_account(
            situation, busy_rows, natural_w, available_busy, allocate
        )
        if by_account:
            fleet.evidence["account_budget_w"] = by_account
        busy_caps, busy_power = self._hold_group_budgets(
            situation,
            busy_rows,
            fleet.idle,
            fleet.stale_worst,
            busy_caps,
            busy_power,
            available_busy,
            allocate,
        )
        shared = self._same_share_per_job(situation, natural_w, busy_rows, busy_power, busy_caps)
        return np.floor(shared), feasible

    def _shares(self, situation: Situation) -> dict[str, float]:
        """The accounts' shares: the settings', else the scheduler's (where asked)."""
        s = self.settings
        if s.account_shares:
            return dict(s.account_shares)
        if s.scheduler_shares:
            return dict(situation.snapshot.account_shares)
        return {}

    def _allocate_by_account(
        self,
        situation: Situation,
        busy_rows: np.ndarray,
        natural_w: np.ndarray,
        available_w: float,
        allocate: Callable[[np.ndarray, float], tuple[np.ndarray, np.ndarray, bool]],
    ) -> tuple[np.ndarray, np.ndarray, bool, dict[str, float]]:
        """Caps and planned power for the busy GPUs: the budget split over accounts by their
        shares (weighted max-min: policies.fair_share), then over each account's GPUs by
        throughput and priority. Without shares, or GPUs labelled with accounts, over all at
        once. Also the budget each account got (W), for the evidence."""
        shares = self._shares(situation)
        label = situation.snapshot.labels.get(ACCOUNT_LABEL)
        everyone = np.ones(busy_rows.size, dtype=bool)
        if not shares or label is None:
            caps, power, feasible = allocate(everyone, available_w)
            return caps, power, feasible, {}
        names, inverse = np.unique(label[busy_rows], return_inverse=True)
        curves = situation.curves
        k = curves.cap_draw_frac[busy_rows]
        demand = np.minimum(natural_w[busy_rows], k * situation.max_cap_w[busy_rows])
        floor = np.minimum(demand, k * situation.min_cap_w[busy_rows])
        weight = np.array([shares.get(str(n), self.settings.unlisted_share) for n in names])
        budgets = weighted_max_min(
            available_w,
            np.bincount(inverse, weights=demand, minlength=names.size),
            np.bincount(inverse, weights=floor, minlength=names.size),
            weight,
        )
        caps = np.zeros(busy_rows.size)
        power = np.zeros(busy_rows.size)
        feasible = True
        for j in range(names.size):  # per account (tens, not GPUs)
            sel = inverse == j
            caps[sel], power[sel], ok = allocate(sel, float(budgets[j]))
            feasible &= ok
        return (
            caps,
            power,
            feasible,
            {
                str(n) or "(no account)": round(float(b), 1)
                for n, b in zip(names, budgets, strict=True)
            },
        )

    def _same_share_per_job(
        self,
        situation: Situation,
        natural_w: np.ndarray,
        rows: np.ndarray,
        power_w: np.ndarray,
        caps_w: np.ndarray,
    ) -> np.ndarray:
        """A job runs at the pace of its slowest GPU: every GPU of a job gets the same share of
        its natural draw (the job's planned power in total, spread evenly), so no GPU of it is
        held back while its peers burn watts that buy nothing. GPUs without a job label stand
        alone. Group (rack) budgets stay held: the job's total power does not change.
        `natural_w`: per GPU of the situation, the natural draw the plan counted."""
        curves = situation.curves
        job = situation.snapshot.job[rows]
        if rows.size == 0 or not (job != "").any():
            return caps_w
        natural = natural_w[rows]
        binding = caps_w < situation.max_cap_w[rows] - 0.5
        keys = situation.snapshot.job_key[rows]
        _, inverse = np.unique(keys, return_inverse=True)
        planned = np.bincount(inverse, weights=np.where(binding, power_w, natural))
        nat_sum = np.bincount(inverse, weights=natural)
        any_binding = np.bincount(inverse, weights=binding.astype(np.float64)) > 0
        share = np.minimum(1.0, planned / np.maximum(nat_sum, 1e-9))[inverse]
        even = np.clip(
            share * natural / curves.cap_draw_frac[rows],
            situation.min_cap_w[rows],
            situation.max_cap_w[rows],
        )
        return np.where(any_binding[inverse] & (share < 1.0), even, caps_w)

    def _groups_fit(
        self,
        situation: Situation,
        busy: np.ndarray,
        idle: np.ndarray,
        natural: np.ndarray,
        stale_worst_w: np.ndarray,
    ) -> bool:
        """Does every rack or row fit its own budget with no caps, in the worst case?"""
        snap = situation.snapshot
        per_node_overhead = situation.overhead_w / max(snap.n_nodes, 1)
        for _name, (group_budget, members) in situation.group_budgets.items():
            stale = float(stale_worst_w[members].sum())
            worst = (
                float(natural[members & busy].sum())
                + float(situation.max_cap_w[members & idle].sum())
                + stale
                + per_node_overhead * np.unique(snap.node[members]).size
            )
            if worst > group_budget * (1.0 - self.settings.margin_frac):
                return False
        return True

    def _hold_group_budgets(
        self,
        situation: Situation,
        busy_rows: np.ndarray,
        idle: np.ndarray,
        stale_worst_w: np.ndarray,
        caps_w: np.ndarray,
        power_w: np.ndarray,
        available_busy_w: float,
        allocate: Callable[[np.ndarray, float], tuple[np.ndarray, np.ndarray, bool]],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Racks and rows with budgets of their own: a group over its budget is re-planned within
        it, its GPUs fixed there, and the cluster budget they free is re-planned over the rest."""
        if not situation.group_budgets:
            return caps_w, power_w
        s = self.settings
        snap = situation.snapshot
        per_node_overhead = situation.overhead_w / max(snap.n_nodes, 1)
        fixed = np.zeros(busy_rows.size, dtype=bool)
        for _ in range(3):  # a re-plan of the rest can push another group over: a few passes
            changed = False
            for _name, (group_budget, members) in situation.group_budgets.items():
                in_group = members[busy_rows] & ~fixed
                if not in_group.any():
                    continue
                rows = np.flatnonzero(members)
                idle_reserve = float(situation.min_cap_w[rows][idle[rows]].sum())
                stale = float(stale_worst_w[rows].sum())
                overhead = per_node_overhead * np.unique(snap.node[rows]).size
                fixed_here = float(power_w[members[busy_rows] & fixed].sum())
                room = (
                    group_budget * (1.0 - s.margin_frac)
                    - idle_reserve
                    - stale
                    - overhead
                    - fixed_here
                )
                if power_w[in_group].sum() <= room + 1e-6:
                    continue
                group_caps, group_power, _ = allocate(in_group, room)
                caps_w[in_group] = np.minimum(caps_w[in_group], group_caps)
                power_w[in_group] = np.minimum(power_w[in_group], group_power)
                fixed |= in_group
                changed = True
            if not changed or fixed.all():
                break
            rest = ~fixed
            left = available_busy_w - float(power_w[fixed].sum())
            caps_w[rest], power_w[rest], _ = allocate(rest, left)
        return caps_w, power_w

    def _maybe_release(
        self,
        situation: Situation,
        memory: PowerBudgetMemory,
        now_s: float,
        available: float,
        worst_uncapped: float,
        evidence: dict[str, Any],
    ) -> Decision[PolicyMemory]:
        s = self.settings
        budget = situation.budget_w or 0.0
        roomy = worst_uncapped <= available - s.release_hysteresis_frac * budget
        if not roomy:
            # Fits, but without room to spare: hold the caps as they are (no flapping).
            return Decision([], PowerBudgetMemory(fits_since_s=None))
        since = memory.fits_since_s if memory.fits_since_s is not None else now_s
        capped = situation.snapshot.fresh & (situation.cap_w < situation.default_cap_w - 0.5)
        if now_s - since < s.release_hold_s or not capped.any():
            return Decision([], PowerBudgetMemory(fits_since_s=since))
        rows = np.flatnonzero(capped)
        release = ReleasePowerCap(
            policy=self.name,
            reason="budget has room again: caps released",
            evidence={**evidence, "held_s": round(now_s - since, 1)},
            expires_s=now_s + s.lease_s,
            targets=GpuTargets.from_rows(situation.snapshot, rows),
        )
        return Decision([release], PowerBudgetMemory(fits_since_s=since))
