"""`ooda once`: exactly one cycle against the configured source, printed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from agent.cli._common import emit_json, wrapped

if TYPE_CHECKING:
    from agent.loop import CycleReport


def once(
    config: Annotated[
        Path | None, typer.Option("--config", help="Configuration file (TOML).")
    ] = None,
    prometheus: Annotated[
        str | None,
        typer.Option(
            "--prometheus",
            help="Observe this Prometheus (base URL); without --config: built-in defaults, "
            "every built-in policy, advise only.",
        ),
    ] = None,
    budget_w: Annotated[
        float | None,
        typer.Option("--budget-w", min=0.001, help="Power budget (W); overrides the config."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Advise only: record what would be done, whatever the file says (also for "
            "each policy).",
        ),
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object on the last line.")
    ] = False,
) -> None:
    """Run exactly one observe-orient-decide-guard-act cycle and print what it saw and decided.

    Exit code 1 when the source could not be read at all (the outage is printed too).

    Examples:

      ooda once --prometheus http://127.0.0.1:9090 --budget-w 30000 --dry-run

      ooda once --config /etc/ooda/agent.toml --json
    """
    from agent.assembly import assemble
    from agent.config import adapters_of, force_dry_run, load_config, with_prometheus
    from agent.core.errors import BadInputError

    if config is None and prometheus is None:
        raise BadInputError("ooda once: give --config FILE or --prometheus URL (or both)")
    if prometheus is not None and not prometheus.startswith(("http://", "https://")):
        raise BadInputError(f"--prometheus: not an http(s) URL: {prometheus!r}")
    cfg = None if config is None else load_config(config, needs_source=prometheus is None)
    if prometheus is not None:
        where = "--prometheus" if config is None else f"config {config} with --prometheus"
        cfg = with_prometheus(cfg, prometheus, where)
    assert cfg is not None  # one of the two is given
    if dry_run:
        cfg = force_dry_run(cfg)  # each policy's own dry_run too, as `ooda run --dry-run`
    agent = assemble(cfg, budget_w=budget_w)
    try:
        report = agent.cycle()
    finally:
        agent.close()
    kind = adapters_of(cfg).source(cfg.source.kind)
    source = kind.where(getattr(cfg.source, kind.name, None), report.snapshot.node_names.tolist())
    result = summarize(report, source=source, dry_run=cfg.dry_run)
    if json_out:
        emit_json(result)
    else:
        typer.echo(render(result))
    if result["outage"]:
        raise typer.Exit(1)


def _num(value: float, digits: int = 1) -> float | None:
    return round(float(value), digits) if math.isfinite(value) else None


def summarize(report: CycleReport, *, source: str, dry_run: bool) -> dict[str, Any]:
    """The cycle as JSON-ready data (None for what is missing)."""
    import numpy as np

    from agent.core.snapshot import Metric

    snap = report.snapshot
    power, _ = snap.column(Metric.POWER_W)
    limit, _ = snap.column(Metric.POWER_LIMIT_W)
    temp, _ = snap.column(Metric.TEMP_C)
    util, _ = snap.column(Metric.UTIL_PCT)
    usable = snap.usable(Metric.POWER_W)
    nodes = snap.node_of()
    tput = report.situation.throughput
    per_gpu = [
        {
            "node": str(nodes[i]),
            "gpu": int(snap.gpu[i]),
            "uuid": str(snap.uuid[i]),
            "job": str(snap.job[i]) or None,
            "power_w": _num(power[i], 3),
            "power_limit_w": _num(limit[i], 3),
            "temp_c": _num(temp[i]),
            "util": _num(util[i]),
            "stale": bool(snap.stale[i]),
            "age_s": _num(snap.age_s[i], 3),
            **(_throughput_of(tput, i) if tput is not None else {}),
        }
        for i in range(snap.n_gpus)
    ]
    intents = [record for intent in report.intents for record in intent.to_records()]
    missing_fields = {  # of the fields the source reads (the loop leaves some out)
        str(metric): int((snap.fresh & ~snap.column(metric)[1]).sum()) for metric in snap.values
    }
    outage = snap.n_gpus == 0 and bool(report.errors)
    return {
        "source": source,
        "time_s": report.time_s,
        "dry_run": dry_run,
        "outage": outage,
        "gpus": snap.n_gpus,
        "nodes": snap.n_nodes,
        "stale": int(snap.stale.sum()),
        "missing": int((snap.fresh & ~usable).sum()),
        "missing_fields": {k: v for k, v in missing_fields.items() if v},
        "fleet_power_w": round(float(np.sum(power[usable])), 1),
        "budget_w": report.situation.budget_w,
        "intents": intents,
        "refused": [
            {"kind": str(r.intent.kind), "target": r.intent.target_name(), "reason": r.reason}
            for r in report.refused
        ],
        "actions": {
            str(outcome): n
            for outcome, n in report.summary()["actions"].items()
            if n  # only what happened
        },
        "errors": list(report.errors),
        "stage_s": {k: round(v, 4) for k, v in report.stage_s.items()},
        # Per job: whose throughput the agent goes by (an application's own, or sm_clock).
        "throughput_by_job": tput.by_job(snap.job) if tput is not None else {},
        "per_gpu": per_gpu,
    }


def _throughput_of(tput: Any, i: int) -> dict[str, Any]:
    """One GPU's throughput in use: its source, its share now and its unit."""
    return {
        "throughput_source": str(tput.kind[i]) or None,
        "throughput": _num(tput.rate_per_s[i], 4),
        "throughput_unit": str(tput.unit[i]) or None,
        "ttft_p90_s": _num(tput.ttft_p90_s[i], 4),
        "tpot_p90_s": _num(tput.tpot_p90_s[i], 5),
    }


