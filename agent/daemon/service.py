"""`ooda run`: the long-running agent, one per cluster.

APScheduler (3.x) starts a cycle every `daemon.interval_s` on one worker thread with
`max_instances=1` and `coalesce`: a cycle that overruns its interval is reported (log and
`ooda_cycle_overruns_total`; the run it pushed out counts in `ooda_cycles_skipped_total`), never
overlapped. The main thread only waits: for signals (SIGTERM/SIGINT stop, SIGHUP reloads the
configuration), and to ping systemd's watchdog while cycles make progress.

Stopping: no new cycle starts; the running one gets `daemon.stop_grace_s` to finish, else it is
abandoned (the audit file is flushed and the state on disk is the last consistent one). Then
caps are renewed once more or released (`daemon.on_exit`), the state is saved, the audit log
closed, and the process exits 0.

Reloading: the new file is validated and built first; if anything is wrong, the old
configuration stays and the error is logged with its key path. Otherwise the new runtime takes
over between two cycles with the old one's state (the guard's ownership and cooldowns, policy
memories, learned models, leases) and, if the [twin] section is unchanged, the same twin; if
the [site] section is unchanged, the same link to the site (its etcd session and leadership: a
reload never hands the cluster to a standby).

`run_cycle` is the scheduler's job and nothing else: tests drive it directly on a FakeClock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import structlog
from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobEvent,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import CollectorRegistry

from agent.act.recovery import recover
from agent.assembly import (
    Agent,
    assemble,
    build_meter,
    hosts_twin,
    kept_site,
    reads_the_present,
)
from agent.config import Config, force_dry_run, load_config, state_dir
from agent.core.clock import Clock, SystemClock, as_time_s
from agent.core.errors import BadInputError, ConfigError
from agent.core.intents import GpuTargets, ReleasePowerCap
from agent.core.protocols import CapLeaseRenewer, Persistent
from agent.daemon.lock import InstanceLock
from agent.daemon.notify import SystemdNotify
from agent.daemon.state import StateFile, TwinStore, ensure_dir
from agent.daemon.telemetry import DaemonMetrics, Health, TelemetryServer
from agent.loop import CycleReport
from agent.meter.metrics import MeterMetrics
from agent.sim.adapters import TwinClock, TwinPlacement
from agent.sim.realtime import TwinPacer
from agent.sim.twin import Twin
from agent.site.link import SiteLink
from policies.registry import PolicyRegistry, default_registry

log = structlog.get_logger("ooda.daemon")

DEFAULT_LISTEN = ("127.0.0.1", 9464)
JOB_ID = "cycle"


def parse_listen(text: str, option: str = "--metrics-listen") -> tuple[str, int] | None:
    """`ADDR:PORT`, `[IPv6]:PORT`, or `off`."""
    if text.strip().lower() in ("off", "none"):
        return None
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})", text.strip())
    if match is None:
        raise BadInputError(
            f"{option}: expected ADDR:PORT such as 127.0.0.1:9464 or [::1]:9464, or 'off' "
            f"(got {text!r})"
        )
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise BadInputError(f"{option}: port {port} is out of range (0-65535)")
    return host, port


@dataclass(frozen=True)
class DaemonOptions:
    config_path: Path
    force_dry_run: bool = False  # --dry-run: advise only, whatever the file says
    state_dir: Path | None = None  # --state-dir: overrides daemon.state_dir
    metrics_listen: tuple[str, int] | None = DEFAULT_LISTEN


def _twin_key(config: Config) -> str:
    """The [twin] section minus its pace: the same key means the same simulated cluster."""
    return json.dumps(
        config.twin.model_dump(mode="json", exclude={"speed", "cycle_s"}), sort_keys=True
    )


def _twin_cycle_s(config: Config) -> float:
    """Twin seconds per cycle at speed 0: `twin.cycle_s`, else the control interval."""
    return config.twin.cycle_s or config.daemon.interval_s


def _agent_version() -> str:
    try:
        return version("ooda-agent")
    except PackageNotFoundError:
        return "unknown"


class Daemon:
    def __init__(
        self,
        options: DaemonOptions,
        *,
        wall: Clock | None = None,
        registry: PolicyRegistry | None = None,
        notify: SystemdNotify | None = None,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        """`wall`: wall time (Unix seconds) for health, state-save timing and pacing the twin;
        tests pass a FakeClock. Cycle and stage durations are always measured for real."""
        self.options = options
        self.wall = wall or SystemClock()
        self.registry = registry or default_registry()
        self.notify = notify or SystemdNotify()
        self._metrics_registry = metrics_registry
        self._cycle_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._stop_requested = False
        self._reload_requested = False
        self._stopping = False
        self._scheduler: BackgroundScheduler | None = None
        self.server: TelemetryServer | None = None
        self.pacer: TwinPacer | None = None
        self.last_report: CycleReport | None = None
        self.started_unix: float | None = None
        self._cycle_started_unix: float | None = None
        self._last_cycle_end_unix: float | None = None
        self._last_success_unix: float | None = None
        self._last_save_unix: float | None = None
        self.timeline = "unix"
        self.restored = False
        self.state_problems: list[str] = []
        self.exit_abandoned = False
        self.lock: InstanceLock | None = None
        # Set by start():
        self.runtime: Agent
        self.meter_metrics: MeterMetrics
        self.metrics: DaemonMetrics
        self.store: StateFile
        self.twin_store: TwinStore

    # -- lifecycle --------------------------------------------------------------------------------

    def _load_config(self) -> Config:
        config = load_config(self.options.config_path, self.registry)
        if self.options.state_dir is not None:
            daemon = config.daemon.model_copy(update={"state_dir": self.options.state_dir})
            config = config.model_copy(update={"daemon": daemon})
        if self.options.force_dry_run:
            config = force_dry_run(config)
        return config

    def _build(self, config: Config, twin: Twin | None, site: SiteLink | None = None) -> Agent:
        # A source with a time of its own (the twin's, a trace's) follows the wall clock.
        clock = SystemClock() if reads_the_present(config) else None
        return assemble(
            config, clock=clock, registry=self.registry, twin=twin, wall=self.wall, site=site
        )

    def start(self) -> None:
        """Load the config, take the cluster's lock, build the runtime, restore state, serve
        /metrics. Raises BadInputError (bad config or option, exit 2) or AlreadyRunningError."""
        config = self._load_config()
        directory = state_dir(config)
        try:
            ensure_dir(directory)
        except OSError as exc:
            raise ConfigError(
                f"daemon.state_dir: cannot create {directory} ({exc.strerror or exc}); "
                "set daemon.state_dir or --state-dir"
            ) from None
        # An existing directory may still be unusable (a read-only mount, another user's): say
        # so naming the setting (exit 2), not with a traceback that Restart= would loop on.
        unusable = None if os.access(directory, os.W_OK | os.X_OK) else "not writable by this user"
        cluster = config.cluster.name
        # A named replica in a site: the etcd election, not the host, keeps one acting.
        replica = None if config.site is None else config.site.replica
        self.lock = InstanceLock(directory, cluster, replica)
        if unusable is None:
            try:
                self.lock.acquire()
            except OSError as exc:
                unusable = f"cannot open its lock {self.lock.path}: {exc.strerror or exc}"
        if unusable is not None:
            raise ConfigError(
                f"daemon.state_dir: {directory} is unusable ({unusable}); set daemon.state_dir "
                "or --state-dir"
            )
        if self.lock.pid_error is not None:
            log.warning("lock_pid_unwritten", reason=self.lock.pid_error)
        try:
            self._open(config)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, config: Config) -> None:
        directory, cluster = state_dir(config), config.cluster.name
        self.store = StateFile(directory, cluster)
        self.twin_store = TwinStore(directory, cluster)
        self.metrics = DaemonMetrics(self._metrics_registry, config.daemon.per_gpu_metrics_max)
        self.meter_metrics = MeterMetrics(self.metrics.registry, config.meter.top_accounts)
        twin: Twin | None = None
        saved_twin: Mapping[str, Any] | None = None
        if hosts_twin(config):
            saved_twin, why = self.twin_store.load(_twin_key(config))
            if why is not None:
                log.warning("twin_not_restored", reason=why)
            if saved_twin is not None:
                twin = saved_twin["twin"]
                self.timeline = str(saved_twin["timeline"])
            else:
                self.timeline = f"twin-{secrets.token_hex(4)}"
        runtime = self._build(config, twin)
        try:
            if saved_twin is not None and isinstance(runtime.actuators.placement, TwinPlacement):
                runtime.actuators.placement.reasons = dict(saved_twin.get("placement_reasons", {}))
            self.runtime = runtime
            self._attach_meter(runtime)
            if runtime.meter is not None:
                self.meter_metrics.seed(runtime.meter.ledger.account_totals())
            self.pacer = self._pacer_for(runtime)
            self._restore_state()
            # The audit log is read through now (the restore's read-back): a replica that takes
            # over later reads only what came after.
            runtime.loop.read_through_s = runtime.loop.clock.now()
            self.started_unix = self.wall.now()
            self._publish_config()
            listen = self.options.metrics_listen
            if listen is not None:
                try:
                    self.server = TelemetryServer(
                        listen[0], listen[1], self.metrics.registry, self.health
                    ).start()
                except OSError as exc:
                    raise BadInputError(
                        f"--metrics-listen: cannot listen on {listen[0]}:{listen[1]} "
                        f"({exc.strerror or exc})"
                    ) from None
        except BaseException:
            runtime.close()
            raise
        log.info(
            "started",
            cluster=cluster,
            config=str(self.options.config_path),
            dry_run=config.dry_run,
            interval_s=config.daemon.interval_s,
            source=config.source.kind,
            policies=[p.name for p in runtime.loop.policies],
            metrics=self.server.address if self.server else None,
            state=str(self.store.path),
            restored=self.restored,
            pid=os.getpid(),
        )

    def _pacer_for(self, runtime: Agent) -> TwinPacer | None:
        twin = runtime.twin
        if twin is None or not isinstance(runtime.loop.clock, TwinClock):
            return None
        cfg = runtime.config
        return TwinPacer(twin, self.wall, cfg.twin.speed, _twin_cycle_s(cfg))

    def _publish_config(self) -> None:
        config = self.runtime.config
        self.metrics.info.clear()
        self.metrics.info.labels(config.cluster.name, _agent_version(), config.source.kind).set(1)
        self.metrics.dry_run.set(1 if config.dry_run else 0)
        self.metrics.interval.set(config.daemon.interval_s)

    def _attach_meter(self, runtime: Agent) -> None:
        """The agent's meter, on the ledger of this run's timeline (a new twin's is new)."""
        runtime.meter = build_meter(runtime, self.timeline, on_booked=self.meter_metrics.booked)

    def _book_energy(self, report: CycleReport) -> None:
        """The meter's hook: the interval this cycle ended is booked (errors join the cycle's)."""
        meter = self.runtime.meter
        if meter is None:
            return
        result = meter.book(report.snapshot, report.situation.nodes)
        self.meter_metrics.observe(result)
        self.meter_metrics.ledger_bytes.set(meter.ledger.bytes())
        if result.errors:
            report.errors.extend(result.errors)

    @property
    def config(self) -> Config:
        return self.runtime.config

    @property
    def interval_s(self) -> float:
        return self.runtime.config.daemon.interval_s

    # -- state ------------------------------------------------------------------------------------

    def collect_state(self, runtime: Agent | None = None) -> dict[str, Any]:
        runtime = runtime or self.runtime
        loop = runtime.loop
        parts: dict[str, Any] = {
            "loop": loop.to_dict(),
            "guard": loop.ledger.to_dict(),  # the name the guard saved it under
            "orienter": loop.orienter.to_dict(),
            "policies": {name: m.model_dump(mode="json") for name, m in loop.memory.items()},
            "recommendations": self.metrics.recommendations.to_dict(),
        }
        # Any actuator may keep memory of its own (the node client's leases): typed as object,
        # since the edge protocols do not promise it.
        caps: object = runtime.actuators.caps
        if isinstance(caps, Persistent):
            parts["caps"] = caps.to_dict()
        placement: object = runtime.actuators.placement
        if isinstance(placement, Persistent):
            parts["placement"] = placement.to_dict()
        return parts

    def restore_parts(self, runtime: Agent, parts: Mapping[str, Any]) -> list[str]:
        """Load each part; one that fails is put back as it was (fresh) and reported."""
        loop = runtime.loop
        problems: list[str] = []
        targets: dict[str, Persistent] = {
            "loop": loop,
            "guard": loop.ledger,
            "orienter": loop.orienter,
            "recommendations": self.metrics.recommendations,
        }
        caps: object = runtime.actuators.caps
        placement: object = runtime.actuators.placement
        if isinstance(caps, Persistent):
            targets["caps"] = caps
        if isinstance(placement, Persistent):
            targets["placement"] = placement
        for name, part in targets.items():
            if name not in parts:
                continue
            before = part.to_dict()
            try:
                part.load_dict(parts[name])
            except Exception as exc:
                part.load_dict(before)
                problems.append(f"{name}: {type(exc).__name__}: {exc}")
        memories = parts.get("policies", {})
        if not isinstance(memories, Mapping):
            problems.append("policies: not an object")
            memories = {}
        by_name = {p.name: p for p in loop.policies}
        for name, data in memories.items():
            policy = by_name.get(name)
            if policy is None:
                continue  # a policy no longer configured: its memory goes
            try:
                loop.memory[name] = policy.Memory.model_validate(data)
            except Exception as exc:
                problems.append(f"policies.{name}: {type(exc).__name__}: {exc}")
        return problems

    def _restore_state(self) -> None:
        loaded = self.store.load()
        self.restored = False
        if loaded.problem is not None:
            self.state_problems.append(loaded.problem)
            log.error(
                "state_unreadable_starting_fresh",
                problem=loaded.problem,
                moved_to=str(loaded.moved_to) if loaded.moved_to else None,
            )
        elif loaded.found:
            timeline = loaded.meta.get("timeline")
            if timeline != self.timeline:
                why = (
                    f"state file {self.store.path}: written on timeline {timeline!r}, this run is "
                    f"on {self.timeline!r} (a new twin): its times would be meaningless"
                )
                self.state_problems.append(why)
                log.warning("state_other_timeline_starting_fresh", problem=why)
            else:
                problems = self.restore_parts(self.runtime, loaded.parts)
                for problem in problems:
                    log.error("state_part_unreadable_starting_fresh", problem=problem)
                self.state_problems.extend(problems)
                self.restored = True
                self.metrics.publish_recommendations()
                self._recover_unsaved(loaded.meta.get("clock_s"))
                ledger = self.runtime.ledger
                log.info(
                    "state_restored",
                    file=str(self.store.path),
                    saved_at_unix=loaded.meta.get("saved_at_unix"),
                    caps_owned=int(np.isfinite(ledger.caps["our_cap_w"]).sum()),
                    nodes_known=len(ledger.nodes),
                )
        if loaded.problem is not None or not loaded.found:
            self._recover_unsaved(None)  # no state to start from: the audit log says what is ours
        for _ in self.state_problems:
            self.metrics.state_problems.inc()
        self.metrics.state_restored.set(1 if self.restored else 0)

    def _recover_unsaved(self, saved_clock_s: float | None) -> None:
        """What the loop did after the state was saved (a kill before the next save), read
        back from the audit log into the ledger: see agent.act.recovery. `saved_clock_s`: the
        loop's clock at the save (decisions up to it, the on-exit release included, are in the
        state); None (no state to start from): the whole log is read."""
        audit_path = self.runtime.audit.path
        if audit_path is None:
            return
        saved = as_time_s(saved_clock_s)  # read from JSON
        saved_s = -math.inf if saved is None else saved
        try:
            found = recover(self.runtime.ledger, audit_path, saved_s)
        except Exception as exc:  # the agent starts all the same, and says so
            problem = (
                f"audit log {audit_path} not read back ({type(exc).__name__}: {exc}): caps "
                "set after the last state save are not known as ours"
            )
            self.state_problems.append(problem)
            log.error("state_recovery_failed", problem=problem)
            return
        if found.records:
            log.warning("state_recovered_from_audit", audit=str(audit_path), **asdict(found))

    def save_state(self) -> bool:
        """Persist (atomically) what the agent must not forget. Call between cycles."""
        runtime = self.runtime
        try:
            # The agent's own state (what it owns, small) before the twin (its "cluster", large):
            # a kill between the two writes then leaves the agent owning caps an older twin lacks
            # (it releases or resets them), never a twin with caps the agent does not own (which
            # it would never release). Each file is replaced atomically.
            size = self.store.save(
                self.collect_state(runtime),
                {
                    "timeline": self.timeline,
                    "clock_s": runtime.loop.clock.now(),
                    "pid": os.getpid(),
                    "cycles": runtime.loop.cycles,
                },
            )
            twin = runtime.twin
            if twin is not None and self.pacer is not None:
                placement = runtime.actuators.placement
                reasons = dict(placement.reasons) if isinstance(placement, TwinPlacement) else {}
                self.twin_store.save(
                    _twin_key(runtime.config), self.timeline, twin, {"placement_reasons": reasons}
                )
        except Exception as exc:  # a full disk must not stop the agent; say so loudly
            self.metrics.state_saves.labels("failed").inc()
            log.error("state_save_failed", file=str(self.store.path), error=str(exc))
            return False
        now = self.wall.now()
        self._last_save_unix = now
        self.metrics.state_saves.labels("ok").inc()
        self.metrics.state_bytes.set(size)
        self.metrics.state_last_save.set(now)
        return True

    # -- one cycle --------------------------------------------------------------------------------

    def run_cycle(self) -> CycleReport | None:
        """One scheduled cycle: pace the twin, run the loop, publish, persist when due."""
        if not self._cycle_lock.acquire(blocking=False):
            return None  # a reload or the shutdown holds it: this run is simply not needed
        try:
            if self._stopping:
                return None
            return self._cycle_locked()
        finally:
            self._cycle_started_unix = None
            self._cycle_lock.release()

    def _cycle_locked(self) -> CycleReport | None:
        runtime = self.runtime
        interval = runtime.config.daemon.interval_s
        self._cycle_started_unix = self.wall.now()
        t0 = time.perf_counter()
        try:
            if self.pacer is not None:
                self.pacer.sync()
                self.metrics.twin_skipped.set(self.pacer.skipped_s)
            report = runtime.loop.cycle()
            self._book_energy(report)
        except Exception as exc:  # the loop guards its stages; this is a bug, not an outage
            duration = time.perf_counter() - t0
            now = self.wall.now()
            self._last_cycle_end_unix = now
            self.metrics.cycle_failed(duration, now)
            log.exception("cycle_failed", error=str(exc))
            return None
        duration = time.perf_counter() - t0
        now = self.wall.now()
        self._last_cycle_end_unix = now
        observed = report.snapshot.n_gpus > 0
        if observed:
            self._last_success_unix = now
        capped = int(np.isfinite(runtime.ledger.caps["our_cap_w"]).sum())
        self.metrics.observe_cycle(report, duration, now, observed, capped)
        site = runtime.site
        if site is not None:
            self.metrics.observe_site(site.leadership(), site.last_budget())
        if duration > interval:
            self.metrics.overruns.inc()
            log.warning(
                "cycle_overran",
                cycle=report.cycle,
                duration_s=round(duration, 3),
                interval_s=interval,
                stage_s={k: round(v, 3) for k, v in report.stage_s.items()},
            )
        self.last_report = report
        acted = bool(report.actions)
        summary = report.summary()
        level = log.warning if report.errors else log.info if acted else log.debug
        level(
            "cycle_summary",
            cycle=report.cycle,
            gpus=summary["gpus"],
            stale=summary["stale"],
            fleet_power_w=summary["fleet_power_w"],
            budget_w=summary["budget_w"],
            intents=summary["intents"],
            refused=summary["refused"],
            actions={k: v for k, v in summary["actions"].items() if v},
            duration_s=round(duration, 4),
            errors=report.errors or None,
        )
        due = (
            self._last_save_unix is None
            or now - self._last_save_unix >= runtime.config.daemon.state_save_interval_s
        )
        if acted or due:
            self.save_state()
        self.notify.status(self._status_line(report))
        return report

    def _status_line(self, report: CycleReport) -> str:
        s = report.situation
        budget = "no budget" if s.budget_w is None else f"{s.budget_w / 1000:.1f} kW budget"
        mode = "dry-run" if self.config.dry_run else "live"
        return (
            f"cycle {report.cycle}: {report.snapshot.n_gpus} GPUs "
            f"({int(report.snapshot.stale.sum())} stale), {s.fleet_power_w / 1000:.1f} kW of "
            f"{budget}, {len(report.actions)} actions ({mode})"
        )

    # -- health -----------------------------------------------------------------------------------

    def _stuck_after_s(self) -> float:
        return max(5 * self.interval_s, 60.0)

    def progressing(self) -> bool:
        """False when a cycle hangs, or none has ended for a long time: systemd's watchdog is
        then no longer fed and restarts the agent."""
        now = self.wall.now()
        stuck = self._stuck_after_s()
        started = self._cycle_started_unix
        if started is not None and now - started > stuck:
            return False
        last = self._last_cycle_end_unix or self.started_unix or now
        return now - last <= stuck

    def health(self) -> Health:
        now = self.wall.now()
        d = self.config.daemon
        max_age = d.ready_max_age_s or max(3 * d.interval_s, 10.0)
        last = self._last_success_unix
        alive = self.progressing()
        if last is None:
            ready, why = False, "no cycle has seen the fleet yet"
        elif now - last > max_age:
            ready, why = False, f"no cycle saw the fleet for {now - last:.0f} s (> {max_age:g} s)"
        else:
            ready, why = True, "ok"
        report = self.last_report
        detail: dict[str, Any] = {
            "cluster": self.config.cluster.name,
            "pid": os.getpid(),
            "dry_run": self.config.dry_run,
            "cycles": self.runtime.loop.cycles,
            "last_success_age_s": None if last is None else round(now - last, 3),
            "gpus": None if report is None else report.snapshot.n_gpus,
            "reason": why if alive else "cycles are not progressing",
        }
        site = self.runtime.site
        if site is not None:
            view = site.leadership()
            detail["site"] = {"role": view.role, "leader": view.leader, "problem": view.problem}
        return Health(alive=alive, ready=ready, detail=detail)

    # -- reload -----------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config file. Anything wrong: refused, logged with its key path, the old
        configuration kept."""
        self.notify.reloading()
        old = self.runtime
        try:
            config = self._load_config()
            fixed = [
                key
                for key, a, b in (
                    ("cluster.name", config.cluster.name, old.config.cluster.name),
                    ("daemon.state_dir", state_dir(config), state_dir(old.config)),
                )
                if a != b
            ]
            if fixed:
                raise ConfigError(
                    f"config {self.options.config_path}: {', '.join(fixed)}: cannot change "
                    "while running (it names the cluster's lock and state); restart instead"
                )
            same_twin = (
                old.twin is not None
                and hosts_twin(config)
                and _twin_key(config) == _twin_key(old.config)
            )
            # What can fail is prepared before anything is swapped: the old runtime stays whole
            # (and running) until the new one and its schedule are ready.
            schedule = self._schedule_for(old.config, config)
            # The same [site]: the running link (its session, its leadership) carries over.
            runtime = self._build(config, old.twin if same_twin else None, kept_site(old, config))
        except Exception as exc:
            return self._reload_refused(exc)
        with self._cycle_lock:  # between two cycles
            try:
                self._reschedule(schedule)
            except Exception as exc:
                runtime.close()
                return self._reload_refused(exc)
            new_twin = runtime.twin is not None and not same_twin
            old_placement, placement = old.actuators.placement, runtime.actuators.placement
            if (
                same_twin
                and isinstance(old_placement, TwinPlacement)
                and isinstance(placement, TwinPlacement)
            ):
                placement.reasons = old_placement.reasons
            if new_twin:
                # A new simulated cluster: the old one's ownership and times mean nothing there.
                log.warning("twin_recreated", reason="the [twin] section changed; state fresh")
                self.timeline = f"twin-{secrets.token_hex(4)}"
                self.metrics.recommendations = type(self.metrics.recommendations)()
            else:
                problems = self.restore_parts(runtime, self.collect_state(old))
                for problem in problems:
                    log.error("state_not_carried_over", problem=problem)
            # One agent run, whatever the reloads: cycle numbers and decision ids go on, and
            # what of the audit log its ledger knows.
            runtime.loop.cycles, runtime.loop.run_id = old.loop.cycles, old.loop.run_id
            runtime.loop.read_through_s = old.loop.read_through_s
            self.runtime = runtime
            try:
                self._attach_meter(runtime)
            except Exception as exc:  # the new runtime runs; it only books nothing
                log.error("meter_not_opened", error=str(exc))
            if same_twin and self.pacer is not None:
                self.pacer.set_speed(config.twin.speed, _twin_cycle_s(config))
            else:
                self.pacer = self._pacer_for(runtime)
            old.hand_site_to(runtime)
            try:
                old.close()
            except Exception as exc:  # the new runtime is in; the old one's end must not stop it
                log.error("old_runtime_close_failed", error=str(exc))
            self._publish_config()
            self.save_state()
        self.metrics.reloads.labels("ok").inc()
        log.info(
            "config_reloaded",
            config=str(self.options.config_path),
            dry_run=config.dry_run,
            interval_s=config.daemon.interval_s,
            policies=[p.name for p in runtime.loop.policies],
        )
        self.notify.ready("running (configuration reloaded)")
        return True

    def _reload_refused(self, exc: Exception) -> bool:
        self.metrics.reloads.labels("refused").inc()
        if isinstance(exc, BadInputError):
            log.error("config_reload_refused", error=str(exc), kept="the running configuration")
        else:
            log.exception("config_reload_refused", error=str(exc))
        self.notify.ready(f"reload refused, running the old configuration: {exc}")
        return False

    def _schedule_for(self, old: Config, new: Config) -> tuple[IntervalTrigger | None, int]:
        """The new trigger (None: the interval is unchanged) and misfire grace, built ahead:
        a value the scheduler cannot take fails here, before the reload changes anything."""
        trigger = (
            IntervalTrigger(seconds=new.daemon.interval_s)
            if new.daemon.interval_s != old.daemon.interval_s
            else None
        )
        return trigger, self._misfire_grace(new)

    def _reschedule(self, schedule: tuple[IntervalTrigger | None, int]) -> None:
        if self._scheduler is None:
            return
        trigger, grace = schedule
        if trigger is not None:
            self._scheduler.reschedule_job(JOB_ID, trigger=trigger)
        self._scheduler.modify_job(JOB_ID, misfire_grace_time=grace)

    # -- scheduling -------------------------------------------------------------------------------

    @staticmethod
    def _misfire_grace(config: Config) -> int:
        grace = config.daemon.misfire_grace_s or config.daemon.interval_s
        return max(1, round(grace))  # APScheduler takes whole seconds

    def start_scheduler(self) -> None:
        logging.getLogger("apscheduler").setLevel(logging.ERROR)  # we report skips ourselves
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"max_instances": 1, "coalesce": True},
            timezone=UTC,
        )
        scheduler.add_listener(
            self._on_job_event, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED | EVENT_JOB_ERROR
        )
        scheduler.add_job(
            self.run_cycle,
            IntervalTrigger(seconds=self.interval_s),
            id=JOB_ID,
            name="ooda cycle",
            next_run_time=datetime.now(UTC),
            misfire_grace_time=self._misfire_grace(self.config),
        )
        scheduler.start()
        self._scheduler = scheduler

    def _on_job_event(self, event: JobEvent) -> None:
        if event.code == EVENT_JOB_MAX_INSTANCES:
            self.metrics.skipped.labels("overlap").inc()
            log.warning("cycle_skipped", reason="the previous cycle is still running")
        elif event.code == EVENT_JOB_MISSED:
            self.metrics.skipped.labels("misfire").inc()
            log.warning("cycle_skipped", reason="started too late (misfire grace passed)")
        else:
            log.error("cycle_job_error", error=str(getattr(event, "exception", "")))

    # -- the main thread --------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop_requested = True
        self._wake()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"!")

    def wait(self) -> None:
        """Until a stop is requested: reloads when asked, feeds the watchdog while cycles make
        progress."""
        watchdog_s = self.notify.watchdog_s
        tick = min(1.0, watchdog_s / 2) if watchdog_s else 1.0
        while True:
            select.select([self._wake_r], [], [], tick)
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 512):
                    pass
            if self._stop_requested:
                break
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            if watchdog_s and self.progressing():
                self.notify.watchdog()

    def shutdown(self) -> bool:
        """Stop: no new cycles, the running one finishes or is abandoned, on_exit, state saved,
        everything closed. True when the last cycle finished (False: it was abandoned)."""
        self._stopping = True
        self.notify.stopping()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        grace = self.config.daemon.stop_grace_s
        finished = (
            self._cycle_lock.acquire(timeout=grace)
            if grace > 0
            else (self._cycle_lock.acquire(blocking=False))
        )
        if not finished:
            self.exit_abandoned = True
            log.error(
                "cycle_abandoned",
                after_s=grace,
                note="the state on disk is the last consistent one; the audit file is flushed",
            )
            self._flush_audit()
            self._close_outside()
            return False
        try:
            self._on_exit()
            self.save_state()
            self.runtime.close()
        finally:
            self._cycle_lock.release()
            self._close_outside()
        log.info("stopped", cycles=self.runtime.loop.cycles)
        return True

    def _flush_audit(self) -> None:
        with contextlib.suppress(Exception):
            self.runtime.audit.flush()

    def _close_outside(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.lock is not None:
            self.lock.release()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _on_exit(self) -> None:
        runtime = self.runtime
        config = runtime.config
        if config.dry_run:
            return  # nothing was applied
        caps: object = runtime.actuators.caps
        if config.daemon.on_exit == "renew":
            if isinstance(caps, CapLeaseRenewer):
                try:
                    renewed, result = caps.renew_leases(config.actuators.lease_s)
                    log.info("leases_renewed_on_exit", gpus=len(renewed), ok=int(result.ok.sum()))
                except Exception as exc:
                    log.error("lease_renewal_on_exit_failed", error=str(exc))
            return
        report = self.last_report
        loop = runtime.loop
        if report is None:
            return
        snap = report.snapshot
        rows = np.flatnonzero(loop.ledger.capped_by_us(snap.uuid, recorded=False))
        if rows.size == 0:
            return
        intent = ReleasePowerCap(
            policy="ooda-daemon",
            reason="the agent stopped (daemon.on_exit = 'release')",
            targets=GpuTargets.from_rows(snap, rows),
        )
        now = loop.clock.now()
        decision_id = f"d-{loop.run_id}-exit"
        ids = iter(range(1, 1_000_000))
        with runtime.audit.batch():
            runtime.audit.decision(decision_id, intent, False, now)
            actions = loop.executor.execute(
                [(decision_id, intent)], lambda: f"a-{loop.run_id}-exit-{next(ids)}", now
            )
            for action in actions:  # the executor recorded them in the ledger
                runtime.audit.action(action)
        log.info("caps_released_on_exit", gpus=int(rows.size))

    def serve(self) -> int:
        """The foreground service: start, schedule, wait for signals, stop. Returns 0."""
        self.start()
        previous: dict[int, Any] = {}

        def on_stop(signum: int, _frame: FrameType | None) -> None:
            self.request_stop()

        def on_hup(signum: int, _frame: FrameType | None) -> None:
            self.request_reload()

        handlers: dict[int, Callable[[int, FrameType | None], None]] = {
            signal.SIGTERM: on_stop,
            signal.SIGINT: on_stop,
            signal.SIGHUP: on_hup,
        }
        for signum, handler in handlers.items():
            previous[signum] = signal.signal(signum, handler)
        try:
            self.start_scheduler()
            self.notify.ready(
                f"running: cluster {self.config.cluster.name}, every {self.interval_s:g} s, "
                f"{'dry-run' if self.config.dry_run else 'live'}"
            )
            self.wait()
            log.info("stopping")
            finished = self.shutdown()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if not finished:
            # The abandoned cycle's thread cannot be stopped; leave without waiting for it.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return 0
