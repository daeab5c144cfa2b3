"""Scenario files for the twin (TOML): the cluster, its budget over time and its faults, so a run
can be repeated exactly. Every key is optional:

    [twin]
    nodes = 4
    gpus_per_node = 4
    model = "H100"            # H100, A100, H200, B200, GB200, A100-PCIe or L40S
    seed = 7
    occupancy = 0.85
    node_overhead_w = 0
    job_mix = "philly"        # a real cluster's job mix: philly, pai, helios or acme
    workload_label = true     # telemetry labels each GPU with its job's workload class

    [jobs]                    # the job mix spelled out (what `ooda sim calibrate` writes)
    sizes = [[1, 0.6], [2, 0.1], [8, 0.3]]           # [GPUs, share of jobs]
    durations = [[60, 0.1], [600, 0.5], [36000, 1]]  # [seconds, share of jobs at most as long]
    arrivals_per_h = [12, 10, ...]                   # 24 values: jobs per hour of day
    arrival_shape = [0.8, 0.7, ...]                  # ... or 24 values relative to the mean
    multi_node = true                                # sizes above a node take whole nodes

    [workloads]               # measured power curves (agent/sim/measured.py)
    curves = "curves.csv"     # relative to this file
    mix = { resnet50 = 0.5, bert = 0.5 }   # shares of arriving jobs (default: all, equally)

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

Errors name the file, the key and the problem. Curves a curves file leaves out are logged
(a warning per curve, saying why).
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from agent.core.errors import BadInputError
from agent.core.gpu_models import BUILTIN_MODELS, GpuModel, find_model
from agent.sim.faults import FaultSpec, parse_fault
from agent.sim.jobmix import HOURS, JOB_MIXES, WorkTable, named_mix
from agent.sim.measured import curve_set
from agent.sim.phases import PhaseSpec, preset
from agent.sim.twin import BudgetSchedule, TwinSpec

log = structlog.get_logger(__name__)
MAX_SCENARIO_BYTES = 1024 * 1024

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
            changes[key] = _flag(value, where)
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


def gpu_model(name: object, where: str) -> GpuModel:
    """A built-in GPU model by its short or NVML name."""
    model = find_model(name) if isinstance(name, str) else None
    if model is not None:
        return model
    known = ", ".join(BUILTIN_MODELS)
    raise BadInputError(f"{where}: unknown GPU model {name!r} (known: {known})")


def _twin(table: Any, source: str) -> dict[str, Any]:
    """The [twin] section's changes to the spec (a job mix's included)."""
    if not isinstance(table, dict):
        raise BadInputError(f"{source}: twin: a table of settings")
    changes: dict[str, Any] = {}
    if "job_mix" in table:
        changes.update(_job_mix(table["job_mix"], f"{source}: twin.job_mix"))
    for key, value in table.items():
        if key == "model":
            changes["model"] = gpu_model(value, f"{source}: twin.model")
        elif key == "job_mix":
            continue
        elif key in ("workload_label", "multi_node"):
            changes[key] = _flag(value, f"{source}: twin.{key}")
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


def _flag(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise BadInputError(f"{where}: true or false, not {value!r}")
    return value


def _job_mix(value: object, where: str) -> dict[str, Any]:
    """A named job mix's changes to the spec (agent/sim/jobmix.py)."""
    try:
        mix = named_mix(str(value))
    except ValueError:
        raise BadInputError(
            f"{where}: unknown job mix {value!r} (known: {', '.join(JOB_MIXES)})"
        ) from None
    changes: dict[str, Any] = {
        "job_mix": mix.name,
        "job_sizes": mix.sizes,
        "durations": mix.durations,
        "arrival_shape": mix.arrival_shape,
        "multi_node": True,
    }
    if mix.occupancy is not None:
        changes["occupancy"] = mix.occupancy
    return changes


def _pairs(value: object, where: str) -> list[tuple[float, float]]:
    """A list of [number, number] pairs (at most 1,000)."""
    if not isinstance(value, list) or not value or len(value) > 1000:
        raise BadInputError(f"{where}: a list of 1 to 1,000 [number, number] pairs")
    out = []
    for i, pair in enumerate(value):
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, int | float) for v in pair)
        ):
            raise BadInputError(f"{where}[{i}]: not a [number, number] pair ({pair!r})")
        out.append((float(pair[0]), float(pair[1])))
    return out


