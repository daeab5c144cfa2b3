"""The `ooda` command. Each command group lives in its own module and is registered here."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from agent.cli._common import setup_logging
from agent.cli.audit_cmd import audit_app, explain
from agent.cli.config_cmd import adapters, config_app, policies
from agent.cli.curves import curves_app
from agent.cli.demo import demo
from agent.cli.detect import detect, forecast
from agent.cli.guard_cmd import guard_app
from agent.cli.meter import meter_app, report_app
from agent.cli.node import node_app
from agent.cli.once import once
from agent.cli.replay import replay
from agent.cli.rollback import rollback
from agent.cli.run import run
from agent.cli.sim import sim_app
from agent.cli.site import site_app
from agent.cli.trace import record, trace_app
from agent.core.errors import BadInputError, OodaError

app = typer.Typer(
    name="ooda",
    help="ooda: an OODA-loop agent that keeps a GPU cluster inside its power budget, "
    "efficient and healthy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _root(
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level", help="debug, info, warning (default) or error; or OODA_LOG_LEVEL."
        ),
    ] = None,
) -> None:
    setup_logging(log_level)


app.command()(demo)
app.command()(once)
app.command()(record)
app.command()(replay)
app.add_typer(sim_app, name="sim")
app.add_typer(site_app, name="site")
app.add_typer(trace_app, name="trace")
app.add_typer(curves_app, name="curves")
app.command("policies")(policies)
app.command("adapters")(adapters)
app.command("run")(run)
app.add_typer(config_app, name="config")
app.add_typer(node_app, name="node")
app.add_typer(guard_app, name="guard")
app.add_typer(audit_app, name="audit")
app.command("explain")(explain)
app.command("rollback")(rollback)
app.add_typer(meter_app, name="meter")
app.add_typer(report_app, name="report")
app.command("detect")(detect)
app.command("forecast")(forecast)


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 on success, 2 on bad input (one line naming it), 1 on other failures."""
    try:
        result = app(args=argv, prog_name="ooda", standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        typer.echo("ooda: aborted", err=True)
        return 130
    except typer.TyperException as exc:  # usage errors (typer's own click): one line, exit 2
        ctx = getattr(exc, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None else ""
        message = " ".join(exc.format_message().split())
        typer.echo(f"ooda: error: {where}{message}", err=True)
        return int(getattr(exc, "exit_code", 2))
    except BadInputError as exc:
        typer.echo(f"ooda: error: {exc}", err=True)
        return 2
    except OodaError as exc:
        typer.echo(f"ooda: {type(exc).__name__}: {exc}", err=True)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
