"""Measured power curves: a CSV of power-limit sweeps in, the twin's workload classes out (and
the same format written back, for the curves the agent learned).

One row per (workload, GPU model, power limit), as Zeus-style or DCGM profiling produces:

    workload,gpu_model,power_limit_w,throughput,power_w[,time_s,energy_j]
    resnet50,H100,700,1510.2,612.4
    resnet50,H100,600,1503.9,581.0

Lines starting with `#` are comments (a file says where its figures come from).
`throughput` is in any unit, per workload (samples/s, tokens/s, 1/epoch time); `power_w` is the
average draw at that limit. The learned-curves export adds `throughput_lo`, `throughput_hi`
(the learner's interval), `confidence` and `jobs`; readers accept them.

Reading is bounded: at most MAX_FILE_BYTES and MAX_ROWS rows, fields of at most MAX_FIELD_CHARS.
A malformed file is refused with its line and column. A curve the physics rejects is left out,
and each one left out is explained (`CurveFile.problems`):

- fewer than MIN_LIMITS power limits, or fewer than two limits that bind (then the share of its
  throughput a cap costs cannot be fitted; a curve whose draw never reaches a limit is
  insensitive to caps, which is fine);
- the draw falls as the limit rises, or the throughput does (a higher limit never slows a job
  down), beyond the measurement noise MONOTONE_TOL_FRAC;
- the average draw above its limit (a limiter holds its limit);
- a fit of the curve family (agent.core.curves) that misses the points by more than MAX_FIT_RMS.

A kept curve becomes a workload class (agent/sim/calibration.py's kind): its natural draw is the
draw at the highest limit, x = power / natural draw and T = throughput / throughput there, a and
b the family's least-squares fit, and its cap-draw share the median draw / limit over the limits
that hold the draw (it sits within HELD_FRAC of them).
"""

from __future__ import annotations

import csv
import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path

import numpy as np

from agent.core.curves import MIN_EXPONENT, FamilyFit, fit_family
from agent.core.errors import BadInputError
from agent.core.gpu_models import GpuModel, find_model
from agent.sim.calibration import WorkloadClass

MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_ROWS = 200_000
MAX_FIELD_CHARS = 256
MIN_LIMITS = 3
MONOTONE_TOL_FRAC = 0.03  # measurement noise allowed against monotony (share of the value)
MONOTONE_TOL_W = 5.0  # ... and of a draw, in watts
OVER_LIMIT_TOL_FRAC = 0.05
MAX_FIT_RMS = 0.05  # the family may miss a measured curve by this much relative throughput
BINDING_FRAC = 0.97  # a limit binds where the draw is under this share of the natural draw
DEFAULT_CAP_DRAW_FRAC = 0.95  # a curve measured with no binding limit: the usual share
HELD_FRAC = 0.8  # a limit holds the draw where the draw is at least this share of it
MEASURED_SPREAD_FRAC = 0.02  # jobs of a measured workload differ this much in natural draw
DEFAULT_MEM_UTIL_PCT = 40.0

REQUIRED = ("workload", "gpu_model", "power_limit_w", "throughput", "power_w")
OPTIONAL = ("time_s", "energy_j", "throughput_lo", "throughput_hi", "confidence", "jobs")
_NUMERIC = ("power_limit_w", "throughput", "power_w", *OPTIONAL)
_POSITIVE = ("power_limit_w", "power_w", "time_s", "energy_j")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/+ -]*$")


@dataclass(frozen=True, slots=True)
class Point:
    line: int
    power_limit_w: float
    throughput: float
    power_w: float


