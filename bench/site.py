"""Three clusters under one site budget, with a demand-response drop: the coordinated agents
against the site oracle and a static split by cluster size.

The site: three twins of different GPU models, sizes and job mixes (agent.sim), two on one feed,
under a site limit a little below what they would draw uncapped, then a demand-response event
(the site's limit down to `drop` of it for 30% of the run, ramped), all on one virtual clock.

Controllers:
- `coordinated`: each cluster's agent (power_budget, learned curves, guard) under its grant from
  the site coordinator (agent.site, on the in-memory store: the same code as `ooda site run` on
  etcd), publishing its demand curve every cycle; the first cluster runs two replicas, and its
  leader is killed at 25% of the run (the standby takes over; the failover time is reported);
- `static`: each agent under a fixed share of the site's limit by its GPU count (the limit
  followed as the coordinator follows it, demand response included);
- `oracle`: the best split with the twins' true curves (the demand curves built from the truth,
  the same split), each twin then capped by the single-cluster oracle under its share, re-solved
  every step;
- `agents_under_oracle_split` (a diagnostic): the agents under the oracle's split of the true
  curves, each interval: what the agents' own allocation within each cluster costs, apart from
  the coordinator's split.

Prints one JSON line per controller: `throughput_vs_oracle` (work done, GPU-seconds at full speed),
`above_limit_s` per limit (seconds any limit was exceeded by the twins' true draw), and for the
coordinated run `vs_static` and `failover_s` (from the leader's death to the standby's first
cycle that may act, virtual seconds; the interval and the leader TTL are printed beside it).

    python bench/site.py --json [--duration 3600] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from agent.act.audit import AuditLog
from agent.assembly import twin_agent
from agent.core.clock import FakeClock
from agent.core.gpu_models import A100_SXM, H100_SXM
from agent.loop import Loop
from agent.sim.oracle import Oracle
from agent.sim.twin import Twin, TwinSpec
from agent.site.coordinator import ClusterPlan, Coordinator, SitePlan
from agent.site.curve import CurveInputs, DemandCurve, concave_hull, frontier
from agent.site.demand import DemandEvent, site_target
from agent.site.link import LinkSettings, SiteLink
from agent.site.store import MemoryStore
from agent.site.tree import LimitTree, proportional_split, split
from policies.base import PolicySettings
from policies.power_budget import PowerBudgetSettings
from policies.registry import builtin_registry

INTERVAL_S = 15.0
LEADER_TTL_S = 15
WALL_START = 1_900_000_000.0  # the links' and coordinator's Unix time at twin time 0
PREFIX = "/ooda/sites/bench"
NOISE_Z = 3.0
POLICIES = ("power_budget",)
KILLED = "h100-big"  # the cluster that runs two replicas, and loses its leader
# The work is counted unweighted (GPU-seconds at full speed, as the oracle maximizes it): the
# agents are set to maximize the same (no priority classes), for every controller alike.
SETTINGS: dict[str, PolicySettings] = {
    "power_budget": PowerBudgetSettings(priority_weights={0: 1.0, 1: 1.0, 2: 1.0})
}


@dataclass(frozen=True)
class Site:
    specs: dict[str, TwinSpec]
    tree: LimitTree
    safe_w: dict[str, float]
    event: DemandEvent
    ramp_w_per_s: float
    duration_s: float
    kill_at_s: float


def build_site(seed: int, duration_s: float, drop: float, limit: float = 0.85) -> Site:
    median = 3 * 3600.0
    specs = {
        "h100-big": TwinSpec(nodes=8, gpus_per_node=8, model=H100_SXM, seed=seed,
                             median_job_s=median),
        "a100": TwinSpec(nodes=6, gpus_per_node=8, model=A100_SXM, seed=seed + 1,
                         median_job_s=median,
                         mix=(("llm_train", 0.4), ("small_cnn", 0.3), ("recommender", 0.3))),
        "h100-small": TwinSpec(nodes=4, gpus_per_node=8, model=H100_SXM, seed=seed + 2,
                               median_job_s=median,
                               mix=(("vision", 0.3), ("speech", 0.3), ("nlp_finetune", 0.4))),
    }  # fmt: skip
    demand = {n: s.expected_demand_w() for n, s in specs.items()}
    site_w = round(limit * sum(demand.values()), -2)
    feed_w = round(limit * (demand["h100-big"] + demand["a100"]), -2)
    tree = LimitTree.build(
        "site",
        site_w,
        {"feed-a": (feed_w, None)},
        {"h100-big": (None, "feed-a"), "a100": (None, "feed-a"), "h100-small": (None, None)},
    )
    # Safe shares: what each would get by size at the lowest target, so any lapse fits it.
    sizes = {n: float(s.n_gpus) for n, s in specs.items()}
    low = tree.with_limits({"site": drop * site_w, "feed-a": drop * feed_w})
    safe = {n: 0.95 * w for n, w in proportional_split(low, sizes).items()}
    start, length = 0.4 * duration_s, 0.3 * duration_s
    event = DemandEvent("shed", WALL_START + start, length, round(drop * site_w, -1), "schedule")
    ramp = (site_w - event.target_w) / (4 * INTERVAL_S)  # the drop in four intervals
    return Site(specs, tree, safe, event, ramp, duration_s, 0.25 * duration_s)


def limits_at(site: Site, t_s: float, lead_s: float = 0.0) -> LimitTree:
    """The tree at twin time t_s: the site's limit lowered by the event (the tightest of now and
    lead_s ahead); a demand-response target is the site's (the utility meter's), the feed keeps
    its own limit."""
    static = site.tree.nodes["site"].limit_w
    now = site_target([site.event], WALL_START + t_s, static, site.ramp_w_per_s).limit_w
    ahead = site_target([site.event], WALL_START + t_s + lead_s, static, site.ramp_w_per_s)
    return site.tree.with_limits({"site": min(now, ahead.limit_w)})


@dataclass
class Meter:
    """Per step: each twin's true draw against every limit (not the lookahead's)."""

    site: Site
    above_s: dict[str, float] = field(default_factory=dict)
    peak_over_w: dict[str, float] = field(default_factory=dict)

    def step(self, t_s: float, twins: dict[str, Twin], dt: float) -> None:
        draw = {n: tw.fleet_power_w() for n, tw in twins.items()}
        tree = limits_at(self.site, t_s)
        for node, by in tree.over(draw).items():
            self.above_s[node] = self.above_s.get(node, 0.0) + dt
            self.peak_over_w[node] = max(self.peak_over_w.get(node, 0.0), by)


def run_static(site: Site, by_truth: bool = False) -> dict[str, Any]:
    """The agents under a split the coordinator has no part in: by cluster size, or (`by_truth`,
    a diagnostic) the site oracle's split of the true curves, each interval."""
    twins = {n: Twin(s) for n, s in site.specs.items()}
    sizes = {n: float(s.n_gpus) for n, s in site.specs.items()}
    loops: dict[str, Loop] = {}
    shares: dict[str, float] = {}
    registry = builtin_registry()
    for name, twin in twins.items():
        loop = twin_agent(twin, POLICIES, registry=registry, settings=SETTINGS).loop
        loop.budget_w = lambda _snap, name=name: shares[name]
        loops[name] = loop
    meter = Meter(site)
    t = 0.0
    while t < site.duration_s - 1e-9:
        if t % INTERVAL_S < 1e-9:
            limits = limits_at(site, t, 2 * INTERVAL_S)
            if by_truth:
                curves = {n: true_curve(tw) for n, tw in twins.items()}
                shares.update(split(limits, curves).grants_w)
            else:
                shares.update(proportional_split(limits, sizes))
            for loop in loops.values():
                loop.cycle()
        for twin in twins.values():
            twin.step(1.0)
        meter.step(t, twins, 1.0)
        t += 1.0
    return {"work": sum(tw.work_done_gpu_s for tw in twins.values()), "meter": meter}


