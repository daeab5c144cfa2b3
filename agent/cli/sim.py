"""`ooda sim serve` and `ooda sim record`: the twin as a cluster's exporters, or as a trace."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from agent.cli._common import duration_s, emit_json, progress_bar, show_progress
from agent.core.errors import BadInputError

if TYPE_CHECKING:
    from agent.sim.twin import TwinSpec

sim_app = typer.Typer(help="The digital twin: serve it like a cluster, or record it.")

NodesOpt = Annotated[int, typer.Option(min=1, max=20000, help="Nodes (named node1..nodeN).")]
GpusOpt = Annotated[int, typer.Option(min=1, max=16, help="GPUs per node.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed: the same seed gives the same twin.")]
ModelOpt = Annotated[
    str, typer.Option(help="GPU model: H100, A100, H200, B200, GB200, A100-PCIe or L40S.")
]
FaultOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Inject a fault (repeatable): KIND[=PARAM]:nodeK[/gpuI]@START[+DURATION], twin "
        "seconds, e.g. dropout:node2@30+60 or xid=79:node2/gpu1@60."
    ),
]
ScenarioOpt = Annotated[
    Path | None,
    typer.Option(help="Scenario file (TOML): its twin settings win over the options."),
]
CurvesOpt = Annotated[
    Path | None,
    typer.Option(
        help="Measured power curves (CSV: workload, gpu_model, power_limit_w, throughput, "
        "power_w): the twin's jobs run these workloads (the GPU model's rows; docs/twin.md)."
    ),
]
CountersOpt = Annotated[
    str,
    typer.Option(
        help="'all': also the power-limit and ECC fields; 'default': only dcgm-exporter's "
        "default counters (no power limits, as out of the box)."
    ),
]


def _spec(
    nodes: int,
    gpus_per_node: int,
    seed: int,
    model: str,
    fault: list[str] | None,
    scenario: Path | None,
    curves: Path | None = None,
) -> TwinSpec:
    from dataclasses import replace

    from agent.core.gpu_models import BUILTIN_MODELS
    from agent.sim.faults import parse_fault
    from agent.sim.scenario import load_scenario, with_curves
    from agent.sim.twin import TwinSpec

    if model not in BUILTIN_MODELS:
        raise BadInputError(
            f"--model: unknown GPU model {model!r} (known: {', '.join(sorted(BUILTIN_MODELS))})"
        )
    try:
        base = TwinSpec(
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            seed=seed,
            model=BUILTIN_MODELS[model],
            faults=tuple(parse_fault(f) for f in fault or []),
        )
    except ValueError as exc:
        raise BadInputError(f"--fault: {exc}") from None
    spec = load_scenario(scenario, base) if scenario is not None else base
    return replace(spec, **with_curves(spec, curves)) if curves is not None else spec


def _policies(policy: list[str] | None, config: Path | None) -> tuple[list[str], Any, Any]:
    """The policies to run live while recording, their settings and the guard's."""
    if not policy:
        if config is not None:
            raise BadInputError("--config: only used with --policy")
        return [], None, None
    from agent.config import default_config, load_config
    from policies.registry import default_registry

    registry = default_registry()
    cfg = (
        load_config(config, needs_source=False, check_files=False)
        if config is not None
        else default_config(registry)
    )
    unknown = [p for p in policy if p not in registry]
    if unknown:
        raise BadInputError(
            f"--policy: unknown policy {unknown[0]!r} (known: {', '.join(registry.names())})"
        )
    settings = {p: cfg.policy_settings.get(p) or registry.get(p).Settings() for p in policy}
    return list(policy), settings, cfg.guard


def _counters(value: str) -> Any:
    if value not in ("all", "default"):
        raise BadInputError(f"--counters: {value!r} is not 'all' or 'default'")
    return value