@dataclass(frozen=True, slots=True)
class MeasuredCurve:
    """One workload's sweep on one GPU model, fitted to the curve family."""

    workload: str
    gpu_model: str
    natural_w: float  # the draw at the highest limit
    a: float
    b: float
    cap_draw_frac: float
    rms: float
    points: tuple[Point, ...]
    note: str = ""  # something to know about it (kept all the same)

    def workload_class(self, model: GpuModel) -> WorkloadClass:
        """The twin's workload class for this curve on `model` (its natural draw as a share of
        the model's maximum limit, jobs within MEASURED_SPREAD_FRAC of it)."""
        frac = min(self.natural_w / model.max_cap_w, 0.98)
        return WorkloadClass(
            name=self.workload,
            natural_frac=frac,
            natural_frac_lo=frac * (1.0 - MEASURED_SPREAD_FRAC),
            natural_frac_hi=min(frac * (1.0 + MEASURED_SPREAD_FRAC), 0.99),
            a=self.a,
            b=self.b,
            cap_draw_frac=self.cap_draw_frac,
            mem_util_pct=DEFAULT_MEM_UTIL_PCT,
            zeus_workload=f"measured:{self.gpu_model}",
        )


@dataclass(frozen=True, slots=True)
class CurveFile:
    path: str
    rows: int
    curves: tuple[MeasuredCurve, ...]
    problems: tuple[str, ...] = ()  # one line per curve left out, saying why

    def for_model(self, model: GpuModel) -> list[MeasuredCurve]:
        return [c for c in self.curves if find_model(c.gpu_model) is model]

    def workload_classes(self, model: GpuModel) -> tuple[WorkloadClass, ...]:
        """The kept curves of `model` as twin workload classes; refused when there are none."""
        mine = self.for_model(model)
        if not mine:
            models = sorted({c.gpu_model for c in self.curves}) or ["none usable"]
            raise BadInputError(
                f"curves {self.path}: no usable curve for GPU model {model.name} "
                f"(the file's models: {', '.join(models)})"
            )
        return tuple(c.workload_class(model) for c in mine)


# -- reading ------------------------------------------------------------------------------------


def read_curves(path: Path) -> CurveFile:
    """The curves of a measured-curves CSV (bounded; refused with line and column when bad)."""
    where = f"curves {path}"
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadInputError(f"{where}: cannot read ({exc.strerror or exc})") from None
    if size > MAX_FILE_BYTES:
        raise BadInputError(f"{where}: {size} bytes, more than the {MAX_FILE_BYTES} allowed")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{where}: cannot read as UTF-8 text ({exc})") from None
    return parse_curves(text.splitlines(), where)


def parse_curves(lines: Sequence[str], where: str) -> CurveFile:
    """Parse the lines of a curves CSV (`where` names it in errors)."""
    if len(lines) > MAX_ROWS + 1:
        raise BadInputError(f"{where}: {len(lines) - 1} rows, more than the {MAX_ROWS} allowed")
    # Comments out, line numbers kept (errors name the file's own lines).
    numbered = [(i + 1, text) for i, text in enumerate(lines) if not text.lstrip().startswith("#")]
    if not numbered:
        raise BadInputError(f"{where}: empty (the first line that is no comment is the header)")
    header_line, header_text = numbered[0]
    header = [h.strip() for h in _fields(header_text, header_line, where)]
    columns = _columns(header, header_line, where)
    groups: dict[tuple[str, str], list[Point]] = {}
    seen: dict[tuple[str, str, float], int] = {}
    for line, text in numbered[1:]:
        row = _fields(text, line, where)
        if not row or all(not cell.strip() for cell in row):
            continue
        workload, model, point = _row(row, columns, line, where)
        key = (workload, model, point.power_limit_w)
        if key in seen:
            raise BadInputError(
                f"{where}, line {line}, column 'power_limit_w': {workload} on {model} at "
                f"{point.power_limit_w:g} W again (first on line {seen[key]})"
            )
        seen[key] = line
        groups.setdefault((workload, model), []).append(point)
    if not groups:
        raise BadInputError(f"{where}: no rows after the header")
    curves: list[MeasuredCurve] = []
    problems: list[str] = []
    for (workload, model), points in groups.items():
        curve, problem = fit_curve(workload, model, points)
        if curve is not None:
            curves.append(curve)
        else:
            problems.append(f"{workload} on {model} left out: {problem}")
    return CurveFile(where.removeprefix("curves "), len(seen), tuple(curves), tuple(problems))