class BudgetTwin(Twin):
    """A twin whose budget is set from outside (the site oracle's share)."""

    share_w: float | None = None

    def budget_w(self) -> float | None:
        return self.share_w


def true_curve(twin: Twin) -> DemandCurve:
    """The twin's demand curve from its true curves, in the oracle's own accounting (idle GPUs
    at their idle draw, 3 standard deviations of draw noise held back)."""
    truth = twin.true_curves()
    busy = truth["busy"] > 0
    idle_w = float((~busy).sum()) * twin.spec.model.idle_w
    noise_w = (
        NOISE_Z * twin.spec.power_noise_frac * float(np.sqrt((truth["natural_w"][busy] ** 2).sum()))
    )
    fixed = twin.spec.nodes * twin.spec.node_overhead_w + idle_w + noise_w
    inputs = CurveInputs(
        truth["natural_w"][busy], truth["a"][busy], truth["b"][busy], truth["k"][busy],
        twin.min_w[busy], twin.max_w[busy], fixed, 0.0,
    )  # fmt: skip
    draw, tput = frontier(inputs, 48)
    power, value = concave_hull(draw + fixed, tput)
    return DemandCurve(tuple(power.tolist()), tuple(value.tolist()))


def run_oracle(site: Site) -> dict[str, Any]:
    twins = {n: BudgetTwin(s) for n, s in site.specs.items()}
    oracles = {n: Oracle() for n in twins}
    meter = Meter(site)
    t = 0.0
    while t < site.duration_s - 1e-9:
        tree = limits_at(site, t)
        grants = split(tree, {n: true_curve(tw) for n, tw in twins.items()}).grants_w
        for name, twin in twins.items():
            twin.share_w = grants[name]
            twin.step(1.0, oracles[name])
        meter.step(t, twins, 1.0)  # type: ignore[arg-type]
        t += 1.0
    return {"work": sum(tw.work_done_gpu_s for tw in twins.values()), "meter": meter}


