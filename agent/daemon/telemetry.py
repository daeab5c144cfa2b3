"""The agent's own telemetry: Prometheus metrics (every name `ooda_*`), /healthz and /readyz.

Cardinality is bounded whatever the fleet size: labels are stages, policies, intent kinds,
outcomes, a fixed set of refusal classes and, in a site, the fixed sets of leadership roles and
budget sources (never a replica's or a coordinator's name); never GPUs, except for the per-GPU
recommendation series, which are capped (`daemon.per_gpu_metrics_max`, the largest recommended
reductions first; the aggregates per policy are always exported). At 100,000 GPUs a per-GPU
series each would be another DCGM exporter's worth of series from one process, every scrape.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.act.ledger import SETTLE_RESULTS
from agent.core.efficiency import TokenRates, token_rates
from agent.core.intents import Intent, Outcome, ReleasePowerCap, SetPowerCap
from agent.core.keyed import KeyedColumns
from agent.core.snapshot import Metric
from agent.loop import STAGES, CycleReport
from agent.site.election import ROLES, Leadership
from agent.site.grants import BUDGET_SOURCES, BudgetView

FloatArray = npt.NDArray[np.float64]

# Refusal reasons are free text; metrics get a fixed set of classes (first match wins).
REFUSAL_CLASSES: tuple[tuple[str, str], ...] = (
    ("overridden", "overridden"),
    ("expired", "expired"),
    ("stale", "stale"),
    ("not seen", "not_seen"),
    ("cap range", "cap_range_unknown"),
    ("default limit", "default_unknown"),
    ("not capped by us", "not_ours"),
    ("someone else", "not_ours"),
    ("breaker", "breaker"),
    ("rate limit", "rate_limit"),
    ("opt", "opted_out"),
    ("cooldown", "cooldown"),
    ("dead band", "dead_band"),
    ("out of scope", "out_of_scope"),
    ("scope cannot", "out_of_scope"),
    ("not a number", "invalid"),
)
REFUSAL_CLASS_NAMES = tuple(sorted({c for _, c in REFUSAL_CLASSES} | {"other"}))

ERROR_KINDS = ("source", "observe", "placement", "policy", "lease", "site", "other")

CYCLE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def refusal_class(reason: str) -> str:
    text = reason.lower()
    for needle, name in REFUSAL_CLASSES:
        if needle in text:
            return name
    return "other"


def error_kind(message: str) -> str:
    for prefix, kind in (
        ("observe failed", "observe"),
        ("placement state", "placement"),
        ("policy ", "policy"),
        ("lease renewal", "lease"),
        ("site:", "site"),  # the grant's lease, etcd unreachable, the demand curve
        ("leadership", "site"),  # a standby, or leadership unknown or unconfirmed
    ):
        if message.startswith(prefix):
            return kind
    return "other"


def targets_of(intent: Intent) -> int:
    targets = getattr(intent, "targets", None)
    return len(targets) if targets is not None else 1


class Recommendations:
    """What dry-run recommended, per GPU (columnar, keyed by UUID): the last recorded cap (NaN
    once a release was recorded) and the policy. Persisted with the daemon's state."""

    def __init__(self) -> None:
        self.cols = KeyedColumns(
            {
                "node": ("U128", ""),
                "gpu": (np.int64, -1),
                "cap_w": (np.float64, np.nan),
                "limit_w": (np.float64, np.nan),  # the GPU's limit when last seen
                "policy": ("U64", ""),
            }
        )

    def update(self, report: CycleReport) -> None:
        for action in report.actions:
            if action.outcome is not Outcome.RECORDED:
                continue
            intent = action.intent
            if not isinstance(intent, SetPowerCap | ReleasePowerCap):
                continue
            t = intent.targets
            slot = self.cols.slots(t.uuid)
            self.cols["node"][slot] = t.node
            self.cols["gpu"][slot] = t.gpu
            self.cols["policy"][slot] = intent.policy
            self.cols["cap_w"][slot] = intent.watts if isinstance(intent, SetPowerCap) else np.nan
        if len(self.cols) == 0:
            return
        snap = report.snapshot
        pos, found = self.cols.lookup(snap.uuid)
        limit = report.situation.cap_w
        seen = found & np.isfinite(limit)
        self.cols["limit_w"][pos[seen]] = limit[seen]

    def per_policy(self) -> dict[str, tuple[int, float, float]]:
        """policy -> (GPUs with a recommended cap, sum of those caps W, sum of reductions W)."""
        cap = self.cols["cap_w"]
        has = np.isfinite(cap)
        if not has.any():
            return {}
        reduction = np.where(has, self.cols["limit_w"] - cap, np.nan)
        out: dict[str, tuple[int, float, float]] = {}
        policies = self.cols["policy"]
        for name in np.unique(policies[has]):
            sel = has & (policies == name)
            red = reduction[sel]
            out[str(name)] = (
                int(sel.sum()),
                float(cap[sel].sum()),
                float(red[np.isfinite(red)].sum()),
            )
        return out

    def top(self, n: int) -> list[tuple[str, str, int, str, float]]:
        """(uuid, node, gpu, policy, cap W) of the `n` largest recommended reductions."""
        cap = self.cols["cap_w"]
        rows = np.flatnonzero(np.isfinite(cap))
        if n <= 0 or rows.size == 0:
            return []
        red = self.cols["limit_w"][rows] - cap[rows]
        order = np.argsort(-np.nan_to_num(red, nan=-np.inf), kind="stable")[:n]
        c = self.cols
        return [
            (str(c.keys[r]), str(c["node"][r]), int(c["gpu"][r]), str(c["policy"][r]), cap[r])
            for r in rows[order].tolist()
        ]

    def count(self) -> int:
        return int(np.isfinite(self.cols["cap_w"]).sum())

    def to_dict(self) -> dict[str, Any]:
        return self.cols.to_dict()

    def load_dict(self, data: Mapping[str, Any]) -> None:
        self.cols.load_dict(data)


