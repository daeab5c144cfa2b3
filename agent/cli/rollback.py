"""`ooda rollback`: undo everything the agent did (caps set, nodes drained), audited."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.cli._common import emit_json
from agent.cli.audit_cmd import DEFAULT_CONFIG, StateDirOpt


def rollback(
    config: Annotated[
        Path, typer.Option("--config", help=f"Configuration file (default {DEFAULT_CONFIG}).")
    ] = DEFAULT_CONFIG,
    audit_log: Annotated[
        Path | None,
        typer.Option("--audit-log", help="The audit log to read (default: the config's)."),
    ] = None,
    state_dir: StateDirOpt = None,
    node: Annotated[
        list[str] | None,
        typer.Option("--node", help="Also check this node for a drain of ours (repeatable)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show and audit what would be done; change nothing.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object on the last line.")
    ] = False,
) -> None:
    """Release every GPU cap the agent set and resume every node it drained.

    Needs no running agent: the caps come from the durable audit log (applied, never released
    since), the drains from the placement system (reason starting `ooda:`); a node someone else
    drained is never resumed. Each release and resume is audited (policy `rollback`). Stop the
    agent, or put it in dry-run, first: a live agent would act again at its next cycle.
    Exit code 1 when anything could not be undone (the rest still is).

    Examples:

      ooda rollback --config /etc/ooda/agent.toml --dry-run

      ooda rollback --config /etc/ooda/agent.toml --json
    """
    from agent.act.audit import AuditLog, ReadStats, read_records
    from agent.act.rollback import plan_rollback, run_rollback
    from agent.assembly import build_actuators
    from agent.config import audit_path, load_config
    from agent.core.clock import SystemClock
    from agent.core.errors import BadInputError
    from agent.core.intents import Outcome

    cfg = load_config(config)
    path = audit_log or audit_path(cfg, state_dir)  # a relative one: where the daemon writes it
    if path is None:
        raise BadInputError(
            f"config {config}: audit.path is not set; rollback reads what the agent did from "
            "the audit log (or give --audit-log)"
        )
    stats = ReadStats()
    records = list(read_records(path, stats))
    if not stats.files:
        raise BadInputError(f"--audit-log {path}: no audit log there")
    caps, placement, closers = build_actuators(cfg, SystemClock())
    audit = AuditLog(path, max_bytes=cfg.audit.max_bytes, keep=cfg.audit.keep)
    try:
        plan = plan_rollback(records, placement, node or [])
        actions = run_rollback(
            plan,
            caps=caps,
            placement=placement,
            audit=audit,
            dry_run=dry_run,
            now_s=time.time(),
        )
    finally:
        audit.close()
        for close in reversed(closers):
            close()
    failed = [a for a in actions if a.outcome is Outcome.FAILED]
    result: dict[str, Any] = {
        "dry_run": dry_run,
        "audit_log": str(path),
        "skipped_lines": stats.skipped,
        **plan.summary(),
        "actions": [a.to_record() for a in actions],
        "failed": len(failed),
    }
    if json_out:
        emit_json(result)
    else:
        verb = "would " if dry_run else ""
        typer.echo(
            f"rollback: {verb}release {len(plan.caps)} cap(s), {verb}resume "
            f"{len(plan.drained)} node(s)" + (f" {', '.join(plan.drained)}" if plan.drained else "")
        )
        for target, why in plan.skipped:
            typer.echo(f"  left alone: {target}: {why}")
        for note in plan.notes:
            typer.echo(f"  note: {note}")
        for a in failed:
            typer.echo(f"  FAILED: {a.intent.target_name()}: {a.detail}", err=True)
    if failed:
        typer.echo(f"ooda: error: rollback: {len(failed)} action(s) failed (above)", err=True)
        raise typer.Exit(1)
