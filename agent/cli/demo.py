"""`ooda demo`: the main job on the built-in twin."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.cli._common import duration_s, emit_json, progress_bar, show_progress
from agent.core.errors import BadInputError
from agent.sim.faults import parse_fault


def demo(
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same run.")] = 7,
    duration: Annotated[str, typer.Option(help="Twin time to run, e.g. 2h, 90m, 3600.")] = "2h",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Advise only: record, change nothing.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object on the last line.")
    ] = False,
    nodes: Annotated[int, typer.Option(min=1, max=2000, help="Nodes in the twin.")] = 8,
    gpus_per_node: Annotated[int, typer.Option(min=1, max=16, help="GPUs per node.")] = 8,
    model: Annotated[
        str, typer.Option(help="GPU model: H100, A100, H200, B200, GB200, A100-PCIe or L40S.")
    ] = "H100",
    interval: Annotated[str, typer.Option(help="Control interval (twin time).")] = "15s",
    fault: Annotated[
        list[str] | None, typer.Option(help="Inject a fault, e.g. xid=79:node2/gpu1@60.")
    ] = None,
    audit_log: Annotated[
        Path | None, typer.Option(help="Write the audit trail (JSON lines) here.")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="The agent's configuration: its policies and their settings, the guard, "
            "orient, groups, job priorities and the rollout (its source and actuators are the "
            "twin; its [twin] section is not used)."
        ),
    ] = None,
    scenario: Annotated[
        Path | None,
        typer.Option(
            help="Scenario file (TOML): your cluster as the twin plays it (its GPUs, job mix, "
            "workloads, budget; `ooda sim calibrate` writes one from a trace). Its settings win "
            "over --nodes, --gpus-per-node and --model."
        ),
    ] = None,
    curves: Annotated[
        Path | None,
        typer.Option(
            help="Measured power curves (CSV): the twin's jobs run these workloads, the oracle "
            "takes them as the truth (docs/twin.md)."
        ),
    ] = None,
) -> None:
    """Run the twin and the agent together on a virtual clock and summarize.

    The twin's facility budget sits a little under demand and drops for a demand-response event in
    the middle of the run; the agent keeps the fleet under it. The same seed is also run uncapped
    and under the oracle (the best allocation given the twin's true curves) for comparison.

    Examples:

      ooda demo

      ooda demo --seed 7 --duration 2h --json

      ooda demo --dry-run --audit-log demo-audit.jsonl

      ooda demo --config deploy/examples/twin.toml

      ooda demo --scenario examples/scenarios/measured-curves.toml

      ooda demo --curves examples/curves/zeus-v100-normalized.csv --duration 1h
    """
    from agent.config import load_config
    from agent.core.gpu_models import BUILTIN_MODELS
    from agent.demo import DemoOptions, run_demo

    if model not in BUILTIN_MODELS:
        raise BadInputError(
            f"--model: unknown GPU model {model!r} (known: {', '.join(sorted(BUILTIN_MODELS))})"
        )
    opts = DemoOptions(
        seed=seed,
        duration_s=duration_s(duration, "--duration"),
        interval_s=duration_s(interval, "--interval"),
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        model=model,
        dry_run=dry_run,
        faults=tuple(parse_fault(f) for f in fault or []),
        audit_path=audit_log,
        scenario=scenario,
        curves=curves,
    )
    if config is not None:
        cfg = load_config(config, needs_source=False, check_files=False)
        policies = tuple(name for name, s in cfg.policy_settings.items() if s.enabled)
        opts = replace(opts, config=cfg, policies=policies)
    from agent.demo import DEMO_RUNS

    total = DEMO_RUNS * opts.duration_s
    with progress_bar(show_progress(json_out), total, "ooda demo") as bar:

        def told(stage: str, seconds: float) -> None:
            bar.stage(f"ooda demo: {stage}")
            bar(seconds)

        result = run_demo(opts, progress=told)
    if json_out:
        emit_json(result)
    else:
        typer.echo(render_summary(result))


def _tokens_line(r: dict[str, Any], unc: dict[str, Any], ora: dict[str, Any]) -> str:
    """The inference services' tokens per joule, or plainly unknown where the twin has none."""
    if r.get("tokens_per_joule") is None:
        return "unknown (no inference services in this twin: a scenario's inference_share)"
    return (
        f"{r['tokens_per_joule']:.3f}  (uncapped {unc['tokens_per_joule']:.3f}, "
        f"oracle {ora['tokens_per_joule']:.3f})"
    )


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _budget_line(b: dict[str, Any]) -> str:
    if "drop" in b:
        return (
            f"{b['normal']:.0f} W, dropping to {b['drop']:.0f} W from "
            f"{_hms(b['drop_start_s'])} to {_hms(b['drop_end_s'])} (demand response)"
        )
    steps = ", ".join(f"{w:.0f} W from {_hms(t)}" for t, w in b["steps"][1:])
    return f"{b['normal']:.0f} W" + (f", then {steps}" if steps else " (the scenario's)")


def render_summary(r: dict[str, Any]) -> str:
    """The summary a person reads: every line within 100 columns."""
    b, unc, ora = r["budget_w"], r["uncapped"], r["oracle"]
    acts = ", ".join(f"{k} {v}" for k, v in r["actions"].items() if v) or "none"
    mode = "dry-run" if r["dry_run"] else "live"
    if r["dry_run"]:  # nothing applied: the fleet ran uncapped, so no ratio to the bound
        throughput = (
            f"{r['throughput_vs_uncapped']:.3f} of uncapped (nothing applied; the oracle: "
            f"{ora['throughput_vs_uncapped']:.3f} of uncapped)"
        )
    else:
        throughput = (
            f"{r['throughput_vs_uncapped']:.3f} of uncapped, "
            f"{r['throughput_vs_oracle']:.3f} of the oracle"
        )
    lines = [
        f"ooda demo: {r['gpus']} {r['model']} GPUs ({r['nodes']} nodes), "
        f"{_hms(r['duration_s'])} of twin time, seed {r['seed']}, {mode}, "
        f"a cycle every {r['interval_s']:g} s",
        f"budget:               {_budget_line(b)}",
        f"seconds above budget: {r['budget_violation_s']:.0f}  (uncapped "
        f"{unc['budget_violation_s']:.0f}, oracle {ora['budget_violation_s']:.0f})",
        f"throughput:           {throughput}",
        f"energy:               {r['energy_kwh']:.1f} kWh  (uncapped {unc['energy_kwh']:.1f} kWh)",
        f"tokens per joule:     {_tokens_line(r, unc, ora)}",
        f"actions applied:      {acts}",
    ]
    if r.get("scenario") or r.get("job_mix"):
        mix = f", job mix {r['job_mix']}" if r.get("job_mix") else ""
        lines.insert(1, f"cluster:              {r.get('scenario') or 'built-in'}{mix}")
    if r["dry_run"]:
        lines.append(f"recommendations:      {len(r['recommendations'])} recorded, none applied")
    if r.get("audit_log"):
        lines.append(f"audit log:            {r['audit_log']}")
    lines += [
        "oracle: the best caps given the twin's true curves, held to the same budget and margin;",
        "seconds above budget leave out the first interval after each change of the budget",
        f"({r['cycles']} cycles in {r['wall_s']:.1f} s of wall time)",
    ]
    return "\n".join(lines)