@dataclass
class Replica:
    name: str
    loop: Loop
    link: SiteLink
    audit: AuditLog
    alive: bool = True
    acting_since_s: float | None = None


def _replicas(
    site: Site, twins: dict[str, Twin], store: MemoryStore, wall: FakeClock, audit_dir: Path
) -> dict[str, list[Replica]]:
    """Each cluster's agent under its link; the first cluster has two replicas, one audit log."""
    replicas: dict[str, list[Replica]] = {}
    registry = builtin_registry()
    for name, twin in twins.items():
        replicas[name] = []
        path = audit_dir / f"{name}.audit.jsonl"  # shared by the cluster's replicas
        for k in range(2 if name == KILLED else 1):
            audit = AuditLog(path=path)
            settings = LinkSettings(PREFIX, name, f"{name}-{k}", site.safe_w[name], LEADER_TTL_S,
                                    rise_delay_s=INTERVAL_S)  # fmt: skip
            link = SiteLink(store, settings, wall=wall, mono=wall)
            # A takeover reads what the other replica did back from the shared audit log.
            loop = twin_agent(
                twin, POLICIES, registry=registry, settings=SETTINGS, audit=audit, site=link
            ).loop
            replicas[name].append(Replica(f"{name}-{k}", loop, link, audit))
    return replicas


def _alive(replicas: dict[str, list[Replica]]) -> list[Replica]:
    return [r for group in replicas.values() for r in group if r.alive]


