"""`ooda audit tail` and `ooda explain ACTION_ID`: reading the durable audit log."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.cli._common import emit_json

DEFAULT_CONFIG = Path("/etc/ooda/agent.toml")

audit_app = typer.Typer(help="Read the audit log (decisions, refusals, actions).")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", help=f"Configuration file (its [audit] path; default {DEFAULT_CONFIG})."
    ),
]
AuditLogOpt = Annotated[
    Path | None,
    typer.Option("--audit-log", help="The audit log file itself (instead of --config)."),
]


StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="The daemon's state directory, where a relative audit.path is (default: the "
        "config's daemon.state_dir).",
    ),
]


def audit_path(config: Path | None, audit_log: Path | None, state_dir: Path | None = None) -> Path:
    """The audit log a command reads: --audit-log, else the config's [audit] path (a relative
    one under the state directory, as the daemon writes it)."""
    from agent.config import audit_path as configured
    from agent.config import load_config
    from agent.core.errors import BadInputError

    if config is not None and audit_log is not None:
        raise BadInputError("give --config or --audit-log, not both")
    if audit_log is not None:
        return audit_log
    cfg = load_config(config or DEFAULT_CONFIG, needs_source=False, check_files=False)
    path = configured(cfg, state_dir)
    if path is None:
        raise BadInputError(
            f"config {config or DEFAULT_CONFIG}: audit.path is not set (no durable audit log)"
        )
    return path


def _short(value: Any, limit: int = 6) -> str:
    if isinstance(value, list):
        head = ", ".join(_short(v) for v in value[:limit])
        return head + (f", ... ({len(value)} in all)" if len(value) > limit else "")
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "-"  # not known (no earlier cap of record, a value not measured)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value)


def _evidence(evidence: Any) -> list[str]:
    """A decision's evidence, a line a key; a long list shortened (`--json` has it whole)."""
    if not isinstance(evidence, dict) or not evidence:
        return ["  evidence: none"]
    return ["  evidence:"] + [f"    {key}: {_short(value)}" for key, value in evidence.items()]


def render(record: dict[str, Any]) -> str:
    """One line per record for people."""
    event = str(record.get("event", "?"))
    ts = str(record.get("ts", ""))[:19]
    ident = record.get("action_id") or record.get("decision_id") or record.get("run_id") or ""
    parts = [ts, f"{event:<8}", str(ident)]
    if record.get("kind"):
        parts.append(str(record["kind"]))
    if record.get("policy"):
        parts.append(f"[{record['policy']}]")
    if "target" in record:
        parts.append(_short(record["target"], 3))
    if record.get("outcome"):
        parts.append(f"-> {record['outcome']}")
    if record.get("dry_run"):
        parts.append("(dry-run)")
    why = record.get("detail") if event == "action" else record.get("reason")
    if why:
        parts.append(f"- {why}")
    return "  ".join(p for p in parts if p)


@audit_app.command("tail")
def tail_cmd(
    config: ConfigOpt = None,
    audit_log: AuditLogOpt = None,
    state_dir: StateDirOpt = None,
    lines: Annotated[int, typer.Option("-n", "--lines", min=0, help="How many records.")] = 20,
    follow_: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new records (Ctrl-C stops).")
    ] = False,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json",
            help="One JSON object on the last line ({records, skipped, files}); with --follow "
            "one record per line.",
        ),
    ] = False,
) -> None:
    """The last records of the audit log, across its rotated files (oldest first).

    A line that does not parse (a torn last line after a crash) is skipped and counted.

    Examples:

      ooda audit tail --config /etc/ooda/agent.toml -n 50

      ooda audit tail --audit-log /var/log/ooda/audit.jsonl --follow

      ooda audit tail --audit-log audit.jsonl --json
    """
    from agent.act.audit import ReadStats, follow, tail

    path = audit_path(config, audit_log, state_dir)
    stats = ReadStats()
    records = tail(path, lines, stats)
    if json_out and not follow_:
        emit_json(
            {
                "audit_log": str(path),
                "files": [str(f) for f in stats.files],
                "records": records,
                "skipped": stats.skipped,
            }
        )
        return
    for record in records:
        typer.echo(json.dumps(record) if json_out else render(record))
    if stats.skipped:
        typer.echo(
            f"ooda: warning: {path}: {stats.skipped} line(s) did not parse and were skipped",
            err=True,
        )
    if not stats.files and not follow_:
        typer.echo(f"ooda: warning: no audit log at {path} yet", err=True)
    if follow_:
        sys.stdout.flush()

        def emit(record: dict[str, Any]) -> None:
            typer.echo(json.dumps(record) if json_out else render(record))
            sys.stdout.flush()

        with contextlib.suppress(KeyboardInterrupt):
            follow(path, emit, start=stats.end)


def explain(
    action_id: Annotated[
        str, typer.Argument(help="An action id (a-...) or a decision id (d-...).")
    ],
    config: ConfigOpt = None,
    audit_log: AuditLogOpt = None,
    state_dir: StateDirOpt = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object on the last line.")
    ] = False,
) -> None:
    """Show an action with its decision: policy, reason, target, before and after, evidence,
    what the guard refused of it and the decision's other actions. Searches the rotated files.

    Examples:

      ooda explain a-3f9c1e-000042-0007 --config /etc/ooda/agent.toml

      ooda explain d-3f9c1e-000042-0005 --audit-log audit.jsonl --json
    """
    from agent.act.audit import UnknownActionError
    from agent.act.audit import explain as find
    from agent.core.errors import BadInputError

    path = audit_path(config, audit_log, state_dir)
    try:
        found = find(path, action_id)
    except UnknownActionError as exc:
        raise BadInputError(f"explain: {exc}") from None
    if json_out:
        emit_json(
            {
                "action": found.action,
                "decision": found.decision,
                "refusals": found.refusals,
                "other_actions": found.siblings,
            }
        )
        return
    a = found.action
    out = [
        f"action {a.get('action_id', '-')}: {a.get('kind')} by {a.get('policy')}"
        f" -> {a.get('outcome', '(no action)')}" + (" (dry-run)" if a.get("dry_run") else ""),
        f"  at:       {a.get('ts', '')} (t={_short(a.get('time_s'))})",
        f"  target:   {_short(a.get('target'))}",
        f"  before:   {_short(a.get('before'))}",
        f"  after:    {_short(a.get('after'))}",
        f"  reason:   {a.get('reason', '')}",
    ]
    if a.get("detail"):
        out.append(f"  detail:   {a['detail']}")
    d = found.decision
    if d is not None:
        out += [
            f"decision {d.get('decision_id')}: {d.get('kind')} by {d.get('policy')}"
            + (" (dry-run)" if d.get("dry_run") else ""),
            f"  at:       {d.get('ts', '')} (t={_short(d.get('time_s'))})",
            f"  target:   {_short(d.get('target'))}",
            f"  wanted:   {_short(d.get('after'))}",
            f"  reason:   {d.get('reason', '')}",
            *_evidence(d.get("evidence")),
        ]
    else:
        out.append("decision: not found in the audit log (rotated away?)")
    for r in found.refusals:
        out.append(f"refused:  {_short(r.get('target'), 3)}: {r.get('reason')}")
    for s in found.siblings:
        out.append(
            f"also:     {s.get('action_id')} {_short(s.get('target'), 3)} -> {s.get('outcome')}"
            + (f" ({s['detail']})" if s.get("detail") else "")
        )
    typer.echo("\n".join(out))