def _fields(text: str, line: int, where: str) -> list[str]:
    """One line's fields (a row is one line: a quoted field may not span lines)."""
    try:
        return next(csv.reader([text], strict=True), [])
    except csv.Error as exc:
        raise BadInputError(f"{where}, line {line}: not CSV ({exc})") from None


def _columns(header: list[str], line: int, where: str) -> dict[str, int]:
    for i, name in enumerate(header):
        if name not in REQUIRED and name not in OPTIONAL:
            known = ", ".join((*REQUIRED, *OPTIONAL))
            raise BadInputError(
                f"{where}, line {line}, column {i + 1}: unknown column {name!r} (known: {known})"
            )
    missing = [name for name in REQUIRED if name not in header]
    if missing:
        raise BadInputError(f"{where}, line {line}: missing column {missing[0]!r}")
    if len(set(header)) != len(header):
        twice = next(h for h in header if header.count(h) > 1)
        raise BadInputError(f"{where}, line {line}: column {twice!r} twice")
    return {name: i for i, name in enumerate(header)}


def _row(row: list[str], columns: dict[str, int], line: int, where: str) -> tuple[str, str, Point]:
    if len(row) != len(columns):
        raise BadInputError(
            f"{where}, line {line}: {len(row)} fields, the header has {len(columns)}"
        )
    for name, i in columns.items():
        if len(row[i]) > MAX_FIELD_CHARS:
            raise BadInputError(
                f"{where}, line {line}, column {name!r}: longer than {MAX_FIELD_CHARS} characters"
            )
    names = [row[columns[name]].strip() for name in ("workload", "gpu_model")]
    for name, value in zip(("workload", "gpu_model"), names, strict=True):
        if not _NAME.match(value):
            raise BadInputError(
                f"{where}, line {line}, column {name!r}: {value!r} is not a name "
                "(letters, digits and _ . : / + - or spaces)"
            )
    values = {
        name: _number(row[columns[name]], name, line, where) for name in _NUMERIC if name in columns
    }
    return (
        names[0],
        names[1],
        Point(line, values["power_limit_w"], values["throughput"], values["power_w"]),
    )


def _number(text: str, name: str, line: int, where: str) -> float:
    cell = text.strip()
    if cell == "" and name in OPTIONAL:
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        raise BadInputError(
            f"{where}, line {line}, column {name!r}: not a number ({cell!r})"
        ) from None
    if not math.isfinite(value):
        raise BadInputError(f"{where}, line {line}, column {name!r}: not finite ({cell!r})")
    if name in _POSITIVE and value <= 0:
        raise BadInputError(f"{where}, line {line}, column {name!r}: must be positive ({cell})")
    if value < 0:
        raise BadInputError(f"{where}, line {line}, column {name!r}: negative ({cell})")
    return value


# -- the physics' checks and the fit --------------------------------------------------------------


