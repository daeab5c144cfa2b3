"""`ooda guard reset` and `ooda guard status`: the drain circuit breaker, for people."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.cli._common import emit_json
from agent.cli.audit_cmd import DEFAULT_CONFIG

guard_app = typer.Typer(help="The guard's drain circuit breaker.", no_args_is_help=True)

ConfigOpt = Annotated[
    Path, typer.Option("--config", help=f"Configuration file (default {DEFAULT_CONFIG}).")
]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir", help="The daemon's state directory (default: the config's daemon.state_dir)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object on the last line.")]


def _where(config: Path, state_dir: Path | None) -> tuple[Path, Path | None]:
    """The state directory and the audit log (a relative one under that directory, as the
    daemon writes it)."""
    from agent.config import audit_path, load_config
    from agent.config import state_dir as configured

    cfg = load_config(config, needs_source=False, check_files=False)
    directory = state_dir or configured(cfg)
    return directory, audit_path(cfg, directory)


def _breaker_from_audit(audit_path: Path | None) -> dict[str, Any]:
    """The breaker as the audit log tells it: the last trip and the last reset after it."""
    from agent.act.audit import read_records

    if audit_path is None:
        return {"known": False, "why": "no audit log configured"}
    tripped: dict[str, Any] | None = None
    reset: dict[str, Any] | None = None
    for record in read_records(audit_path):
        if record.get("event") == "guard_breaker_tripped":
            tripped, reset = record, None
        elif record.get("event") == "guard_reset" and tripped is not None:
            reset = record
    return {
        "known": True,
        "open": tripped is not None and reset is None,
        "last_trip": tripped,
        "reset_after_it": reset,
    }


@guard_app.command("reset")
def reset(
    config: ConfigOpt = DEFAULT_CONFIG,
    state_dir: StateDirOpt = None,
    note: Annotated[str, typer.Option("--note", help="Why (kept in the audit log).")] = "",
    wait: Annotated[
        float,
        typer.Option(
            "--wait", min=0, help="Wait up to this many seconds for the daemon to apply it."
        ),
    ] = 0.0,
    json_out: JsonOpt = False,
) -> None:
    """Close the drain circuit breaker so the agent may drain again.

    Leaves a reset request in the daemon's state directory (written whole, fsynced). A running
    daemon applies it at its next cycle and audits it (`guard_reset`); with no daemon running it
    waits there and the next start applies it after loading its saved state. The request itself
    is audited too (`guard_reset_requested`). Re-running is harmless: one request is applied once.

    Examples:

      ooda guard reset --config /etc/ooda/agent.toml --note "xid storm was a bad driver push"

      ooda guard reset --config /etc/ooda/agent.toml --wait 60 --json
    """
    from agent.act.audit import AuditLog
    from agent.act.guard import RESET_FILE, request_reset
    from agent.core.errors import BadInputError

    directory, audit_path = _where(config, state_dir)
    try:
        request = request_reset(directory, note=note)
    except OSError as exc:
        raise BadInputError(
            f"--state-dir {directory}: cannot write the reset request ({exc.strerror or exc})"
        ) from None
    if audit_path is not None:
        audit = AuditLog(audit_path)
        try:
            audit.event("guard_reset_requested", time_s=request["requested_at"], **request)
        finally:
            audit.close()
    path = directory / RESET_FILE
    deadline = time.monotonic() + wait
    while wait and path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    consumed = not path.exists()
    result = {"requested": True, "request": request, "file": str(path), "applied": consumed}
    if json_out:
        emit_json(result)
        return
    if consumed:
        typer.echo(f"guard reset: applied by the running agent (request {request['id']})")
    else:
        typer.echo(
            f"guard reset: requested ({path}); the agent applies it at its next cycle, or at "
            "its next start if it is not running"
        )


@guard_app.command("status")
def status(
    config: ConfigOpt = DEFAULT_CONFIG, state_dir: StateDirOpt = None, json_out: JsonOpt = False
) -> None:
    """Whether the drain circuit breaker is open (from the audit log) and whether a reset
    request is waiting to be applied.

    Examples:

      ooda guard status --config /etc/ooda/agent.toml
    """
    from agent.act.guard import RESET_FILE

    directory, audit_path = _where(config, state_dir)
    pending = (directory / RESET_FILE).exists()
    breaker = _breaker_from_audit(audit_path)
    result = {"state_dir": str(directory), "reset_pending": pending, "breaker": breaker}
    if json_out:
        emit_json(result)
        return
    if not breaker["known"]:
        typer.echo(f"breaker: unknown ({breaker['why']})")
    elif breaker["open"]:
        trip = breaker["last_trip"]
        typer.echo(f"breaker: OPEN since {trip.get('ts')}: {trip.get('reason')}")
    else:
        typer.echo("breaker: closed")
    if pending:
        typer.echo(f"reset: requested, not applied yet ({directory / RESET_FILE})")
