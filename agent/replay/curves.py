"""Learned curves out (`ooda curves export`): what the agent learned of each workload's power
curve, in the measured-curves format (agent/sim/measured.py) with the learner's intervals, so
that a twin can be built from what the agent saw on a real cluster.

The curves come from orient's curve learner, either run over a trace (every step at the trace's
own interval, as the live loop would have seen it) or loaded from a daemon's state file. Each
workload class on each GPU model becomes one curve: the mean of its ended jobs' curves, weighted
by their confidence, at limits from the model's lowest to its highest; `throughput` is relative
(1 at its natural draw), `power_w` what it draws there (its natural draw, or its cap-draw share
of the limit); `throughput_lo`/`throughput_hi` are two standard deviations of the learner's
uncertainty either side: its jobs' curves' spread plus their own posterior spread
(agent/orient/curvefit.py), taken where the jobs' natural draws and cap-draw shares, two of their
standard deviations away, put the limit's share of the natural draw lowest and highest.
A class's name is its `workload` label where telemetry carried one, else its signature
(`s:m<memory-copy utilization / 10>n<natural draw / max limit x 10>`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.assembly import orienter_for
from agent.config import Config
from agent.core.curves import throughput_at_power
from agent.core.errors import BadInputError
from agent.core.gpu_models import find_model
from agent.core.snapshot import screen_implausible
from agent.observe.trace import TraceReader
from agent.orient.curvefit import ClassCurve, CurveLearner
from agent.sim.measured import DEFAULT_CAP_DRAW_FRAC, CurveRow

LIMIT_STEPS = 8  # limits per curve, the model's lowest to its highest
MAX_STATE_BYTES = 512 * 1024 * 1024
LEARN_EVERY_S = 15.0  # orient over a step this often (the live loop's interval)


@dataclass
class Export:
    rows: list[CurveRow]
    curves: int
    notes: list[str] = field(default_factory=list)


def curve_config(config: Config) -> Config:
    """The config with orient lean for learning curves: no forecasts (nothing here reads them),
    the curve learner every cycle."""
    orient = config.orient.model_copy(
        update={
            "forecast": config.orient.forecast.model_copy(update={"enabled": False}),
            "slow_models_every_cycles": 1,
        }
    )
    lean = config.model_copy(update={"orient": orient})
    lean.policy_settings = config.policy_settings
    return lean


def learn_from_trace(
    reader: TraceReader,
    config: Config,
    every_s: float = LEARN_EVERY_S,
    progress: Callable[[int], None] | None = None,
) -> CurveLearner:
    """Orient over the trace (a step every `every_s`), then every job's curve ended."""
    orienter = orienter_for(curve_config(config))
    stride = max(1, round(every_s / reader.meta.step_s))
    for j, snap in enumerate(reader.snapshots()):
        if j % stride == 0:
            orienter.orient(screen_implausible(snap), snap.budget_w)
        if progress is not None:
            progress(1)
    orienter.curves.finish_all()
    return orienter.curves


def state_file(state_dir: Path, cluster: str | None) -> Path:
    """The daemon's state file in `state_dir` (`<cluster>.state.json`; the only one, if no
    cluster is named)."""
    if not state_dir.is_dir():
        raise BadInputError(f"--state-dir {state_dir}: no such directory")
    found = sorted(state_dir.glob("*.state.json"))
    if cluster is not None:
        found = [p for p in found if p.name == f"{cluster}.state.json"]
    if len(found) != 1:
        names = ", ".join(p.name.removesuffix(".state.json") for p in found) or "none"
        raise BadInputError(
            f"--state-dir {state_dir}: {len(found)} state files match (clusters: {names}); "
            "name one with --cluster"
        )
    return found[0]


def learner_from_state(path: Path) -> CurveLearner:
    """The curve learner a daemon's state file holds (read only: the file is left as it is),
    every job's curve ended."""
    try:
        size = path.stat().st_size
        if size > MAX_STATE_BYTES:
            raise BadInputError(f"state {path}: {size} bytes, more than {MAX_STATE_BYTES}")
        document = json.loads(path.read_bytes())
    except OSError as exc:
        raise BadInputError(f"state {path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(f"state {path}: not valid JSON ({exc})") from None
    curves = _dig(document, ("parts", "orienter", "curves"))
    if curves is None:
        raise BadInputError(f"state {path}: no learned curves (parts.orienter.curves)")
    learner = CurveLearner()
    try:
        learner.load_dict(curves)
    except (ValueError, TypeError, KeyError) as exc:
        raise BadInputError(f"state {path}: its learned curves do not load ({exc})") from None
    learner.finish_all()
    return learner


def _dig(document: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(document, dict) or key not in document:
            return None
        document = document[key]
    return document


def export_rows(learner: CurveLearner, steps: int = LIMIT_STEPS) -> Export:
    """Each class's learned curve as measured-curves rows (with its interval)."""
    rows: list[CurveRow] = []
    notes: list[str] = []
    kept = 0
    for curve in learner.class_curves():
        made, note = _curve_rows(curve, steps)
        rows.extend(made)
        kept += bool(made)
        if note:
            notes.append(note)
    for model, klass, jobs in learner.unlearned_classes():
        notes.append(
            f"{workload_name(klass)} on {model}: not learned ({jobs} jobs, none seen long "
            "enough under a binding cap)"
        )
    return Export(rows, kept, notes)


def workload_name(klass: str) -> str:
    """A class as a workload name: its label (without the learner's `w:`), or its signature."""
    return klass[2:] if klass.startswith("w:") else klass


def _curve_rows(curve: ClassCurve, steps: int) -> tuple[list[CurveRow], str]:
    name = workload_name(curve.klass)
    model = find_model(curve.model)
    if model is None:
        return [], f"{name} on {curve.model}: not a GPU model ooda knows the limits of"
    if not math.isfinite(curve.natural_w):
        return [], f"{name} on {model.name}: its natural draw was never seen"
    k = curve.cap_draw_frac if math.isfinite(curve.cap_draw_frac) else DEFAULT_CAP_DRAW_FRAC
    limits = np.unique(np.round(np.linspace(model.min_cap_w, model.max_cap_w, steps)))
    power = np.minimum(curve.natural_w, k * limits)
    tput = throughput_at_power(power, curve.natural_w, math.exp(curve.log_a), curve.b)
    # The share of its natural draw a job of this class gets at each limit, at the ends of its
    # jobs' spread (a high natural draw and a low cap-draw share: the least).
    nat_hi = curve.natural_w + 2.0 * curve.natural_sd_w
    nat_lo = max(curve.natural_w - 2.0 * curve.natural_sd_w, 1e-9)
    k_lo, k_hi = k - 2.0 * curve.cap_draw_sd, k + 2.0 * curve.cap_draw_sd
    lo, _ = curve.interval(np.minimum(nat_hi, k_lo * limits) / nat_hi)
    _, hi = curve.interval(np.minimum(nat_lo, k_hi * limits) / nat_lo)
    rows = [
        CurveRow(
            workload=name,
            gpu_model=model.name,
            power_limit_w=float(limits[i]),
            throughput=float(tput[i]),
            power_w=float(power[i]),
            throughput_lo=float(lo[i]),
            throughput_hi=float(hi[i]),
            confidence=curve.confidence,
            jobs=float(curve.jobs),
        )
        for i in range(limits.size)
    ]
    note = (
        ""
        if math.isfinite(curve.cap_draw_frac)
        else (
            f"{name} on {model.name}: never seen under a binding cap; its cap-draw share is "
            f"assumed ({DEFAULT_CAP_DRAW_FRAC})"
        )
    )
    return rows, note