def fit_curve(
    workload: str, model: str, points: Iterable[Point]
) -> tuple[MeasuredCurve | None, str]:
    """The fitted curve, or None and why it cannot be used."""
    pts = tuple(sorted(points, key=lambda p: p.power_limit_w))
    if len(pts) < MIN_LIMITS:
        return None, f"{len(pts)} power limits, at least {MIN_LIMITS} needed"
    problem = _physics(pts)
    if problem:
        return None, problem
    limit = np.array([p.power_limit_w for p in pts])
    power = np.array([p.power_w for p in pts])
    tput = np.array([p.throughput for p in pts])
    natural, top = float(power[-1]), float(tput[-1])
    if top <= 0:
        return None, f"no throughput at its highest limit (line {pts[-1].line})"
    share, rel = power / natural, tput / top
    binding = share < BINDING_FRAC
    note = ""
    if power[-1] >= BINDING_FRAC * limit[-1]:
        note = "its highest limit still binds: its natural draw is taken as the draw there"
    if binding.sum() >= 1 and binding.sum() < 2:
        return None, "one limit binds, at least two needed to fit what a cap costs it"
    if binding.any():
        fit = fit_family(share, rel)
    else:  # its draw never reaches a limit: caps cost it nothing
        fit = FamilyFit(0.0, MIN_EXPONENT, float(np.sqrt(np.mean((rel - 1.0) ** 2))), 0)
    if fit.rms > MAX_FIT_RMS:
        return None, (
            f"the curve family misses it by {fit.rms:.3f} relative throughput (rms), more than "
            f"{MAX_FIT_RMS}: the twin cannot play it faithfully"
        )
    # The cap-draw share from the limits that hold the draw (it sits near the limit).
    held = binding & (power >= HELD_FRAC * limit)
    k = float(np.median(power[held] / limit[held])) if held.any() else DEFAULT_CAP_DRAW_FRAC
    curve = MeasuredCurve(workload, model, natural, fit.a, fit.b, min(k, 1.0), fit.rms, pts, note)
    return curve, ""


def _physics(pts: tuple[Point, ...]) -> str:
    """Why the sweep cannot be physical, or "" (monotone within noise, no draw over a limit)."""
    for lo, hi in itertools.pairwise(pts):
        if hi.power_w < lo.power_w - max(MONOTONE_TOL_FRAC * lo.power_w, MONOTONE_TOL_W):
            return (
                f"its draw falls from {lo.power_w:g} W at {lo.power_limit_w:g} W (line "
                f"{lo.line}) to {hi.power_w:g} W at {hi.power_limit_w:g} W (line {hi.line}): a "
                "higher limit never makes a job draw less"
            )
        if hi.throughput < lo.throughput * (1.0 - MONOTONE_TOL_FRAC):
            return (
                f"its throughput falls from {lo.throughput:g} (line {lo.line}) to "
                f"{hi.throughput:g} (line {hi.line}) as the limit rises: a higher limit never "
                "slows a job down"
            )
    for p in pts:
        if p.power_w > p.power_limit_w * (1.0 + OVER_LIMIT_TOL_FRAC) + MONOTONE_TOL_W:
            return (
                f"it draws {p.power_w:g} W under a {p.power_limit_w:g} W limit (line {p.line}): "
                "a limiter holds its limit"
            )
    return ""


# -- writing ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CurveRow:
    workload: str
    gpu_model: str
    power_limit_w: float
    throughput: float
    power_w: float
    throughput_lo: float = math.nan
    throughput_hi: float = math.nan
    confidence: float = math.nan
    jobs: float = math.nan


EXPORT_COLUMNS = tuple(f.name for f in fields(CurveRow))


def write_curves(path: Path, rows: Sequence[CurveRow]) -> None:
    """Write rows in the measured-curves format (with the export's interval columns)."""

    def cell(value: float) -> str:
        return "" if math.isnan(value) else f"{value:.6g}"

    with path.open("w", encoding="utf-8", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(EXPORT_COLUMNS)
        for r in rows:  # CurveRow's fields are EXPORT_COLUMNS, in their order
            out.writerow([r.workload, r.gpu_model, *(cell(v) for v in astuple(r)[2:])])


@dataclass
class CurveSet:
    """Workload classes for a twin, from a curves file (what a scenario or --curves gives)."""

    workloads: tuple[WorkloadClass, ...]
    notes: list[str] = field(default_factory=list)


def curve_set(path: Path, model: GpuModel) -> CurveSet:
    """The workload classes a curves file gives a twin of `model`, and what was left out."""
    parsed = read_curves(path)
    notes = list(parsed.problems)
    notes.extend(
        f"{c.workload} on {c.gpu_model}: {c.note}" for c in parsed.for_model(model) if c.note
    )
    return CurveSet(parsed.workload_classes(model), notes)