def _hours(value: object, where: str) -> tuple[float, ...]:
    if (
        not isinstance(value, list)
        or len(value) != HOURS
        or any(isinstance(v, bool) or not isinstance(v, int | float) or v < 0 for v in value)
    ):
        raise BadInputError(f"{where}: {HOURS} numbers, none negative, one per hour of day")
    return tuple(float(v) for v in value)


def _jobs(table: Any, source: str) -> dict[str, Any]:
    """The [jobs] section: a job mix spelled out."""
    if not isinstance(table, dict):
        raise BadInputError(f"{source}: jobs: a table of settings")
    changes: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{source}: jobs.{key}"
        if key == "sizes":
            sizes = _pairs(value, where)
            if (
                any(n < 1 or n != int(n) or p < 0 for n, p in sizes)
                or sum(p for _, p in sizes) <= 0
            ):
                raise BadInputError(f"{where}: [GPUs >= 1, share >= 0] pairs, a share positive")
            changes["job_sizes"] = tuple((int(n), p) for n, p in sizes)
        elif key == "durations":
            pairs = _pairs(value, where)
            try:
                changes["durations"] = WorkTable(
                    tuple(s for s, _ in pairs), tuple(f for _, f in pairs)
                )
            except ValueError as exc:
                raise BadInputError(f"{where}: {exc}") from None
        elif key in ("arrivals_per_h", "arrival_shape"):
            changes[key] = _hours(value, where)
        elif key == "multi_node":
            changes[key] = _flag(value, where)
        else:
            known = "arrival_shape, arrivals_per_h, durations, multi_node, sizes"
            raise BadInputError(f"{where}: unknown key (known: {known})")
    return changes


def _workloads(table: Any, spec: TwinSpec, source: str, base_dir: Path | None) -> dict[str, Any]:
    """The [workloads] section: measured curves (a path relative to the scenario file) and the
    mix of workloads arriving jobs are drawn from."""
    if not isinstance(table, dict):
        raise BadInputError(f"{source}: workloads: a table of settings")
    unknown = set(table) - {"curves", "mix"}
    if unknown:
        raise BadInputError(
            f"{source}: workloads.{sorted(unknown)[0]}: unknown key (known: curves, mix)"
        )
    changes: dict[str, Any] = {}
    if "curves" in table:
        path = Path(str(table["curves"]))
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        changes = with_curves(spec, path)
    if "mix" in table:
        mix = table["mix"]
        if not isinstance(mix, dict) or not mix:
            raise BadInputError(f"{source}: workloads.mix: a table of workload = share")
        shares = []
        for name, share in mix.items():
            if isinstance(share, bool) or not isinstance(share, int | float) or share < 0:
                raise BadInputError(f"{source}: workloads.mix.{name}: a share >= 0, not {share!r}")
            shares.append((str(name), float(share)))
        changes["mix"] = tuple(shares)
    return changes


def with_curves(spec: TwinSpec, path: Path) -> dict[str, Any]:
    """A spec's changes for a measured-curves file: its curves of the spec's GPU model as
    workloads, drawn equally (what is left out is logged, each with why)."""
    curves = curve_set(path, spec.model)
    for note in curves.notes:
        log.warning("curves", file=str(path), note=note)
    return {
        "workloads": curves.workloads,
        "mix": tuple((w.name, 1.0) for w in curves.workloads),
    }


def apply_scenario(
    data: dict[str, Any],
    base: TwinSpec,
    source: str = "scenario",
    base_dir: Path | None = None,
) -> TwinSpec:
    """The base spec with the scenario's settings applied (`base_dir`: where a curves file's
    relative path starts, the scenario file's directory)."""
    known = {"twin", "budget", "faults", "phases", "jobs", "workloads"}
    unknown = set(data) - known
    if unknown:
        raise BadInputError(
            f"{source}: unknown section {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})"
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
    if "jobs" in data:
        changes.update(_jobs(data["jobs"], source))
    if "workloads" in data:
        model = changes.get("model", base.model)
        changes.update(_workloads(data["workloads"], replace(base, model=model), source, base_dir))
    try:
        return replace(base, **changes)
    except ValueError as exc:
        raise BadInputError(f"{source}: {exc}") from None


def load_scenario(path: Path, base: TwinSpec | None = None) -> TwinSpec:
    try:
        size = path.stat().st_size
        if size > MAX_SCENARIO_BYTES:
            raise BadInputError(
                f"scenario {path}: {size} bytes, more than the {MAX_SCENARIO_BYTES} allowed"
            )
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadInputError(f"scenario {path}: cannot read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"scenario {path}: not valid TOML: {exc}") from None
    return apply_scenario(data, base or TwinSpec(), source=f"scenario {path}", base_dir=path.parent)
