"""The ledger on the agent's /metrics: energy, cost and CO2 per account, idle energy per
partition, what could not be metered, and the meter's own health.

Label cardinality is bounded: the first `top_accounts` accounts by energy (those in the ledger at
start, then new ones while there is room) are named; every other account is summed as
`account="other"`. An account keeps its label once it has one, so every series only grows (they
are counters: a series that moved between labels would look like a reset). Idle GPUs are
`account="idle"`, jobs no accounting names `account="unknown"`; partitions are bounded the same
way.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from agent.meter.booking import Booking
from agent.meter.ledger import J_PER_KWH, Prices
from agent.meter.meter import MeterResult

OTHER = "other"
IDLE = "idle"
UNKNOWN = "unknown"


class _Bounded:
    """Names kept as labels: at most `limit`, first come; the rest are OTHER."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.named: set[str] = set()

    def label(self, name: str) -> str:
        if name in self.named:
            return name
        if len(self.named) < self.limit:
            self.named.add(name)
            return name
        return OTHER


class MeterMetrics:
    def __init__(self, registry: CollectorRegistry, top_accounts: int = 10) -> None:
        self.accounts = _Bounded(top_accounts)
        self.partitions = _Bounded(top_accounts)
        self.energy = Counter(
            "ooda_meter_energy_joules",
            "Energy booked in the ledger (GPU plus its share of node overhead), by account "
            "(the top accounts; the rest as other; idle GPUs as idle).",
            ["account"],
            registry=registry,
        )
        self.cost = Counter(
            "ooda_meter_cost",
            "Cost of the energy booked (the tariff's currency), by account.",
            ["account"],
            registry=registry,
        )
        self.co2 = Counter(
            "ooda_meter_carbon_grams",
            "CO2e of the energy booked (g), by account.",
            ["account"],
            registry=registry,
        )
        self.idle = Counter(
            "ooda_meter_idle_energy_joules",
            "Energy of idle GPUs (with their share of node overhead), by partition.",
            ["partition"],
            registry=registry,
        )
        self.unmetered = Counter(
            "ooda_meter_unmetered_gpu_seconds",
            "GPU-seconds seen but not metered (no energy counter and no power at both ends).",
            registry=registry,
        )
        self.intervals = Counter(
            "ooda_meter_intervals",
            "Intervals the meter looked at, by result (booked, already_booked, gap, failed).",
            ["result"],
            registry=registry,
        )
        self.ledger_bytes = Gauge(
            "ooda_meter_ledger_bytes", "Size of the ledger file (bytes).", registry=registry
        )
        self.book_seconds = Gauge(
            "ooda_meter_book_seconds", "Time the last booking took (s).", registry=registry
        )

    def seed(self, totals: Mapping[str, tuple[float, float, float]]) -> None:
        """Name the ledger's largest accounts first (by energy)."""
        ranked = sorted(
            ((j, a) for a, (j, _, _) in totals.items() if a and not a.startswith("(")),
            reverse=True,
        )
        for _, account in ranked:
            self.accounts.label(account)

    def observe(self, result: MeterResult) -> None:
        if result.errors and not result.booked:
            outcome = "failed"
        elif result.booked:
            outcome = "booked"
        elif result.reason == "already booked":
            outcome = "already_booked"
        else:
            outcome = "gap"
        self.intervals.labels(outcome).inc()
        self.book_seconds.set(result.duration_s)
        if result.booked and result.t0_s is not None and result.t1_s is not None:
            self.unmetered.inc(result.unmetered_gpus * (result.t1_s - result.t0_s))

    def booked(self, booking: Booking, prices: Prices, accounts: Mapping[str, str]) -> None:
        """Add one interval's energy, cost and CO2 to the series (the meter's `on_booked`)."""
        total = booking.gpu_j + booking.overhead_j
        sums: dict[str, float] = {}
        idle: dict[str, float] = {}
        for job, partition, joules in zip(
            booking.job.tolist(), booking.partition.tolist(), total.tolist(), strict=True
        ):
            if job == "":
                label = IDLE
                key = self.partitions.label(partition or "none")
                idle[key] = idle.get(key, 0.0) + joules
            else:
                account = accounts.get(job) or ""
                label = self.accounts.label(account) if account else UNKNOWN
            sums[label] = sums.get(label, 0.0) + joules
        for label, joules in sums.items():
            self.energy.labels(label).inc(joules)
            kwh = joules / J_PER_KWH
            if np.isfinite(prices.price_per_kwh):
                self.cost.labels(label).inc(kwh * prices.price_per_kwh)
            if np.isfinite(prices.g_per_kwh):
                self.co2.labels(label).inc(kwh * prices.g_per_kwh)
        for partition, joules in idle.items():
            self.idle.labels(partition).inc(joules)
