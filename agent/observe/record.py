"""Recording a trace from Prometheus: range queries over [start, end] at a fixed step, in chunks
sized so memory stays flat, written block by block.

Per chunk, two aggregated range queries (plus the budget's, when configured):
`max by (host, gpu, UUID, modelName, job, extra labels) (timestamp(POWER))` gives, at every step,
each live GPU's newest sample time, job and extra labels (a stale GPU keeps its last ones);
`max by (__name__, host, gpu) ({__name__=~"..."})` gives every field. A GPU seen before (in
this chunk or within the inventory window before it) but not live at a step is stale there,
with the age of its last sample, as `PrometheusSource` would have said.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from agent.core.dcgm import FIELD_BY_METRIC
from agent.core.snapshot import Metric
from agent.observe import promql
from agent.observe.prometheus import (
    Matrix,
    PrometheusSource,
    first_per_key,
    lookup,
    usable_budget,
)
from agent.observe.trace import GPU_INDEX_MAX, TraceBlock

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
StrArray = npt.NDArray[np.str_]

MAX_POINTS = 2_000_000  # points per range query answer (JSON of about 60 MB)
MAX_STEPS = 11_000  # Prometheus refuses more points per series


@dataclass
class _Seen:
    """What the recorder remembers of GPUs between chunks."""

    key: StrArray
    host: StrArray
    gpu: IntArray
    uuid: StrArray
    model: StrArray
    last_s: FloatArray  # newest sample time
    labels: dict[str, StrArray]  # the settings' extra labels, as last seen


class BlockSink(Protocol):
    """Where recorded blocks go: a TraceWriter, or anything that books them as they come (the
    meter's backfill)."""

    def write_block(self, block: TraceBlock) -> None: ...


@dataclass(frozen=True)
class RecordStats:
    steps: int
    chunks: int
    queries: int
    gpus: int  # the most GPUs in one chunk
    query_s: float


def record_prometheus(
    source: PrometheusSource,
    writer: BlockSink,
    *,
    start_s: float,
    end_s: float,
    step_s: float,
    max_points: int = MAX_POINTS,
    progress: Callable[[float], None] | None = None,
) -> RecordStats:
    """Record [start_s, end_s] (Unix seconds; aligned to multiples of the step) into `writer`."""
    if step_s < 1 or not float(step_s).is_integer():
        raise ValueError("the step must be a whole number of seconds")
    if not (math.isfinite(start_s) and math.isfinite(end_s)):  # no step is aligned to NaN or inf
        raise ValueError(f"start and end must be finite Unix seconds (got {start_s}, {end_s})")
    first = math.ceil(start_s / step_s) * step_s
    last = math.floor(end_s / step_s) * step_s
    if last < first:
        raise ValueError("the range holds no step")
    s = source.settings
    names = list(source.value_metrics)
    ident = source.ident
    live_labels = [*ident, s.uuid_label, s.model_label, s.job_label, *s.extra_labels]
    hb = promql.selector(source.heartbeat, s.match)
    live_expr = f"max {promql.by(live_labels)} (timestamp({hb}))"
    vals_expr = f"max {promql.by(['__name__', *ident])} ({promql.name_selector(names, s.match)})"
    none = np.zeros(0, dtype=np.str_)
    seen = _Seen(
        none, none, np.zeros(0, dtype=np.int64), none, none, np.zeros(0),
        {x: none for x in s.extra_labels},
    )  # fmt: skip
    chunk = min(60, MAX_STEPS)  # small at first, then sized from the fleet seen
    t0 = first
    chunks = most = 0
    source.queries, source.query_s = 0, 0.0
    while t0 <= last:
        t1 = min(last, t0 + (chunk - 1) * step_s)
        times = np.arange(t0, t1 + step_s / 2, step_s)

        def query(expr: str, t_start: float = t0, t_end: float = t1) -> list[dict[str, Any]]:
            return source.query_range(expr, t_start, t_end, step_s)

        live = Matrix.parse(query(live_expr), live_labels)
        vals = Matrix.parse(query(vals_expr), ["__name__", *ident])
        budget = np.full(times.size, np.nan)
        if s.budget_query:
            answer = Matrix.parse(query(s.budget_query), [])
            if np.unique(answer.series).size == 1:  # one budget signal, or none recorded
                budget[_step_index(answer.t_s, t0, step_s)] = answer.values
            # What the live source would refuse (0 W, negative) is recorded as no budget.
            budget[~usable_budget(budget)] = np.nan
        block, seen = _block(source, times, t0, step_s, live, vals, seen, budget)
        writer.write_block(block)
        most = max(most, block.n_gpus)
        chunks += 1
        if progress is not None:
            progress((t1 - first + step_s) / (last - first + step_s))
        per_step = max(1, block.n_gpus * (len(names) + 1))
        chunk = int(max(1, min(MAX_STEPS, max_points // per_step)))
        t0 = t1 + step_s
    steps = round((last - first) / step_s) + 1
    return RecordStats(
        steps=steps, chunks=chunks, queries=source.queries, gpus=most, query_s=source.query_s
    )


def _step_index(t: FloatArray, t0: float, step_s: float) -> IntArray:
    return np.rint((t - t0) / step_s).astype(np.int64)


def _block(
    source: PrometheusSource,
    times: FloatArray,
    t0: float,
    step_s: float,
    live: Matrix,
    vals: Matrix,
    seen: _Seen,
    budget: FloatArray,
) -> tuple[TraceBlock, _Seen]:
    s = source.settings
    nt = times.size
    window = s.inventory_window_s
    # Series -> GPU key; this chunk's GPUs are the live ones plus those seen recently before.
    s_key, s_host, s_gpu, s_ok = source.keys(live.labels)
    s_ok &= s_gpu <= GPU_INDEX_MAX  # an index the trace cannot hold: as unusable as none
    newest = np.full(s_key.size, -np.inf)
    np.maximum.at(newest, live.series, live.values)
    ok_rows = np.flatnonzero(s_ok)
    pick = ok_rows[first_per_key(s_key[ok_rows], newest[ok_rows])]
    carried = (seen.last_s >= t0 - window) & (lookup(s_key[pick], seen.key) < 0)
    key = np.concatenate([s_key[pick], seen.key[carried]])
    host = np.concatenate([s_host[pick], seen.host[carried]])
    gpu = np.concatenate([s_gpu[pick], seen.gpu[carried]])
    uuid = np.concatenate([live.labels[s.uuid_label][pick], seen.uuid[carried]])
    model = np.concatenate([live.labels[s.model_label][pick], seen.model[carried]])
    n = key.size

    # Sample times and jobs per (step, GPU).
    sample = np.full((nt, n), np.nan)
    job = np.full((nt, n), "", dtype=live.labels[s.job_label].dtype)
    col = np.where(s_ok, lookup(key, s_key), -1)[live.series]
    row = _step_index(live.t_s, t0, step_s)
    hit = (col >= 0) & (row >= 0) & (row < nt)
    order = np.argsort(live.values[hit], kind="stable")  # newest last: it wins the assignment
    r, c = row[hit][order], col[hit][order]
    sample[r, c] = live.values[hit][order]
    series = live.series[hit][order]
    job[r, c] = live.labels[s.job_label][series]
    labels: dict[str, StrArray] = {}
    if s.extra_labels:  # each GPU's last live step so far: the same for every label
        present = np.zeros((nt, n), dtype=bool)
        present[r, c] = True
        last_live = np.maximum.accumulate(np.where(present, np.arange(nt)[:, None], -1), axis=0)
    for x in s.extra_labels:
        before = np.concatenate([np.full(pick.size, "", dtype=np.str_), seen.labels[x][carried]])
        labels[x] = _carried_forward(live.labels[x][series], r, c, last_live, before)

    # Age: time since the newest sample so far (carried in from earlier chunks).
    prior = np.full(n, -np.inf)
    prev = lookup(seen.key, key)
    prior[prev >= 0] = seen.last_s[prev[prev >= 0]]
    running = np.maximum.accumulate(np.vstack([prior, np.nan_to_num(sample, nan=-np.inf)]), 0)[1:]
    age = np.where(np.isfinite(running), times[:, None] - running, np.nan)
    stale = np.isnan(sample) | ~(age <= s.staleness_limit_s)
    _moved_unseen(uuid, stale, age)

    values = _value_grids(source, vals, key, t0, step_s, nt, stale)
    job[stale] = ""

    last_s = running[-1] if nt else prior
    current = _Seen(
        key=key,
        host=host,
        gpu=gpu,
        uuid=uuid,
        model=model,
        last_s=last_s,
        labels={x: grid[-1] for x, grid in labels.items()},  # a chunk has a step
    )
    remembered = _remember(current, seen, since_s=times[-1] - window)
    block = TraceBlock(
        time_s=times,
        node=host,
        gpu=gpu,
        uuid=uuid,
        model=model,
        job=np.asarray(job, dtype=np.str_),
        values=values,
        age_s=age,
        stale=stale,
        labels=labels,
        budget_w=budget,
    )
    return block, remembered


def _value_grids(
    source: PrometheusSource,
    vals: Matrix,
    key: StrArray,
    t0: float,
    step_s: float,
    nt: int,
    stale: npt.NDArray[np.bool_],
) -> dict[Metric, FloatArray]:
    """Each value metric per (step, GPU) in the metric's unit; NaN where none or stale."""
    values: dict[Metric, FloatArray] = {}
    v_key, _, _, v_ok = source.keys(vals.labels)
    v_col = np.where(v_ok, lookup(key, v_key), -1)[vals.series]
    v_row = _step_index(vals.t_s, t0, step_s)
    v_name = vals.labels["__name__"][vals.series]
    inside = (v_col >= 0) & (v_row >= 0) & (v_row < nt)
    for name, metric in source.value_metrics.items():
        grid = np.full((nt, key.size), np.nan)
        h = inside & (v_name == name)
        grid[v_row[h], v_col[h]] = vals.values[h] * FIELD_BY_METRIC[metric].to_metric
        grid[stale] = np.nan
        values[metric] = grid
    return values


def _remember(current: _Seen, seen: _Seen, since_s: float) -> _Seen:
    """This chunk's GPUs and those remembered but absent from it, if seen since `since_s`."""
    keep = lookup(current.key, seen.key) < 0  # GPUs remembered but absent from this chunk

    def both(now: npt.NDArray[Any], before: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.concatenate([now, before[keep]])

    recent = both(current.last_s, seen.last_s) >= since_s
    return _Seen(
        key=both(current.key, seen.key)[recent],
        host=both(current.host, seen.host)[recent],
        gpu=both(current.gpu, seen.gpu)[recent],
        uuid=both(current.uuid, seen.uuid)[recent],
        model=both(current.model, seen.model)[recent],
        last_s=both(current.last_s, seen.last_s)[recent],
        labels={x: both(last, seen.labels[x])[recent] for x, last in current.labels.items()},
    )


def _moved_unseen(uuid: StrArray, stale: npt.NDArray[np.bool_], age: FloatArray) -> None:
    """A GPU that moved host (or whose host was renamed) has two keys: at a step where one is
    fresh, the other, stale, is the same GPU, not one more beside it (the live source drops it
    too): not seen there (age NaN, so the trace leaves it out of that step). In place."""
    named = np.flatnonzero(uuid != "")
    distinct, counts = np.unique(uuid[named], return_counts=True)
    for twice in distinct[counts > 1].tolist():  # moved GPUs: a handful, not the fleet
        cols = named[uuid[named] == twice]
        fresh_elsewhere = (~stale[:, cols]).any(axis=1)
        for col in cols.tolist():
            age[fresh_elsewhere & stale[:, col], col] = np.nan


def _carried_forward(
    values: StrArray, rows: IntArray, cols: IntArray, last_live: IntArray, before: StrArray
) -> StrArray:
    """A label per (step, GPU): the value of each GPU's live sample at a step, and where it has
    none (stale), its value at its last live step (`last_live`, -1: none yet), else `before`
    (what an earlier chunk saw), as the live source keeps a stale GPU's labels from its
    inventory."""
    grid = np.full(last_live.shape, "", dtype=np.result_type(values.dtype, before.dtype, np.str_))
    grid[rows, cols] = values
    at_last = grid[np.maximum(last_live, 0), np.arange(before.size)]
    return np.where(last_live >= 0, at_last, before[None, :])