@sim_app.command("serve")
def serve(
    nodes: NodesOpt = 4,
    gpus_per_node: GpusOpt = 4,
    seed: SeedOpt = 0,
    model: ModelOpt = "H100",
    listen: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port_base: Annotated[
        int,
        typer.Option(
            min=0, max=65535, help="node k listens on port-base + k - 1 (0: free ports, printed)."
        ),
    ] = 19400,
    speed: Annotated[
        float, typer.Option(min=0, help="Twin seconds per real second (0: the twin stands still).")
    ] = 1.0,
    fault: FaultOpt = None,
    scenario: ScenarioOpt = None,
    curves: CurvesOpt = None,
    counters: CountersOpt = "all",
    print_scrape_config: Annotated[
        bool,
        typer.Option(
            "--print-scrape-config", help="Print a Prometheus scrape config for the targets, exit."
        ),
    ] = False,
    scrape_interval: Annotated[
        str, typer.Option(help="Scrape interval written into --print-scrape-config.")
    ] = "15s",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the endpoints as one JSON object when ready.")
    ] = False,
    node_token_file: Annotated[
        Path | None,
        typer.Option(help="Also host a node daemon per node (the cap API), with this token file."),
    ] = None,
    node_socket_dir: Annotated[
        Path | None, typer.Option(help="Node daemons on Unix sockets DIR/nodeK.sock.")
    ] = None,
    node_port_base: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Node daemons on 127.0.0.1:PORT+K-1 (0: free ports)."),
    ] = None,
    fallback_cap_w: Annotated[
        float | None, typer.Option(min=1, help="The node daemons' fallback cap (W).")
    ] = None,
) -> None:
    """Serve the twin like a real cluster: one dcgm-exporter-compatible /metrics endpoint per node.

    Runs until interrupted (Ctrl-C or SIGTERM). A `dropout` fault makes that node's endpoint stop
    answering for its duration.

    Examples:

      ooda sim serve --nodes 4 --gpus-per-node 4

      ooda sim serve --nodes 4 --print-scrape-config --scrape-interval 5s > prometheus.yml

      ooda sim serve --speed 10 --fault dropout:node2@300+120 --fault xid=79:node3/gpu1@600

      ooda sim serve --node-token-file token --node-socket-dir /run/ooda-sim   # + cap API

      ooda sim serve --curves examples/curves/zeus-v100-normalized.csv
    """
    from agent.sim.exporter import SimServer, scrape_config

    spec = _spec(nodes, gpus_per_node, seed, model, fault, scenario, curves)
    interval = duration_s(scrape_interval, "--scrape-interval")
    if print_scrape_config:
        if port_base == 0:
            raise BadInputError("--print-scrape-config needs a fixed --port-base (not 0)")
        targets = [f"{listen}:{port_base + k}" for k in range(spec.nodes)]
        sys.stdout.write(scrape_config(targets, "ooda-sim-dcgm", interval))
        return
    if port_base and port_base + spec.nodes - 1 > 65535:
        raise BadInputError(f"--port-base {port_base}: {spec.nodes} nodes need ports past 65535")
    node_api = _node_api(node_token_file, node_socket_dir, node_port_base, fallback_cap_w)
    server = SimServer(
        spec,
        listen=listen,
        port_base=port_base,
        speed=speed,
        counters=_counters(counters),
        node_api=node_api,
    )
    try:
        server.start()
    except OSError as exc:
        raise BadInputError(f"--port-base {port_base}: {exc.strerror}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    _announce(server, spec, speed, counters, json_out)
    sys.stdout.flush()
    try:
        while not stop.wait(0.2):
            pass
    finally:
        server.stop()


def _node_api(
    token_file: Path | None,
    socket_dir: Path | None,
    port_base: int | None,
    fallback_cap_w: float | None,
) -> Any:
    """The node daemons `ooda sim serve` hosts beside the exporters (None: none)."""
    from agent.sim.exporter import NodeApiOptions

    if token_file is None:
        if socket_dir is not None or port_base is not None:
            raise BadInputError("--node-socket-dir/--node-port-base need --node-token-file")
        return None
    if (socket_dir is None) == (port_base is None):
        raise BadInputError("--node-token-file: give --node-socket-dir or --node-port-base")
    if socket_dir is not None:
        socket_dir.mkdir(parents=True, exist_ok=True)
    return NodeApiOptions(token_file, socket_dir, port_base, fallback_cap_w)


def _announce(server: Any, spec: Any, speed: float, counters: str, json_out: bool) -> None:
    """What `ooda sim serve` serves: each node's exporter (and node API), once ready."""
    names = [str(n) for n in server.twin.node_names]
    endpoints = [
        {"name": name, "target": target, "url": f"http://{target}/metrics"}
        for name, target in zip(names, server.targets(), strict=True)
    ]
    info: dict[str, Any] = {
        "nodes": endpoints,
        "targets": server.targets(),
        "gpus": spec.n_gpus,
        "model": spec.model.model_name,
        "speed": speed,
        "faults": [str(f) for f in spec.faults],
        "node_api": server.node_api_endpoints(),
        "started_unix_s": time.time(),
    }
    if json_out:
        emit_json(info)
        return
    typer.echo(
        f"ooda sim serve: {spec.nodes} nodes x {spec.gpus_per_node} {spec.model.name} GPUs, "
        f"seed {spec.seed}, {speed:g}x real time, counters {counters} (Ctrl-C stops)"
    )
    api = server.node_api_endpoints()
    for node in endpoints:
        extra = f"   node API {api[node['name']]}" if node["name"] in api else ""
        typer.echo(f"  {node['name']:<8} {node['url']}{extra}")


@sim_app.command("record")
def record(
    output: Annotated[Path, typer.Option("-o", "--output", help="The trace file to write.")],
    nodes: NodesOpt = 8,
    gpus_per_node: GpusOpt = 8,
    seed: SeedOpt = 0,
    model: ModelOpt = "H100",
    duration: Annotated[str, typer.Option(help="Twin time to record, e.g. 24h, 90m.")] = "24h",
    step: Annotated[str, typer.Option(help="Time between recorded steps (twin time).")] = "15s",
    fault: FaultOpt = None,
    scenario: ScenarioOpt = None,
    curves: CurvesOpt = None,
    counters: CountersOpt = "all",
    policy: Annotated[
        list[str] | None,
        typer.Option(
            "--policy",
            help="Run this policy live in the loop while recording (repeatable): the agent acts "
            "on the twin every --interval, and the trace shows its caps.",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="With --policy: the policies' settings and the guard."),
    ] = None,
    interval: Annotated[
        str, typer.Option(help="With --policy: the agent's control interval (twin time).")
    ] = "15s",
    budget_w: Annotated[
        float | None,
        typer.Option(
            "--budget-w",
            min=1,
            help="A constant facility budget (W), stored in the trace (default: "
            f"{RECORD_BUDGET_FRAC:.0%} of what this twin draws uncapped, so that it binds).",
        ),
    ] = None,
    no_budget: Annotated[
        bool, typer.Option("--no-budget", help="Record no budget (replay then needs one).")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object on the last line.")
    ] = False,
) -> None:
    """Write a trace from the twin: what Prometheus would hold had it scraped the twin's exporters
    at every step, with the scenario (budget, faults, the policies that ran) in the metadata.

    Examples:

      ooda sim record --nodes 125 --duration 24h -o day-1000gpus.parquet

      ooda sim record --nodes 4 --duration 2h --fault dropout:node2@1800+300 -o t.parquet

      ooda sim record --nodes 16 --duration 2h --budget-w 40000 --policy power_budget -o q.parquet

      ooda sim record --scenario examples/scenarios/measured-curves.toml --duration 2h -o m.parquet
    """
    from dataclasses import replace

    from agent.replay.twin_trace import record_twin
    from agent.sim.twin import BudgetSchedule

    spec = _spec(nodes, gpus_per_node, seed, model, fault, scenario, curves)
    length_s, step_s = duration_s(duration, "--duration"), duration_s(step, "--step")
    if budget_w is not None and no_budget:
        raise BadInputError("--budget-w and --no-budget: give one or the other")
    names, settings, guard = _policies(policy, config)
    sizing = budget_w is None and not no_budget and spec.budget is None
    t0 = time.perf_counter()
    total = length_s * (2 if sizing else 1)
    with progress_bar(show_progress(json_out), total, "ooda sim record") as bar:
        if sizing:
            bar.stage("ooda sim record: sizing the budget (an uncapped run)")
            budget_w = _sized_budget_w(spec, length_s, step_s, bar)
        if budget_w is not None:
            spec = replace(spec, budget=BudgetSchedule.constant(budget_w))
        bar.stage(f"ooda sim record: {output.name}")
        summary = record_twin(
            spec,
            output,
            duration_s=length_s,
            step_s=step_s,
            counters=_counters(counters),
            policies=names,
            settings=settings,
            guard=guard,
            interval_s=duration_s(interval, "--interval"),
            progress=bar,
        )
    wall = time.perf_counter() - t0
    result = {
        "trace": str(output),
        "steps": summary.steps,
        "gpus": summary.gpus,
        "rows": summary.rows,
        "row_groups": summary.row_groups,
        "bytes": summary.bytes,
        "budget_steps": None if spec.budget is None else [list(s) for s in spec.budget.steps],
        "wall_s": round(wall, 3),
    }
    if json_out:
        emit_json(result)
    else:
        typer.echo(
            f"wrote {output}: {summary.steps} steps x {summary.gpus} GPUs "
            f"({summary.bytes / 1e6:.1f} MB) in {wall:.1f} s; {_budget_said(spec, budget_w)}"
        )


RECORD_BUDGET_FRAC = 0.92  # of the twin's uncapped mean draw: a budget that binds, as the demo's


def _sized_budget_w(
    spec: TwinSpec, duration_s: float, step_s: float, progress: Any = None
) -> float:
    """A budget that binds: RECORD_BUDGET_FRAC of this twin's mean draw uncapped over the run
    (one uncapped pass at the recording's step first, as `ooda demo` sizes its budget)."""
    from dataclasses import replace

    from agent.sim.kpis import uncapped_demand_w

    return float(
        round(
            RECORD_BUDGET_FRAC
            * uncapped_demand_w(replace(spec, step_s=step_s), duration_s, progress),
            -1,
        )
    )


def _budget_said(spec: TwinSpec, sized_w: float | None) -> str:
    if spec.budget is None:
        return "no budget recorded (--no-budget)"
    if sized_w is None:
        return "the scenario's budget recorded"
    return f"budget {sized_w:.0f} W recorded (replay uses it; --budget-w to choose another)"


@sim_app.command("calibrate")
def calibrate(
    trace: Annotated[Path, typer.Argument(help="A recorded trace (ooda record, ooda sim record).")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="The scenario file (TOML) to write.")
    ],
    no_curves: Annotated[
        bool,
        typer.Option(
            "--no-curves", help="Fit the cluster and its jobs only, not the curves (faster)."
        ),
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="Orient's settings for learning the curves (default: the defaults)."
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object on the last line.")
    ] = False,
) -> None:
    """Fit a scenario to a trace: the twin then plays your cluster. GPU models and counts,
    job arrivals by hour of day, job sizes and durations, occupancy, the budget, and the power
    curves the agent learned (written beside it as <name>.curves.csv).

    Examples:

      ooda sim calibrate day.parquet -o my-cluster.toml

      ooda demo --scenario my-cluster.toml --duration 2h
    """
    from agent.config import default_config, load_config
    from agent.replay.calibrate import calibrate as fit_scenario

    if not trace.is_file():
        raise BadInputError(f"trace {trace}: no such file")
    cfg = load_config(config, needs_source=False) if config is not None else default_config()
    t0 = time.perf_counter()
    result = fit_scenario(trace, output, cfg, learn_curves=not no_curves)
    fit, obs = result.fit, result.observed
    summary = {
        "scenario": str(output),
        "curves": str(result.curves_file) if result.curves_file else None,
        "nodes": obs.nodes,
        "gpus_per_node": obs.gpus_per_node,
        "model": result.scenario["twin"]["model"],
        "occupancy": result.scenario["twin"]["occupancy"],
        "jobs_seen": fit.seen,
        "jobs_arrived": fit.arrived,
        "jobs_censored": fit.censored,
        "arrivals_per_h_mean": round(sum(fit.arrivals_per_h) / len(fit.arrivals_per_h), 3),
        "notes": result.notes,
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    if json_out:
        emit_json(summary)
        return
    typer.echo(
        f"wrote {output}: {obs.nodes} nodes x {obs.gpus_per_node} {summary['model']}, "
        f"occupancy {summary['occupancy']:.2f}, {fit.arrived} of {fit.seen} jobs arrived "
        f"({summary['arrivals_per_h_mean']:.1f} an hour)"
        + (f", curves in {result.curves_file}" if result.curves_file else "")
    )
    for note in result.notes:
        typer.echo(f"  note: {note}")