class _RecommendationCollector(Collector):
    """Per-GPU recommended caps, built at scrape time from the latest tracker (bounded)."""

    def __init__(self, source: Callable[[], list[tuple[str, str, int, str, float]]]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ooda_recommended_cap_watts",
            "Dry-run: the cap recommended for a GPU (the largest reductions only, see "
            "ooda_recommended_caps_exported).",
            labels=["node", "gpu", "uuid", "policy"],
        )
        for uuid, node, gpu, policy, cap_w in self._source():
            family.add_metric([node, str(gpu), uuid, policy], cap_w)
        yield family

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


class _TokensPerJouleCollector(Collector):
    """Tokens per joule (agent.core.efficiency), per job with application tokens and the
    cluster's, built at scrape time from the last cycle's snapshot. A series is absent, never 0,
    where its figure is unknown; at most `max_jobs` jobs (the most tokens a second) are kept."""

    def __init__(self, source: Callable[[], TokenRates | None], max_jobs: int) -> None:
        self._source = source
        self._max_jobs = max_jobs

    def collect(self) -> Iterator[GaugeMetricFamily]:
        per_job = GaugeMetricFamily(
            "ooda_tokens_per_joule",
            "Generated tokens per joule of the GPUs serving the job, over the application's "
            "rate window (jobs reporting tokens; absent where unknown).",
            labels=["hpc_job"],
        )
        cluster = GaugeMetricFamily(
            "ooda_cluster_tokens_per_joule",
            "Generated tokens per joule over every job reporting tokens (absent where none do).",
        )
        rates = self._source()
        if rates is not None:
            figure = rates.tokens_per_joule()
            known = np.flatnonzero(np.isfinite(figure))
            top = known[np.argsort(-rates.tokens_per_s[known], kind="stable")[: self._max_jobs]]
            for i in top.tolist():
                per_job.add_metric([str(rates.job[i])], float(figure[i]))
            whole = rates.cluster_tokens_per_joule()
            if np.isfinite(whole):
                cluster.add_metric([], whole)
        yield per_job
        yield cluster

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