def run_coordinated(site: Site, audit_dir: Path) -> dict[str, Any]:
    wall = FakeClock(WALL_START)
    store = MemoryStore(wall)
    plan = SitePlan(
        name="bench", prefix=PREFIX, tree=site.tree,
        clusters={n: ClusterPlan(site.safe_w[n]) for n in site.specs},
        interval_s=INTERVAL_S, grant_lease_s=4 * INTERVAL_S, clock_skew_s=0.0,
        lead_s=2 * INTERVAL_S, ramp_w_per_s=site.ramp_w_per_s, leader_ttl_s=2 * LEADER_TTL_S,
    )  # fmt: skip
    coordinator = Coordinator(store, plan, wall=wall, mono=wall, member="coordinator",
                              events=lambda: [site.event])  # fmt: skip
    twins = {n: Twin(s) for n, s in site.specs.items()}
    replicas = _replicas(site, twins, store, wall, audit_dir)
    meter = Meter(site)
    killed_at: float | None = None
    failover_s: float | None = None
    unfit = 0
    t = 0.0
    while t < site.duration_s - 1e-9:
        store.tick()
        if killed_at is None and t >= site.kill_at_s:
            for r in replicas[KILLED]:
                r.alive = r.alive and not r.link.elector.is_leader  # SIGKILL: no resignation
            killed_at = t
        if t % (LEADER_TTL_S / 3.0) < 1e-9:  # the links' threads
            for r in _alive(replicas):
                r.link.step()
        if t % INTERVAL_S < 1e-9:
            report = coordinator.step()
            unfit += int(report is not None and not report.fits)
            for r in _alive(replicas):
                r.link.step()
                r.loop.cycle()
            acted = any(r.loop.read_through_s == t for r in replicas[KILLED] if r.alive)
            if killed_at is not None and failover_s is None and acted:
                failover_s = t - killed_at
        for twin in twins.values():
            twin.step(1.0)
        meter.step(t, twins, 1.0)
        t += 1.0
        wall.advance(1.0)
    for r in (r for group in replicas.values() for r in group):
        r.audit.close()
    work = sum(tw.work_done_gpu_s for tw in twins.values())
    return {"work": work, "meter": meter, "failover_s": failover_s, "unfit_rounds": unfit}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="JSON lines (the only output format)")
    parser.add_argument("--duration", type=float, default=3600.0, help="twin seconds")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--drop", type=float, default=0.7, help="the event's share of the limit")
    parser.add_argument(
        "--limit", type=float, default=0.85, help="the site's limit, a share of expected demand"
    )
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    site = build_site(args.seed, args.duration, args.drop, args.limit)
    t0 = time.perf_counter()
    oracle = run_oracle(site)
    static = run_static(site)
    under_truth = run_static(site, by_truth=True)
    with tempfile.TemporaryDirectory() as tmp:
        coordinated = run_coordinated(site, Path(tmp))
    common = {
        "seed": args.seed,
        "duration_s": args.duration,
        "gpus": {n: s.n_gpus for n, s in site.specs.items()},
        "limits_w": {
            n: node.limit_w for n, node in site.tree.nodes.items() if math.isfinite(node.limit_w)
        },
        "event": {"target_w": site.event.target_w, "start_s": site.event.start_unix - WALL_START,
                  "duration_s": site.event.duration_s, "ramp_w_per_s": round(site.ramp_w_per_s, 1)},
    }  # fmt: skip
    runs = (
        ("oracle", oracle),
        ("static", static),
        ("agents_under_oracle_split", under_truth),
        ("coordinated", coordinated),
    )
    for name, result in runs:
        meter: Meter = result["meter"]
        row: dict[str, Any] = {
            "controller": name,
            **common,
            "throughput_vs_oracle": round(result["work"] / oracle["work"], 4),
            "above_limit_s": {n: meter.above_s.get(n, 0.0) for n in ("site", "feed-a")},
            "peak_over_w": {n: round(w, 1) for n, w in meter.peak_over_w.items()},
        }
        if name == "coordinated":
            row["vs_static"] = round(result["work"] / static["work"], 4)
            row["failover_s"] = result["failover_s"]
            row["interval_s"] = INTERVAL_S
            row["leader_ttl_s"] = LEADER_TTL_S
            row["rounds_that_did_not_fit"] = result["unfit_rounds"]
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        sys.stdout.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
