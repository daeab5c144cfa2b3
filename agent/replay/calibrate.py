"""`ooda sim calibrate`: a scenario fitted from a recorded trace, so that the twin plays "your
cluster" (`ooda demo --scenario`, `ooda sim record --scenario`, then `ooda replay`).

What the trace shows, and what the scenario takes from it:

- GPU models and counts: the nodes and their GPUs of the first step; the twin plays one model,
  the most common (the others are named in a comment).
- Jobs: every job id seen, with the step it was first and last seen on and the most GPUs it held
  at once. A job first seen after the trace's first step arrived within it: its arrival time is
  its first step (a job that queued arrives when it starts). Arrivals by hour of day are those
  jobs per hour the trace covered of that hour of day (an hour it never covered: the mean).
- Job sizes: the arrived jobs' GPU counts (all jobs' when fewer than MIN_ARRIVALS arrived).
- Durations: the arrived jobs' time from first to last seen, plus a step; a job still running at
  the end is right-censored, so the distribution is the Kaplan-Meier estimate (jobs outlasting
  the trace still count: a day's trace of long jobs would otherwise make them short). The table
  written is the estimate at DURATION_POINTS quantiles; the share it never reaches (jobs longer
  than anything seen ended) lies between the longest seen and twice that.
- Occupancy: the mean share of GPUs with a job.
- Workloads: the curves the agent learned over the trace (agent/replay/curves.py), written beside
  the scenario as `<name>.curves.csv`, and the share of jobs of each learned workload where
  telemetry labels jobs with their workload.
- Budget: the trace's budget, as steps where it changes.

The trace's time of day: a twin trace's time 0 is its scenario's day_start_h; a real trace's
times are Unix seconds (UTC hours).
"""

from __future__ import annotations

import json
import math
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.config import Config
from agent.core.errors import BadInputError
from agent.core.gpu_models import find_model
from agent.observe.trace import TraceReader
from agent.replay.curves import export_rows, learn_from_trace
from agent.sim.jobmix import HOURS
from agent.sim.measured import write_curves

FloatArray = npt.NDArray[np.float64]

MIN_ARRIVALS = 20  # fewer arrived jobs: sizes from every job seen
DURATION_POINTS = 24  # quantiles of the duration table written
MAX_BUDGET_STEPS = 200
MAX_JOBS = 2_000_000  # distinct job ids one calibration keeps (a bound on its memory)


@dataclass
class JobLog:
    """What the trace shows of each job: first and last seen (s), most GPUs, its workload."""

    index: dict[str, int] = field(default_factory=dict)
    first_s: list[float] = field(default_factory=list)
    last_s: list[float] = field(default_factory=list)
    gpus: list[int] = field(default_factory=list)
    workload: list[str] = field(default_factory=list)

    def see(
        self, now_s: float, jobs: npt.NDArray[np.str_], workloads: npt.NDArray[np.str_]
    ) -> None:
        """One step's jobs (one entry per GPU, "" for none) and their GPUs' workload labels."""
        busy = jobs != ""
        if not busy.any():
            return
        ids, first, counts = np.unique(jobs[busy], return_index=True, return_counts=True)
        labels = workloads[busy][first]
        for job, n, label in zip(ids.tolist(), counts.tolist(), labels.tolist(), strict=True):
            i = self.index.get(job)
            if i is None:
                if len(self.index) >= MAX_JOBS:
                    raise BadInputError(f"more than {MAX_JOBS} distinct jobs in the trace")
                self.index[job] = len(self.first_s)
                self.first_s.append(now_s)
                self.last_s.append(now_s)
                self.gpus.append(n)
                self.workload.append(label)
                continue
            self.last_s[i] = now_s
            self.gpus[i] = max(self.gpus[i], n)
            if label and not self.workload[i]:
                self.workload[i] = label


@dataclass
class Observed:
    """A trace's cluster and jobs, as calibrate reads them."""

    step_s: float
    start_s: float
    end_s: float
    hour0_h: float  # the hour of day at time 0
    nodes: int
    gpus_per_node: int
    models: Counter[str]
    occupancy: float
    jobs: JobLog
    covered_s: FloatArray  # per hour of day: seconds of it the trace covers
    budget_steps: list[tuple[float, float]]


def observe_trace(reader: TraceReader) -> Observed:
    """One pass over the trace: its cluster, jobs, occupancy and budget."""
    meta = reader.meta
    if meta.steps == 0:
        raise BadInputError(f"trace {reader.path}: no steps")
    hour0 = _hour0(meta.time_base, meta.scenario)
    jobs = JobLog()
    busy_share = 0.0
    first = None
    for snap in reader.snapshots():
        if first is None:
            first = snap
        wl = snap.labels.get("workload")
        jobs.see(snap.time_s, snap.job, wl if wl is not None else np.full(snap.job.shape, ""))
        busy_share += float((snap.job != "").mean()) if snap.job.size else 0.0
    assert first is not None
    hours = ((meta.time_s / 3600.0 + hour0) % HOURS).astype(np.int64)
    covered = np.bincount(hours, minlength=HOURS).astype(np.float64) * meta.step_s
    return Observed(
        step_s=meta.step_s,
        start_s=float(meta.time_s[0]),
        end_s=float(meta.time_s[-1]),
        hour0_h=hour0,
        nodes=int(first.node_names.size),
        gpus_per_node=int(np.bincount(first.node).max()) if first.node.size else 0,
        models=Counter(first.model.tolist()),
        occupancy=busy_share / meta.steps,
        jobs=jobs,
        covered_s=covered,
        budget_steps=_budget_steps(meta.time_s - meta.time_s[0], meta.budget_w),
    )


