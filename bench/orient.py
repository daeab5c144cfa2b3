"""Orient's figures: detection quality per twin fault kind, forecast skill per horizon, and the
cost of one orient cycle at scale. One JSON line per figure (`--json`), e.g.

    {"fault": "fan", "precision": 1.0, "recall": 0.95, "median_delay_cycles": 1.0, ...}
    {"horizon_min": 5, "mase": 0.96, "series": "node_power", ...}
    {"gpus": 100000, "orient_s": 0.41, "peak_rss_mb": 1234.5, ...}

Detection: twin runs (64 H100 GPUs, the demo's budget with its demand-response drop, the agent's
power_budget policy moving caps all along) with faults of every kind at random GPUs and times;
scored by agent/sim/groundtruth.py (episodes, true when they start while a fault of that kind is
active on their target). Forecasts: MASE = the forecast's mean absolute error over persistence's
(the value now) at the same horizon, on the same points, for every node's power and the fleet's,
after a warm-up; the mean over `--forecast-seeds` runs, each run's own, and `exact_now_mase`: the
twin's exact draw now (without its sampling noise) held as the forecast, i.e. what knowing the
present perfectly and nothing of the future scores (job arrivals and ends, which no telemetry
foresees, are most of the change at 15 minutes). Scale: orient alone on synthetic snapshots
(each a fresh draw of realistic values) for 10,000 and 100,000 GPUs, after a few warm-up cycles;
peak RSS of a fresh process.

    python bench/orient.py --json                 # everything (minutes)
    python bench/orient.py --json --only detect --seeds 3
    python bench/orient.py --json --only detect --phases normal-day   # faults among the phases

`--phases normal-day` plays the twin's normal-but-surprising phases (agent/sim/phases.py:
checkpoint stalls, evaluations, loader stalls, warm-ups, inference services, flat-lined readings,
exporter restarts) under the faults; the budget stays sized on the twin without them.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np
import structlog

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

KINDS = ("xid", "ecc", "fan", "straggler", "spike", "dropout")


def emit(obj: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj), flush=True)
    else:
        print("  ".join(f"{k}={v}" for k, v in obj.items()), flush=True)


def detection_run(
    seed: int, hours: float, per_kind: int, phases: str = "none"
) -> tuple[Any, Any, int]:
    from agent.act.audit import AuditLog
    from agent.assembly import twin_agent
    from agent.demo import DemoOptions, demo_spec
    from agent.sim.faults import FaultKind
    from agent.sim.groundtruth import Recorder, random_faults
    from agent.sim.phases import preset
    from agent.sim.twin import Twin
    from policies.registry import builtin_registry

    duration = hours * 3600.0
    opts = DemoOptions(seed=seed, duration_s=duration)
    rng = np.random.default_rng(1000 + seed)
    spec = demo_spec(opts)
    faults = random_faults(
        rng,
        [FaultKind(k) for k in KINDS],
        per_kind,
        spec.nodes,
        spec.gpus_per_node,
        start_s=(1200.0, duration - 900.0),
        duration_s=600.0,
    )
    spec = replace(spec, faults=faults, phases=preset(phases))
    twin = Twin(spec)
    loop = twin_agent(
        twin, ("power_budget",), registry=builtin_registry(), audit=AuditLog(path=None)
    ).loop
    rec = Recorder()
    next_cycle = 0.0
    while twin.t_s < duration - 1e-9:
        if twin.t_s >= next_cycle - 1e-9:
            report = loop.cycle()
            rec.record(report.situation, twin)
            next_cycle += opts.interval_s
        twin.step(min(twin.spec.step_s, next_cycle - twin.t_s, duration - twin.t_s))
    return rec, faults, spec.gpus_per_node


def bench_detection(
    seeds: int, hours: float, per_kind: int, as_json: bool, phases: str = "none"
) -> None:
    from agent.sim.faults import FaultKind
    from agent.sim.groundtruth import merge, score

    per: dict[str, list[Any]] = {k: [] for k in KINDS}
    for seed in range(seeds):
        rec, faults, gpn = detection_run(seed, hours, per_kind, phases)
        for k in KINDS:
            per[k].append(score(rec, faults, FaultKind(k), gpn))
    for k in KINDS:
        merged = merge(per[k])
        emit({**merged.as_dict(), "runs": seeds, "twin_hours": hours, "phases": phases}, as_json)


def forecast_run(seed: int, hours: float, budget: bool) -> dict[str, Any]:
    from agent.act.audit import AuditLog
    from agent.assembly import twin_agent
    from agent.core.snapshot import Metric
    from agent.demo import DemoOptions, demo_spec
    from agent.sim.twin import Twin
    from policies.registry import builtin_registry

    duration = hours * 3600.0
    opts = DemoOptions(seed=seed, duration_s=duration)
    spec = demo_spec(opts)
    if not budget:
        spec = replace(spec, budget=None)
    twin = Twin(spec)
    loop = twin_agent(
        twin, ("power_budget",), registry=builtin_registry(), audit=AuditLog(path=None)
    ).loop
    node_act, node_fc, fleet_act, fleet_fc, fleet_lo, fleet_hi = [], [], [], [], [], []
    node_exact, fleet_exact = [], []
    horizons: tuple[float, ...] = ()
    next_cycle = 0.0
    while twin.t_s < duration - 1e-9:
        if twin.t_s >= next_cycle - 1e-9:
            report = loop.cycle()
            f = report.situation.forecast
            snap = report.snapshot
            power, ok = snap.column(Metric.POWER_W)
            node_act.append(
                np.bincount(snap.node, np.where(ok, power, 0.0), minlength=snap.n_nodes)
            )
            assert f is not None and f.node_w is not None
            horizons = f.horizons_s
            node_fc.append(f.node_w.copy())
            fleet_act.append(report.situation.fleet_power_w)
            # The twin's nodes in its own order, as the twin's snapshot keeps them.
            exact = np.bincount(twin.node_of, twin.noise_free_power_w, minlength=snap.n_nodes)
            node_exact.append(exact)
            overhead_w = report.situation.fleet_power_w - float(power[ok].sum())
            fleet_exact.append(overhead_w + float(exact.sum()))
            fleet_fc.append(f.fleet_w.copy())
            fleet_lo.append(f.fleet_lo_w.copy())
            fleet_hi.append(f.fleet_hi_w.copy())
            next_cycle += opts.interval_s
        twin.step(min(twin.spec.step_s, next_cycle - twin.t_s, duration - twin.t_s))
    return {
        "node_act": np.asarray(node_act),
        "node_fc": np.asarray(node_fc),
        "fleet_act": np.asarray(fleet_act),
        "fleet_fc": np.asarray(fleet_fc),
        "fleet_lo": np.asarray(fleet_lo),
        "fleet_hi": np.asarray(fleet_hi),
        "node_exact": np.asarray(node_exact),
        "fleet_exact": np.asarray(fleet_exact),
        "horizons_s": horizons,
        "interval_s": opts.interval_s,
    }


def _mase(pred: np.ndarray, actual: np.ndarray, t: np.ndarray, h: int) -> float:
    """The forecast's absolute error over persistence's, `h` steps ahead of the steps `t`."""
    return float(np.abs(pred - actual[t + h]).sum() / np.abs(actual[t] - actual[t + h]).sum())


def mase(data: dict[str, Any], warmup_frac: float) -> list[dict[str, Any]]:
    out = []
    act, fc = data["node_act"], data["node_fc"]
    fa, ff = data["fleet_act"], data["fleet_fc"]
    first = int(len(act) * warmup_frac)
    for i, h_s in enumerate(data["horizons_s"]):
        h = round(h_s / data["interval_s"])
        t = np.arange(first, len(act) - h)
        node = _mase(fc[t, :, i], act, t, h)
        fleet = _mase(ff[t, i], fa, t, h)
        inside = (fa[t + h] >= data["fleet_lo"][t, i]) & (fa[t + h] <= data["fleet_hi"][t, i])
        exact_node = _mase(data["node_exact"][t], act, t, h)
        exact_fleet = _mase(data["fleet_exact"][t], fa, t, h)
        out.append(
            {
                "horizon_min": h_s / 60.0,
                "node_mase": float(node),
                "fleet_mase": float(fleet),
                "fleet_coverage": float(inside.mean()),
                "node_exact_now_mase": float(exact_node),
                "fleet_exact_now_mase": float(exact_fleet),
                "points": int(t.size),
            }
        )
    return out


def bench_forecast(hours: float, seeds: int, as_json: bool) -> None:
    for budget in (False, True):
        rows: list[list[dict[str, Any]]] = [
            mase(forecast_run(100 + seed, hours, budget), 0.5) for seed in range(seeds)
        ]
        scenario = "budget" if budget else "uncapped"
        for i in range(len(rows[0])):
            for series in ("node", "fleet"):
                values = [r[i][f"{series}_mase"] for r in rows]
                line = {
                    "horizon_min": rows[0][i]["horizon_min"],
                    "mase": round(float(np.mean(values)), 4),
                    "series": f"{series}_power",
                    "scenario": scenario,
                    "twin_hours": hours,
                    "evaluated_hours": hours / 2,
                    "runs": seeds,
                    "mase_per_run": [round(v, 4) for v in values],
                    # The twin's exact draw now (no sampling noise), held: what knowing the
                    # present perfectly, and nothing of the future, scores.
                    "exact_now_mase": round(
                        float(np.mean([r[i][f"{series}_exact_now_mase"] for r in rows])), 4
                    ),
                }
                if series == "fleet":
                    line["interval_coverage"] = round(
                        float(np.mean([r[i]["fleet_coverage"] for r in rows])), 3
                    )
                emit(line, as_json)


def scale_child(n_gpus: int, cycles: int) -> dict[str, Any]:
    """Orient on synthetic snapshots of n GPUs (run in a fresh process for a clean RSS)."""
    from agent.core.snapshot import Metric, build_snapshot
    from agent.orient.orienter import Orienter

    rng = np.random.default_rng(0)
    gpn = 8
    nodes = np.repeat([f"node{k}" for k in range(n_gpus // gpn)], gpn)
    uuid = [f"GPU-{i:08d}" for i in range(n_gpus)]
    job = np.repeat([str(1000 + j) for j in range(n_gpus // 4)], 4)
    idle = rng.random(n_gpus) < 0.15
    job = np.where(idle, "", job)
    natural = rng.uniform(300, 680, n_gpus // 4).repeat(4)
    cap = np.where(rng.random(n_gpus) < 0.5, 700.0, rng.uniform(300, 700, n_gpus))
    orienter = Orienter()
    times = []
    for c in range(cycles):
        noise = 1 + 0.02 * rng.standard_normal(n_gpus)
        power = np.where(idle, 75 * noise, np.minimum(natural, 0.95 * cap) * noise)
        snap = build_snapshot(
            time_s=15.0 * c,
            node_of_gpu=nodes,
            gpu=np.tile(np.arange(gpn), n_gpus // gpn),
            uuid=uuid,
            model=["NVIDIA H100 80GB HBM3"] * n_gpus,
            job=job,
            values={
                Metric.POWER_W: power,
                Metric.POWER_LIMIT_W: cap,
                Metric.MAX_LIMIT_W: np.full(n_gpus, 700.0),
                Metric.MIN_LIMIT_W: np.full(n_gpus, 200.0),
                Metric.TEMP_C: 30 + 0.074 * power + rng.normal(0, 0.2, n_gpus),
                Metric.UTIL_PCT: np.where(idle, 0.0, 97.0 + rng.normal(0, 1, n_gpus)),
                Metric.SM_CLOCK_MHZ: np.where(idle, 345.0, 1900.0 + rng.normal(0, 5, n_gpus)),
                Metric.XID: np.zeros(n_gpus),
                Metric.ECC_DBE_TOTAL: np.zeros(n_gpus),
                Metric.ROW_REMAP_FAILURE: np.zeros(n_gpus),
                Metric.REMAPPED_ROWS_UNCORRECTABLE: np.zeros(n_gpus),
            },
            age_s=np.zeros(n_gpus),
            stale=np.zeros(n_gpus, dtype=bool),
        )
        t0 = time.perf_counter()
        orienter.orient(snap, 1e9)
        times.append(time.perf_counter() - t0)
    steady = np.asarray(times[3:])
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "gpus": n_gpus,
        "orient_s": round(float(np.median(steady)), 4),
        "orient_p90_s": round(float(np.quantile(steady, 0.9)), 4),
        "orient_max_s": round(float(steady.max()), 4),
        "cycles": cycles,
        "peak_rss_mb": round(peak_kb / 1024.0, 1),
    }


def bench_scale(sizes: list[int], cycles: int, as_json: bool) -> None:
    for n in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--scale-child", str(n), "--cycles", str(cycles)],
            capture_output=True,
            text=True,
            check=True,
        )
        emit(json.loads(out.stdout.strip().splitlines()[-1]), as_json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--only", choices=["detect", "forecast", "scale"], action="append")
    parser.add_argument("--seeds", type=int, default=3, help="twin runs per figure")
    parser.add_argument("--hours", type=float, default=2.0, help="twin hours per detection run")
    parser.add_argument("--per-kind", type=int, default=4, help="faults of each kind per run")
    parser.add_argument(
        "--phases",
        choices=["none", "normal-day"],
        default="none",
        help="the twin's normal-but-surprising phases under the faults (detection)",
    )
    parser.add_argument("--forecast-hours", type=float, default=12.0)
    parser.add_argument("--forecast-seeds", type=int, default=1)
    parser.add_argument(
        "--cycles", type=int, default=45, help="orient cycles per size (refits included)"
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--scale-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scale_child:
        print(json.dumps(scale_child(args.scale_child, args.cycles)))
        return
    only = set(args.only or ["detect", "forecast", "scale"])
    if "detect" in only:
        bench_detection(args.seeds, args.hours, args.per_kind, args.json, args.phases)
    if "forecast" in only:
        bench_forecast(args.forecast_hours, args.forecast_seeds, args.json)
    if "scale" in only:
        bench_scale(args.sizes, args.cycles, args.json)


if __name__ == "__main__":
    main()
