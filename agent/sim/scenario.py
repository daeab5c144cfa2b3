"""Scenario files for the twin (TOML): the cluster, its budget over time and its faults, so a run
can be repeated exactly. Every key is optional:

    [twin]
    nodes = 4
    gpus_per_node = 4
    model = "H100"            # or "A100"
    seed = 7
    occupancy = 0.85
    node_overhead_w = 0

    [budget]                  # a constant budget, or steps, or a demand-response drop
    watts = 30000
    steps = [[0, 30000], [3600, 20000], [5400, 30000]]   # [start_s, watts]

    [[faults]]                # as on the command line ...
    spec = "xid=79:node2/gpu1@60+120"
    [[faults]]                # ... or spelled out
    kind = "fan"
    target = "node1/gpu0"
    start_s = 600
    duration_s = 900
    param = 1.6

    [phases]                  # normal-but-surprising phases (agent/sim/phases.py); none by default
    preset = "normal-day"     # all of them at a day's rates ("none": start from nothing) ...
    checkpoint = true         # ... and any key below overrides the preset
    evaluation = true
    loader_stalls = true
    warmup = true
    inference_share = 0.125   # share of the nodes running inference services all day
    flatlines_per_gpu_day = 0.05
    exporter_restarts_per_node_day = 1.0
    day_start_h = 0           # hour of day at twin time 0

Errors name the file, the key and the problem.
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.core.errors import BadInputError
from agent.core.gpu_models import BUILTIN_MODELS
from agent.sim.faults import FaultSpec, parse_fault
from agent.sim.phases import PhaseSpec, preset
from agent.sim.twin import BudgetSchedule, TwinSpec

_TWIN_KEYS = {
    "nodes": int,
    "gpus_per_node": int,
    "seed": int,
    "occupancy": float,
    "node_overhead_w": float,
}


def _fault(entry: Any, where: str) -> FaultSpec:
    if not isinstance(entry, dict):
        raise BadInputError(f"{where}: a fault is a table")
    if "spec" in entry:
        extra = set(entry) - {"spec"}
        if extra:
            raise BadInputError(f"{where}: 'spec' excludes other keys ({', '.join(sorted(extra))})")
        return parse_fault(str(entry["spec"]))
    try:
        kind, target, start = entry["kind"], entry["target"], entry["start_s"]
    except KeyError as exc:
        raise BadInputError(f"{where}.{exc.args[0]}: required key is missing") from None
    text = f"{kind}{'=' + str(entry['param']) if 'param' in entry else ''}:{target}@{start}"
    if "duration_s" in entry:
        text += f"+{entry['duration_s']}"
    return parse_fault(text)


_PHASE_FLAGS = ("checkpoint", "evaluation", "loader_stalls", "warmup")


def _phases(table: Any, base: PhaseSpec, source: str) -> PhaseSpec:
    """The [phases] section: a preset (or the base spec's phases), then its keys."""
    if not isinstance(table, dict):
        raise BadInputError(f"{source}: phases: a table of settings")
    changes: dict[str, Any] = {}
    spec = base
    for key, value in table.items():
        where = f"{source}: phases.{key}"
        if key == "preset":
            try:
                spec = preset(str(value))
            except ValueError as exc:
                raise BadInputError(f"{where}: {exc}") from None
        elif key in _PHASE_FLAGS:
            if not isinstance(value, bool):
                raise BadInputError(f"{where}: true or false, not {value!r}")
            changes[key] = value
        elif key in PhaseSpec.setting_names():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BadInputError(f"{where}: not a number ({value!r})")
            changes[key] = float(value)
        else:
            known = ", ".join(("preset", *PhaseSpec.setting_names()))
            raise BadInputError(f"{where}: unknown key (known: {known})")
    try:
        return replace(spec, **changes)
    except ValueError as exc:
        raise BadInputError(f"{source}: {exc}") from None


def _twin(table: Any, source: str) -> dict[str, Any]:
    """The [twin] section's changes to the spec."""
    changes: dict[str, Any] = {}
    for key, value in table.items():
        if key == "model":
            if value not in BUILTIN_MODELS:
                raise BadInputError(f"{source}: twin.model: unknown GPU model {value!r}")
            changes["model"] = BUILTIN_MODELS[value]
        elif key in _TWIN_KEYS:
            try:
                changes[key] = _TWIN_KEYS[key](value)
            except (TypeError, ValueError):
                raise BadInputError(f"{source}: twin.{key}: not a number ({value!r})") from None
        else:
            raise BadInputError(f"{source}: twin.{key}: unknown key")
    return changes


def _budget(table: Any, source: str) -> BudgetSchedule:
    """The [budget] section: a constant budget or steps."""
    try:
        if "steps" in table:
            return BudgetSchedule(tuple((float(t), float(w)) for t, w in table["steps"]))
        if "watts" in table:
            return BudgetSchedule.constant(float(table["watts"]))
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"{source}: budget: {exc}") from None
    raise BadInputError(f"{source}: budget: give 'watts' or 'steps'")


def apply_scenario(data: dict[str, Any], base: TwinSpec, source: str = "scenario") -> TwinSpec:
    """The base spec with the scenario's settings applied."""
    known = {"twin", "budget", "faults", "phases"}
    unknown = set(data) - known
    if unknown:
        raise BadInputError(
            f"{source}: unknown section {sorted(unknown)[0]!r} "
            "(known: budget, faults, phases, twin)"
        )
    changes = _twin(data.get("twin", {}), source)
    if data.get("budget") is not None:
        changes["budget"] = _budget(data["budget"], source)
    faults = [
        _fault(entry, f"{source}: faults[{i}]") for i, entry in enumerate(data.get("faults", []))
    ]
    if faults:
        changes["faults"] = tuple(base.faults) + tuple(faults)
    if "phases" in data:
        changes["phases"] = _phases(data["phases"], base.phases, source)
    try:
        return replace(base, **changes)
    except ValueError as exc:
        raise BadInputError(f"{source}: {exc}") from None


def load_scenario(path: Path, base: TwinSpec | None = None) -> TwinSpec:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadInputError(f"scenario {path}: cannot read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"scenario {path}: not valid TOML: {exc}") from None
    return apply_scenario(data, base or TwinSpec(), source=f"scenario {path}")
