"""The `ooda` command. Each command group lives in its own module and is registered here."""

from __future__ import annotations

import sys
from typing import Annotated

import structlog
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


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"ooda {version('ooda-agent')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("ooda (not installed: no version)")
        raise typer.Exit(0)


@app.callback()
def _root(
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level", help="debug, info, warning (default) or error; or OODA_LOG_LEVEL."
        ),
    ] = None,
    _version_flag: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
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
    """Entry point: exit 0 on success, 2 on bad input, 1 on a failure; every error one line,
    `ooda: error: WHAT`, naming the input or the place (never a Python class name or a
    traceback: `--log-level debug` logs the traceback of a failure that is a bug)."""
    try:
        result = app(args=argv, prog_name="ooda", standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("ooda: interrupted", err=True)
        return 130
    except typer.TyperException as exc:  # usage errors (typer's own click): one line, exit 2
        return _usage_error(exc)
    except OodaError as exc:
        for line in exc.lines():
            typer.echo(f"ooda: error: {line}", err=True)
        return 2 if isinstance(exc, BadInputError) else 1
    except OSError as exc:  # a file or a socket the command needed
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(f"ooda: error: {where}{exc.strerror or exc}", err=True)
        return 1
    except Exception as exc:  # a bug: said in one line; the traceback at --log-level debug
        structlog.get_logger("ooda.cli").debug("unexpected_failure", exc_info=True)
        said = " ".join(str(exc).split()) or "no message"
        typer.echo(
            f"ooda: error: unexpected failure ({said}); this is a bug: please report it with "
            "the output of the same command with --log-level debug",
            err=True,
        )
        return 1
    return result if isinstance(result, int) else 0


def _usage_error(exc: typer.TyperException) -> int:
    """A usage error (an unknown option, a value out of range): what, then which command."""
    ctx = getattr(exc, "ctx", None)
    message = " ".join(exc.format_message().split())
    message = message[:1].lower() + message[1:]
    where = f"; see {ctx.command_path} --help" if ctx is not None else ""
    typer.echo(f"ooda: error: {message}{where}", err=True)
    return int(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    sys.exit(main())