def _hour0(time_base: str, scenario: Any) -> float:
    if time_base != "twin":
        return 0.0  # Unix seconds: hour 0 is midnight UTC
    phases = scenario.get("phases") if isinstance(scenario, dict) else None
    return float(phases.get("day_start_h", 0.0)) if isinstance(phases, dict) else 0.0


def _budget_steps(t_s: FloatArray, budget_w: FloatArray) -> list[tuple[float, float]]:
    """(seconds from the start, watts) where the budget changes (by over a watt)."""
    steps: list[tuple[float, float]] = []
    for t, w in zip(t_s.tolist(), budget_w.tolist(), strict=True):
        if math.isfinite(w) and (not steps or abs(w - steps[-1][1]) > 1.0):
            steps.append((round(t, 1), round(w, 1)))
    if len(steps) > MAX_BUDGET_STEPS:  # a budget that follows a signal: its median instead
        finite = budget_w[np.isfinite(budget_w)]
        return [(0.0, round(float(np.median(finite)), 1))]
    return steps


# -- the fits -----------------------------------------------------------------------------------


@dataclass
class JobFit:
    arrivals_per_h: list[float]
    sizes: list[list[float]]
    durations: list[list[float]]
    arrived: int
    censored: int
    seen: int


def fit_jobs(obs: Observed) -> JobFit:
    """Arrivals by hour of day, sizes and durations of the jobs the trace saw."""
    first = np.asarray(obs.jobs.first_s, dtype=np.float64)
    last = np.asarray(obs.jobs.last_s, dtype=np.float64)
    gpus = np.asarray(obs.jobs.gpus, dtype=np.int64)
    arrived = first > obs.start_s + obs.step_s / 2
    if not arrived.any():
        raise BadInputError(
            "the trace shows no job starting after its first step: nothing to fit arrivals, "
            "sizes or durations from (a longer trace, or one whose jobs carry ids)"
        )
    hours = ((first[arrived] / 3600.0 + obs.hour0_h) % HOURS).astype(np.int64)
    counts = np.bincount(hours, minlength=HOURS).astype(np.float64)
    covered_h = obs.covered_s / 3600.0
    seen = covered_h > 0
    per_h = np.full(HOURS, counts[seen].sum() / covered_h[seen].sum())
    per_h[seen] = counts[seen] / covered_h[seen]
    size_of = gpus[arrived] if arrived.sum() >= MIN_ARRIVALS else gpus
    sizes, shares = np.unique(size_of, return_counts=True)
    duration = last[arrived] - first[arrived] + obs.step_s
    censored = last[arrived] >= obs.end_s - obs.step_s / 2
    return JobFit(
        arrivals_per_h=[round(float(v), 3) for v in per_h],
        sizes=[
            [int(s), round(float(c) / size_of.size, 4)] for s, c in zip(sizes, shares, strict=True)
        ],
        durations=duration_table(duration, censored),
        arrived=int(arrived.sum()),
        censored=int(censored.sum()),
        seen=int(first.size),
    )


def kaplan_meier(
    duration_s: FloatArray, censored: npt.NDArray[np.bool_]
) -> tuple[FloatArray, FloatArray]:
    """(times, share ended by then) at each distinct duration of an ended job."""
    order = np.argsort(duration_s, kind="stable")
    d, ended = duration_s[order], ~censored[order]
    times, first = np.unique(d, return_index=True)
    at_risk = d.size - first
    deaths = np.add.reduceat(ended.astype(np.float64), first)
    survival = np.cumprod(1.0 - deaths / at_risk)
    keep = deaths > 0
    return times[keep], np.asarray(1.0 - survival[keep], dtype=np.float64)


def duration_table(duration_s: FloatArray, censored: npt.NDArray[np.bool_]) -> list[list[float]]:
    """[seconds, share of jobs at most that long] points, ending at share 1 (see the module)."""
    times, cdf = kaplan_meier(duration_s, censored)
    if times.size == 0:  # every job outlasted the trace
        longest = float(duration_s.max())
        return [[round(longest, 1), 0.0], [round(2 * longest, 1), 1.0]]
    levels = np.linspace(0.0, 1.0, DURATION_POINTS + 1)[1:]
    reached = levels[levels <= cdf[-1] + 1e-12]
    idx = np.minimum(np.searchsorted(cdf, reached - 1e-12), times.size - 1)
    points = {round(float(times[0]), 1): 0.0}
    for i in idx.tolist():
        points[round(float(times[i]), 1)] = round(float(cdf[i]), 4)
    longest = float(duration_s.max())
    top = max(points)
    if points[top] < 1.0:  # jobs outlasting everything that ended: up to twice the longest seen
        points[round(max(2 * longest, 1.5 * top), 1)] = 1.0
    pairs = sorted(points.items())
    shares = np.maximum.accumulate([p for _, p in pairs])
    shares[-1] = 1.0
    return [[s, float(p)] for (s, _), p in zip(pairs, shares, strict=True)]


