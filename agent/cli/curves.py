"""`ooda curves export`: the power curves the agent learned, as a measured-curves CSV."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.cli._common import emit_json
from agent.core.errors import BadInputError

curves_app = typer.Typer(help="Power curves: what the agent learned of each workload.")


@curves_app.command("export")
def export(
    output: Annotated[Path, typer.Option("-o", "--output", help="The CSV file to write.")],
    trace: Annotated[
        Path | None, typer.Option("--trace", help="Learn the curves from this trace.")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="Take the curves a daemon learned (its state directory)."),
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(help="With --state-dir: the cluster whose state to read (if several)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="With --trace: orient's settings (default: the defaults)."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object on the last line.")
    ] = False,
) -> None:
    """Write the power curves the agent learned: one curve per workload and GPU model, in the
    measured-curves format (workload, gpu_model, power_limit_w, throughput, power_w) plus the
    learner's interval (throughput_lo, throughput_hi), its confidence and the jobs behind it.
    A twin takes the file back (`ooda demo --curves`, a scenario's [workloads] curves).

    Examples:

      ooda curves export --trace day.parquet -o learned.csv

      ooda curves export --state-dir /var/lib/ooda -o learned.csv --json
    """
    from agent.replay.curves import export_rows, learn_from_trace, learner_from_state, state_file
    from agent.sim.measured import write_curves

    if (trace is None) == (state_dir is None):
        raise BadInputError("ooda curves export: give --trace TRACE or --state-dir DIR")
    if cluster is not None and state_dir is None:
        raise BadInputError("--cluster: only with --state-dir")
    if config is not None and trace is None:
        raise BadInputError("--config: only with --trace")
    t0 = time.perf_counter()
    if trace is not None:
        learner = learn_from_trace(_reader(trace), _config(config))
        source = str(trace)
    else:
        assert state_dir is not None
        path = state_file(state_dir, cluster)
        learner = learner_from_state(path)
        source = str(path)
    result = export_rows(learner)
    if not result.rows:
        raise BadInputError(
            f"{source}: no curve learned (caps must bind on labelled or recognizable jobs for "
            "the agent to learn one)" + (f"; {'; '.join(result.notes)}" if result.notes else "")
        )
    try:
        write_curves(output, result.rows)
    except OSError as exc:
        raise BadInputError(f"-o {output}: cannot write ({exc.strerror or exc})") from None
    summary: dict[str, Any] = {
        "output": str(output),
        "source": source,
        "curves": result.curves,
        "rows": len(result.rows),
        "notes": result.notes,
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    if json_out:
        emit_json(summary)
        return
    typer.echo(f"wrote {output}: {result.curves} curves ({len(result.rows)} rows) from {source}")
    for note in result.notes:
        typer.echo(f"  note: {note}")


def _reader(trace: Path) -> Any:
    from agent.observe.trace import TraceReader

    if not trace.is_file():
        raise BadInputError(f"trace {trace}: no such file")
    return TraceReader(trace)


def _config(path: Path | None) -> Any:
    from agent.config import default_config, load_config

    # Orient's settings are what it reads: a file without [source] serves.
    return load_config(path, needs_source=False) if path is not None else default_config()