@dataclass(frozen=True)
class Health:
    alive: bool
    ready: bool
    detail: dict[str, Any]


class DaemonMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, per_gpu_max: int = 1000) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.per_gpu_max = per_gpu_max
        self.recommendations = Recommendations()
        self._lock = threading.Lock()
        self._top: list[tuple[str, str, int, str, float]] = []
        self._token_rates: TokenRates | None = None
        self._cycle_metrics(r)
        self._fleet_metrics(r)
        self._decision_metrics(r)
        self._state_metrics(r)
        self._site_metrics(r)
        self._zero_series()

    def _cycle_metrics(self, r: CollectorRegistry) -> None:
        """What the agent runs, and how its cycles go."""
        self.info = Gauge(
            "ooda_info", "Constant 1, labelled with what this agent runs.",
            ["cluster", "version", "source"], registry=r,
        )  # fmt: skip
        self.dry_run = Gauge("ooda_dry_run", "1 while the agent only advises.", registry=r)
        self.interval = Gauge("ooda_interval_seconds", "The control interval.", registry=r)
        self.cycle_duration = Histogram(
            "ooda_cycle_duration_seconds", "Wall time of whole cycles.",
            buckets=CYCLE_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.stage_duration = Histogram(
            "ooda_stage_duration_seconds", "Wall time of each stage of the cycle.",
            ["stage"], buckets=CYCLE_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.last_cycle_duration = Gauge(
            "ooda_cycle_last_duration_seconds", "Wall time of the last cycle.", registry=r
        )
        self.last_stage_duration = Gauge(
            "ooda_stage_last_duration_seconds", "Wall time of each stage in the last cycle.",
            ["stage"], registry=r,
        )  # fmt: skip
        self.cycles = Counter(
            "ooda_cycles", "Cycles run, by result (ok; degraded: ran with errors; failed).",
            ["result"], registry=r,
        )  # fmt: skip
        self.overruns = Counter(
            "ooda_cycle_overruns",
            "Cycles that took longer than the interval (the next one waits, never overlaps).",
            registry=r,
        )
        self.skipped = Counter(
            "ooda_cycles_skipped",
            "Cycle runs skipped: overlap (the previous one still ran), misfire (too late).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "ooda_cycle_errors", "Problems reported by cycles, by kind.", ["kind"], registry=r
        )
        self.last_cycle = Gauge(
            "ooda_last_cycle_timestamp_seconds", "When the last cycle ended (Unix time).",
            registry=r,
        )  # fmt: skip
        self.last_success = Gauge(
            "ooda_last_successful_cycle_timestamp_seconds",
            "When the last cycle that saw the fleet ended (Unix time).",
            registry=r,
        )

    def _fleet_metrics(self, r: CollectorRegistry) -> None:
        """What the last cycle saw of the fleet and its budget."""
        self.gpus_seen = Gauge("ooda_gpus_seen", "GPUs in the last snapshot.", registry=r)
        self.gpus_stale = Gauge(
            "ooda_gpus_stale", "GPUs whose telemetry is too old to act on.", registry=r
        )
        self.gpus_missing = Gauge(
            "ooda_gpus_missing_power", "Fresh GPUs without a power reading.", registry=r
        )
        self.nodes_seen = Gauge("ooda_nodes_seen", "Nodes in the last snapshot.", registry=r)
        self.gpus_capped = Gauge(
            "ooda_gpus_capped_by_us", "GPUs whose cap the agent set (or recorded, in dry-run).",
            registry=r,
        )  # fmt: skip
        self.nodes_drained = Gauge(
            "ooda_nodes_drained_by_us", "Nodes drained with the agent's reason prefix.",
            registry=r,
        )  # fmt: skip
        self.budget = Gauge("ooda_budget_watts", "The power budget now (NaN: unknown).", registry=r)
        self.fleet_power = Gauge(
            "ooda_fleet_power_watts", "Fleet power: fresh GPUs plus node overhead.", registry=r
        )
        self.headroom = Gauge(
            "ooda_budget_headroom_watts", "Budget minus fleet power (NaN: no budget).", registry=r
        )
        self.forecast = Gauge(
            "ooda_forecast_fleet_power_watts",
            "Forecast fleet power by horizon; bound = point, lo or hi of the interval.",
            ["horizon_s", "bound"], registry=r,
        )  # fmt: skip

    def _decision_metrics(self, r: CollectorRegistry) -> None:
        """What was decided, refused, done, settled and recommended."""
        self.intents = Counter(
            "ooda_intents", "Targets of intents proposed (after conflicts, before the guard).",
            ["policy", "kind"], registry=r,
        )  # fmt: skip
        self.actions = Counter(
            "ooda_actions", "Targets acted on, by outcome (applied, recorded in dry-run, failed).",
            ["policy", "kind", "outcome"], registry=r,
        )  # fmt: skip
        self.refusals = Counter(
            "ooda_guard_refusals", "Targets refused by the guard or overridden, by reason class.",
            ["policy", "kind", "reason"], registry=r,
        )  # fmt: skip
        self.unchanged = Counter(
            "ooda_guard_unchanged", "Cap targets already within the dead band.", registry=r
        )
        self.caps_settled = Counter(
            "ooda_caps_settled",
            "Cap changes whose outcome was not known (a failed call, or found in the audit log "
            "after a restart), settled against telemetry: GPUs by result (adopted, released, "
            "not_in_force, given_up).",
            ["result"],
            registry=r,
        )
        for result in SETTLE_RESULTS:
            self.caps_settled.labels(result)  # 0 from the start, so rates and alerts work
        self.recommended = Gauge(
            "ooda_recommended_caps", "Dry-run: GPUs with a recommended cap, by policy.",
            ["policy"], registry=r,
        )  # fmt: skip
        self.recommended_sum = Gauge(
            "ooda_recommended_caps_watts", "Dry-run: the sum of recommended caps, by policy.",
            ["policy"], registry=r,
        )  # fmt: skip
        self.recommended_reduction = Gauge(
            "ooda_recommended_cap_reduction_watts",
            "Dry-run: the sum over GPUs of (current limit - recommended cap), by policy.",
            ["policy"], registry=r,
        )  # fmt: skip
        self.recommended_exported = Gauge(
            "ooda_recommended_caps_exported",
            "Per-GPU ooda_recommended_cap_watts series exported (capped by per_gpu_metrics_max).",
            registry=r,
        )
        r.register(_RecommendationCollector(self._top_now))
        r.register(_TokensPerJouleCollector(self._token_rates_now, self.per_gpu_max))
        ProcessCollector(namespace="ooda", registry=r)  # ooda_process_resident_memory_bytes...

    def _state_metrics(self, r: CollectorRegistry) -> None:
        """The saved state, reloads, the hosted twin."""
        self.state_saves = Counter(
            "ooda_state_saves", "State saves, by result.", ["result"], registry=r
        )
        self.state_bytes = Gauge("ooda_state_bytes", "Size of the last state saved.", registry=r)
        self.state_last_save = Gauge(
            "ooda_state_last_save_timestamp_seconds", "When state was last saved (Unix time).",
            registry=r,
        )  # fmt: skip
        self.state_restored = Gauge(
            "ooda_state_restored", "1: this run resumed saved state; 0: it started fresh.",
            registry=r,
        )  # fmt: skip
        self.state_problems = Counter(
            "ooda_state_load_problems",
            "State that could not be loaded at start (file or part), the rest started fresh.",
            registry=r,
        )
        self.reloads = Counter(
            "ooda_config_reloads", "SIGHUP reloads, by result (ok, refused).", ["result"],
            registry=r,
        )  # fmt: skip
        self.twin_skipped = Gauge(
            "ooda_twin_skipped_seconds",
            "Hosted twin: twin time given up after long pauses (it could not keep up).",
            registry=r,
        )

    def _site_metrics(self, r: CollectorRegistry) -> None:
        """In a site: this replica's role and the grant it plans under (no series otherwise)."""
        self.site_role = Gauge(
            "ooda_site_role",
            "In a site: 1 for this replica's leadership role (leader, failsafe_leader: leading "
            "through an etcd outage, standby, unconfirmed: leading but not confirmed, starting), "
            "0 for the others.",
            ["role"], registry=r,
        )  # fmt: skip
        self.site_may_act = Gauge(
            "ooda_site_may_act", "In a site: 1 while this replica may act (it leads).", registry=r
        )
        self.site_grant = Gauge(
            "ooda_site_grant_watts",
            "In a site: the coordinator's last grant to this cluster (NaN: none received).",
            registry=r,
        )
        self.site_grant_left = Gauge(
            "ooda_site_grant_lease_remaining_seconds",
            "In a site: how long the last grant still holds (<= 0: lapsed; NaN: none).",
            registry=r,
        )
        self.site_budget_source = Gauge(
            "ooda_site_budget_source",
            "In a site: 1 for where the budget planned under comes from (grant; grant_kept: "
            "etcd unheard, the lease still holds; lapsing: held before rising to the safe "
            "share; safe_share), 0 for the others.",
            ["source"], registry=r,
        )  # fmt: skip

    def observe_site(self, leadership: Leadership, budget: BudgetView | None) -> None:
        """The replica's role and its grant, after each cycle (labels from fixed sets only)."""
        for name in ROLES:
            self.site_role.labels(name).set(1 if name == leadership.role else 0)
        self.site_may_act.set(1 if leadership.may_act else 0)
        grant = None if budget is None else budget.grant
        self.site_grant.set(np.nan if grant is None else grant.watts)
        left = None if budget is None else budget.expires_in_s
        self.site_grant_left.set(np.nan if left is None else left)
        source = None if budget is None else budget.source
        for name in BUDGET_SOURCES:
            self.site_budget_source.labels(name).set(1 if name == source else 0)

    def _zero_series(self) -> None:
        """Every labelled series at 0 from the start, so rates and alerts work."""
        for stage in STAGES:
            self.stage_duration.labels(stage)
            self.last_stage_duration.labels(stage)
        for result in ("ok", "degraded", "failed"):
            self.cycles.labels(result)
        for reason in ("overlap", "misfire"):
            self.skipped.labels(reason)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        for result in ("ok", "failed"):
            self.state_saves.labels(result)
        for result in ("ok", "refused"):
            self.reloads.labels(result)

    def _top_now(self) -> list[tuple[str, str, int, str, float]]:
        with self._lock:
            return list(self._top)

    def _token_rates_now(self) -> TokenRates | None:
        with self._lock:
            return self._token_rates

    def observe_cycle(
        self,
        report: CycleReport,
        duration_s: float,
        now_unix: float,
        success: bool,
        capped_by_us: int,
    ) -> None:
        self.cycle_duration.observe(duration_s)
        self.last_cycle_duration.set(duration_s)
        for stage, seconds in report.stage_s.items():
            self.stage_duration.labels(stage).observe(seconds)
            self.last_stage_duration.labels(stage).set(seconds)
        self.cycles.labels("failed" if not success else "degraded" if report.errors else "ok").inc()
        source_errors = set(report.snapshot.errors)
        for message in report.errors:
            self.errors.labels("source" if message in source_errors else error_kind(message)).inc()
        self.last_cycle.set(now_unix)
        if success:
            self.last_success.set(now_unix)

        snap = report.snapshot
        situation = report.situation
        _power, power_ok = snap.column(Metric.POWER_W)
        self.gpus_seen.set(snap.n_gpus)
        self.gpus_stale.set(int(snap.stale.sum()))
        self.gpus_missing.set(int((snap.fresh & ~power_ok).sum()))
        self.nodes_seen.set(snap.n_nodes)
        self.gpus_capped.set(capped_by_us)
        nodes = situation.nodes
        self.nodes_drained.set(
            int((nodes.drained_by_us & nodes.known).sum()) if nodes is not None else np.nan
        )
        budget = situation.budget_w
        self.budget.set(np.nan if budget is None else budget)
        self.fleet_power.set(situation.fleet_power_w if snap.n_gpus else np.nan)
        headroom = situation.headroom_w
        self.headroom.set(np.nan if headroom is None or not snap.n_gpus else headroom)
        rates = token_rates(snap)
        with self._lock:
            self._token_rates = rates
        forecast = situation.forecast
        if forecast is not None:
            for i, horizon in enumerate(forecast.horizons_s):
                h = f"{horizon:g}"
                self.forecast.labels(h, "point").set(float(forecast.fleet_w[i]))
                self.forecast.labels(h, "lo").set(float(forecast.fleet_lo_w[i]))
                self.forecast.labels(h, "hi").set(float(forecast.fleet_hi_w[i]))

        for intent in report.intents:
            self.intents.labels(intent.policy, str(intent.kind)).inc(targets_of(intent))
        for action in report.actions:
            intent = action.intent
            self.actions.labels(intent.policy, str(intent.kind), str(action.outcome)).inc(
                targets_of(intent)
            )
        for refusal in report.refused:
            intent = refusal.intent
            self.refusals.labels(
                intent.policy, str(intent.kind), refusal_class(refusal.reason)
            ).inc(targets_of(intent))
        for over in report.overridden:
            intent = over.intent
            self.refusals.labels(intent.policy, str(intent.kind), "overridden").inc(
                targets_of(intent)
            )
        self.unchanged.inc(report.unchanged)
        for result, gpus in report.settled.items():
            self.caps_settled.labels(result).inc(gpus)

        self.recommendations.update(report)
        self.publish_recommendations()

    def publish_recommendations(self) -> None:
        per_policy = self.recommendations.per_policy()
        for family in (self.recommended, self.recommended_sum, self.recommended_reduction):
            family.clear()
        for policy, (count, total_w, reduction_w) in per_policy.items():
            self.recommended.labels(policy).set(count)
            self.recommended_sum.labels(policy).set(total_w)
            self.recommended_reduction.labels(policy).set(reduction_w)
        top = self.recommendations.top(self.per_gpu_max)
        with self._lock:
            self._top = top
        self.recommended_exported.set(len(top))

    def cycle_failed(self, duration_s: float, now_unix: float) -> None:
        self.cycle_duration.observe(duration_s)
        self.last_cycle_duration.set(duration_s)
        self.cycles.labels("failed").inc()
        self.last_cycle.set(now_unix)


# -- HTTP: /metrics, /healthz, /readyz ------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the journal


def _ipv6(host: str) -> bool:
    return ":" in host


class TelemetryServer:
    """Serves the registry and the health checks in a background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Callable[[], Health],
    ) -> None:
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "/")
            if path == "/metrics":
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            if path in ("/healthz", "/readyz"):
                state = health()
                ok = state.alive if path == "/healthz" else state.alive and state.ready
                body = json.dumps({"ok": ok, **state.detail}, default=str).encode()
                start_response(
                    "200 OK" if ok else "503 Service Unavailable",
                    [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                )
                return [body]
            body = b"ooda agent: /metrics /healthz /readyz\n"
            start_response(
                "404 Not Found" if path != "/" else "200 OK",
                [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
            )
            return [body]

        server_class: type[_Server] = _Server
        if _ipv6(host):

            class _Server6(_Server):
                address_family = socket.AF_INET6

            server_class = _Server6
        self._httpd = make_server(host, port, app, server_class, _QuietHandler)
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},  # how fast stop() returns
            name="ooda-telemetry",
            daemon=True,
        )

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if _ipv6(self.host) else f"{self.host}:{self.port}"

    def start(self) -> TelemetryServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=2)