# -- the scenario -------------------------------------------------------------------------------


@dataclass
class Calibration:
    scenario: dict[str, Any]
    curves_file: Path | None
    notes: list[str]
    fit: JobFit
    observed: Observed


def calibrate(trace: Path, output: Path, config: Config, learn_curves: bool = True) -> Calibration:
    """Fit a scenario to the trace and write it to `output` (its learned curves beside it)."""
    reader = TraceReader(trace)
    obs = observe_trace(reader)
    fit = fit_jobs(obs)
    notes: list[str] = []
    model_name, _ = obs.models.most_common(1)[0]
    model = find_model(model_name)
    if model is None:
        raise BadInputError(
            f"trace {trace}: GPU model {model_name!r} is not one the twin plays "
            "(agent/core/gpu_models.py)"
        )
    if len(obs.models) > 1:
        others = ", ".join(f"{n} x {m}" for m, n in obs.models.items() if m != model_name)
        notes.append(f"the twin plays one GPU model, {model.name}; also seen: {others}")
    twin: dict[str, Any] = {
        "nodes": obs.nodes,
        "gpus_per_node": obs.gpus_per_node,
        "model": model.name,
        "occupancy": round(min(obs.occupancy, 1.0), 4),
        "multi_node": max(s for s, _ in fit.sizes) > obs.gpus_per_node,
    }
    data: dict[str, Any] = {
        "twin": twin,
        "jobs": {
            "sizes": fit.sizes,
            "durations": fit.durations,
            "arrivals_per_h": fit.arrivals_per_h,
        },
    }
    curves_file = None
    if learn_curves:
        curves_file, workloads = _curves(reader, config, output, (obs, model.name), notes)
        if workloads:
            data["workloads"] = workloads
            twin["workload_label"] = "mix" in workloads
    if obs.budget_steps:
        data["budget"] = {"steps": [list(s) for s in obs.budget_steps]}
    text = _header(trace, obs, fit, notes) + dumps_toml(data)
    tomllib.loads(text)  # what is written reads back
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise BadInputError(f"-o {output}: cannot write ({exc.strerror or exc})") from None
    return Calibration(data, curves_file, notes, fit, obs)


def _curves(
    reader: TraceReader,
    config: Config,
    output: Path,
    seen: tuple[Observed, str],
    notes: list[str],
) -> tuple[Path | None, dict[str, Any]]:
    """The learned curves of the twin's GPU model beside the scenario, and its [workloads]
    section ({}: none learned)."""
    obs, model = seen
    result = export_rows(learn_from_trace(reader, config))
    notes.extend(result.notes)
    rows = [r for r in result.rows if r.gpu_model == model]
    if not rows:
        notes.append("no curve learned: the twin plays its built-in workloads")
        return None, {}
    path = output.with_name(f"{output.stem}.curves.csv")
    try:
        write_curves(path, rows)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    section: dict[str, Any] = {"curves": path.name}
    learned = {r.workload for r in rows}
    labelled = Counter(w for w in obs.jobs.workload if w in learned)
    if labelled:
        total = sum(labelled.values())
        section["mix"] = {w: round(n / total, 4) for w, n in sorted(labelled.items())}
    return path, section


def _header(trace: Path, obs: Observed, fit: JobFit, notes: list[str]) -> str:
    lines = [
        f"# Fitted by `ooda sim calibrate` from {trace} ({(obs.end_s - obs.start_s) / 3600:.1f} h,",
        f"# {obs.nodes} nodes): {fit.seen} jobs seen, {fit.arrived} arrived within it "
        f"({fit.censored} still running at its end).",
        "# agent/replay/calibrate.py says how each figure is fitted.",
        *(f"# note: {n}" for n in notes),
        "",
    ]
    return "\n".join(lines) + "\n"


def dumps_toml(data: dict[str, dict[str, Any]]) -> str:
    """A scenario's tables as TOML (strings, numbers, booleans, lists, inline tables)."""
    out = []
    for section, table in data.items():
        out.append(f"[{section}]")
        out.extend(f"{_key(k)} = {_value(v)}" for k, v in table.items())
        out.append("")
    return "\n".join(out)


def _key(key: str) -> str:
    return (
        key
        if key.replace("_", "").replace("-", "").isalnum() and key.isascii()
        else json.dumps(key)
    )


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"not a finite number: {value}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {type(value).__name__}")