def _why_nothing(r: dict[str, Any]) -> str:
    """Why a cycle decided nothing, as far as its summary tells."""
    if r["outage"]:
        return "nothing seen"
    if r["budget_w"] is None:
        return (
            "no budget: power_budget needs cluster.budget_w, cluster.budget_query or --budget-w; "
            "no other policy found anything to act on"
        )
    if r["fleet_power_w"] <= r["budget_w"]:
        return (
            f"the fleet draws {r['fleet_power_w']:.0f} W of its {r['budget_w']:.0f} W budget, "
            "and no policy found anything to act on"
        )
    return "no policy proposed an action (see the errors and refusals below)"


def render(r: dict[str, Any]) -> str:
    mode = "dry-run (advisory)" if r["dry_run"] else "live"
    lines = [f"ooda once: {r['source']}, {mode}"]
    if r["outage"]:
        lines.append("OUTAGE: no GPUs seen; nothing is proposed for what cannot be seen")
    budget = "none" if r["budget_w"] is None else f"{r['budget_w']:.0f} W"
    lines += [
        f"seen:     {r['gpus']} GPUs on {r['nodes']} nodes, {r['stale']} stale, "
        f"{r['missing']} fresh without a power reading",
        f"power:    {r['fleet_power_w']:.0f} W (fresh GPUs)   budget: {budget}",
    ]
    by_job = r.get("throughput_by_job") or {}
    if by_job:
        kinds: dict[str, int] = {}
        for kind in by_job.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        lines.append("throughput: " + ", ".join(f"{k} {v} jobs" for k, v in sorted(kinds.items())))
    if r["missing_fields"]:
        fields = ", ".join(f"{k} ({v})" for k, v in sorted(r["missing_fields"].items()))
        lines.append(f"missing:  {fields}")
    stale = [g for g in r["per_gpu"] if g["stale"]]
    if stale:
        ages = [g["age_s"] for g in stale if g["age_s"] is not None]
        span = f"{min(ages):.0f}-{max(ages):.0f}" if ages and max(ages) - min(ages) >= 1 else ""
        age = f", newest sample {span or f'{max(ages):.0f}'} s old" if ages else ""
        names = ", ".join(f"{g['node']}/gpu{g['gpu']}" for g in stale[:8])
        more = f" and {len(stale) - 8} more" if len(stale) > 8 else ""
        lines.append(wrapped(f"stale:    {names}{more}{age}", " " * 10))
    if r["intents"]:
        lines.append(f"decided:  {len(r['intents'])} intents")
        for rec in r["intents"][:20]:
            extra = f" {rec['watts']:.0f} W" if "watts" in rec else ""
            why = f"{rec['policy']}: {rec['reason']}"
            lines.append(wrapped(f"  {rec['kind']} {rec['target']}{extra}  ({why})", " " * 4))
        if len(r["intents"]) > 20:
            lines.append(f"  ... and {len(r['intents']) - 20} more (--json for all)")
    else:
        lines.append(f"decided:  nothing ({_why_nothing(r)})")
    for refusal in r["refused"][:10]:
        refused = f"refused:  {refusal['kind']} {refusal['target']}: {refusal['reason']}"
        lines.append(wrapped(refused, " " * 10))
    if r["actions"]:
        lines.append("actions:  " + ", ".join(f"{k} {v}" for k, v in r["actions"].items()))
    lines += [wrapped(f"error:    {error}", " " * 10) for error in r["errors"]]
    return "\n".join(lines)
