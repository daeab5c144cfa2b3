"""`ooda config check`, `ooda policies` and `ooda adapters`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from agent.cli._common import emit_json, wrapped

_BOUND_SIGNS = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}

config_app = typer.Typer(help="Work with configuration files.", no_args_is_help=True)


@config_app.command("check")
def check(
    file: Annotated[Path, typer.Argument(help="The TOML configuration to validate.")],
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object on the last line.")
    ] = False,
) -> None:
    """Validate a configuration file; every problem names its key path.

    Examples:

      ooda config check deploy/examples/twin.toml
    """
    from agent.config import adapters_of, config_warnings, load_config

    config = load_config(file)
    warnings = config_warnings(config)
    kind = adapters_of(config).source(config.source.kind)
    # What will run: a policy that is off (curve_exploration, unless enabled) is not listed.
    running = [name for name, s in config.policy_settings.items() if getattr(s, "enabled", True)]
    off = [name for name in config.policy_settings if name not in running]
    summary = {
        "ok": True,
        "file": str(file),
        "dry_run": config.dry_run,
        "source": config.source.kind,
        "policies": running,
        "policies_off": off,
        "interval_s": config.daemon.interval_s,
        "budget": _budget_said(config),
        "warnings": warnings,
    }
    for warning in warnings:
        typer.echo(wrapped(f"ooda: warning: {file}: {warning}", indent="  "), err=True)
    if json_out:
        emit_json(summary)
        return
    mode = "dry-run (advise only)" if config.dry_run else "LIVE (acts)"
    typer.echo(f"{file}: OK")
    typer.echo(wrapped(f"  source:   {kind.name}: {kind.description}", indent="            "))
    names = ", ".join(running) or "none"
    if off:
        names += f" ({', '.join(off)} off)"
    typer.echo(wrapped(f"  policies: {names}", indent="            "))
    typer.echo(f"  budget:   {summary['budget']}")
    typer.echo(f"  mode:     {mode}, a cycle every {config.daemon.interval_s:g} s")


def _budget_said(config: Any) -> str:
    cluster = config.cluster
    if cluster.budget_w is not None:
        return f"{cluster.budget_w:g} W (cluster.budget_w)"
    if cluster.budget_query is not None:
        return f"PromQL {cluster.budget_query} (cluster.budget_query)"
    return "none in [cluster]"


def _settings_doc(model: Any) -> list[dict[str, Any]]:
    """Each setting of a pydantic settings model: name, type, default, bounds, description."""
    schema = model.model_json_schema()
    return [
        {
            "name": key,
            "type": prop.get("type", prop.get("anyOf", "")),
            "default": prop.get("default"),
            "description": prop.get("description", ""),
            **{b: prop[b] for b in _BOUND_SIGNS if b in prop},
        }
        for key, prop in schema.get("properties", {}).items()
    ]


def _echo_settings(settings: list[dict[str, Any]]) -> None:
    """Each setting as it is written in the file (`enabled = false`), its bounds, its doc."""
    for s in settings:
        bounds = " ".join(f"{_BOUND_SIGNS[k]}{v}" for k, v in s.items() if k in _BOUND_SIGNS)
        line = f"    {s['name']} = {_toml_value(s['default'])}  {bounds}".rstrip()
        if s["default"] is None:
            line = f"    {s['name']}  (not set by default)  {bounds}".rstrip()
        typer.echo(line)
        typer.echo(wrapped(f"        {s['description']}", indent="        "))


def _toml_value(value: Any) -> str:
    """A default in TOML's terms (true, "text", [1, 2], {a = 1}), never a Python repr."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def adapters(
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object on the last line.")
    ] = False,
) -> None:
    """List every source and actuator kind (built-in and installed plug-ins) with its config
    section and its settings.

    A source kind is chosen with `[source] kind = "NAME"` and configured in `[source.NAME]`; an
    actuator kind with `[actuators] caps = "NAME"` or `placement = "NAME"`, configured in
    `[actuators.NAME]`. Plug-ins add kinds through the entry-point groups `ooda.sources` and
    `ooda.actuators`.

    Examples:

      ooda adapters

      ooda adapters --json
    """
    from agent.adapters import default_adapters

    table = default_adapters()
    out = [_adapter_doc("source", "source", kind) for kind in table.sources.values()]
    for role, kinds in table.actuators.items():
        out += [_adapter_doc(role, "actuators", kind) for kind in kinds.values()]
    if json_out:
        emit_json({"adapters": out})
        return
    for a in out:
        section = f", [{a['section']}]" if a["section"] else ""
        typer.echo(f"{a['kind']} {a['name']}  ({a['origin']}{section})")
        typer.echo(wrapped(f"  {a['description']}", indent="  "))
        _echo_settings(a["settings"])
        typer.echo("")


def _adapter_doc(role: str, parent: str, kind: Any) -> dict[str, Any]:
    """A source or actuator kind as `ooda adapters` lists it: its section under `parent`."""
    has_section = kind.Settings is not None
    return {
        "kind": role,
        "name": kind.name,
        "origin": kind.origin,
        "description": kind.description,
        "section": f"{parent}.{kind.name}" if has_section else None,
        "settings": _settings_doc(kind.Settings) if has_section else [],
    }


def policies(
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object on the last line.")
    ] = False,
) -> None:
    """List every policy (built-in and installed plug-ins) with its settings and their docs.

    Examples:

      ooda policies

      ooda policies --json
    """
    from policies.registry import default_registry

    registry = default_registry()
    out: list[dict[str, Any]] = []
    for name in registry.names():
        cls = registry.get(name)
        settings = _settings_doc(cls.Settings)
        out.append(
            {
                "name": name,
                "origin": registry.origin(name),
                "safety": bool(getattr(cls, "safety", False)),
                "description": getattr(cls, "description", ""),
                "settings": settings,
            }
        )
    if json_out:
        emit_json({"policies": out})
        return
    for p in out:
        kind = "safety" if p["safety"] else "efficiency"
        typer.echo(f"{p['name']}  ({kind}, {p['origin']})")
        typer.echo(wrapped(f"  {p['description']}", indent="  "))
        _echo_settings(p["settings"])
        typer.echo("")
