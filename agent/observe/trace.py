"""Trace files: fleet telemetry over time, columnar and compressed (Apache Parquet, long format).

The format is documented in docs/trace-format.md. In short: one row per (step, GPU); row groups
hold whole chunks of steps, and inside a row group the rows are sorted by GPU, then time, every GPU
of the chunk having one row per step (a "rectangular" block, so a reader reshapes each column to
GPUs x steps without sorting). Missing values are Parquet nulls, never 0. Power fields are stored
as integer milliwatts and energy as integer millijoules (what NVML and DCGM report); other fields
as float32. Strings are dictionary-encoded. Fleet-level data per step (time, budget) and the
source's description (for a twin: the scenario, faults included) are in the file's key-value
metadata. Pages carry CRC checksums, verified on read.

`TraceWriter` appends Snapshots (or whole blocks) and keeps at most one row group in memory;
`TraceReader` streams blocks and Snapshots back, and is itself a TelemetrySource stepping through
the trace's time. Every problem with a file raises TraceError naming the file and the place.

A file is read within stated bounds, checked before anything is allocated for it: the metadata
values are at most MAX_METADATA_BYTES and nested at most as deep as pydantic's JSON parser allows
(its recursion limit), every field has its type and range (a step of -15 s, a NaN or a count of
1e30 is an error, not a replay), at most MAX_STEPS steps, a row group at most
MAX_ROWS_PER_GROUP rows and MAX_GROUP_BYTES uncompressed, and every string (node, UUID, model,
job, label value) at most MAX_STRING_CHARS characters: numpy pads each string of an array to the
longest, so one 200,000-character job id in a small file would ask for gigabytes.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.core.errors import TelemetryError, TraceError
from agent.core.keyed import freeze
from agent.core.snapshot import Metric, Snapshot

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
StrArray = npt.NDArray[np.str_]
Floats = npt.NDArray[np.floating[Any]]  # float64, or float32 where that holds the value exactly

FORMAT = "ooda-trace"
# 2: a label may change from step to step within a GPU's rows (1: one value per GPU). Version 1
# files read as before; a reader of 1 refuses a 2 by its version, not by a confusing label error.
VERSION = 2
READABLE_VERSIONS = (1, 2)
META_HEADER = b"ooda.trace"  # written when the file is opened
META_STEPS = b"ooda.trace.steps"  # written when it is closed: per-step fleet data
ROWS_PER_GROUP = 1 << 19  # rows per row group: memory stays flat (about 250 MB writing)
LABEL_PREFIX = "label."
GPU_INDEX_MAX = int(np.iinfo(np.int16).max)  # the `gpu` column is int16

TimeBase = Literal["unix", "twin"]

IDENTITY_COLUMNS = ("time_s", "node", "gpu", "uuid", "model", "job", "stale", "age_s")

# What a reader allocates for, at most (see the module docstring).
MAX_STRING_CHARS = 256
MAX_METADATA_BYTES = 64 << 20
MAX_STEPS = 4_000_000  # nearly two years at 15 s
MAX_ROWS_PER_GROUP = 1 << 22  # the writer's groups are 2^19 rows (one step more when wider)
MAX_GROUP_BYTES = 2 << 30  # uncompressed, as the file's own metadata says
MAX_GPUS = 1 << 22
MAX_STEP_S = 86_400.0


@dataclass(frozen=True, slots=True)
class Column:
    """How a metric is stored: column name, Arrow type, stored = value x scale."""

    name: str
    type: pa.DataType
    scale: float


def metric_column(metric: Metric) -> Column:
    if metric is Metric.ENERGY_J:
        return Column("energy_mj", pa.int64(), 1000.0)
    if metric.value.endswith("_w"):
        return Column(metric.value[:-2] + "_mw", pa.int32(), 1000.0)
    return Column(metric.value, pa.float32(), 1.0)


COLUMN_TO_METRIC: dict[str, Metric] = {metric_column(m).name: m for m in Metric}


@dataclass(frozen=True, eq=False)
class TraceBlock:
    """Steps x GPUs: a rectangular chunk of a trace. Per-GPU arrays have shape (n,), per-step
    arrays (T,), per-sample arrays (T, n) (a step is one contiguous row); NaN = missing."""

    time_s: FloatArray  # (T,)
    node: StrArray  # (n,)
    gpu: IntArray
    uuid: StrArray
    model: StrArray
    job: StrArray  # (T, n), "" = none
    values: Mapping[Metric, Floats]  # (T, n)
    age_s: Floats  # (T, n), NaN = not seen yet
    stale: BoolArray  # (T, n)
    labels: Mapping[str, StrArray] = field(default_factory=dict)  # (T, n), "" = none
    budget_w: FloatArray | None = None  # (T,), NaN = none

    @property
    def n_gpus(self) -> int:
        return int(self.uuid.shape[0])

    @property
    def n_steps(self) -> int:
        return int(self.time_s.shape[0])

    def __post_init__(self) -> None:
        n, t = self.n_gpus, self.n_steps
        for name in ("node", "gpu", "model"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"TraceBlock.{name} must have shape ({n},)")
        for name in ("job", "age_s", "stale"):
            if getattr(self, name).shape != (t, n):
                raise ValueError(f"TraceBlock.{name} must have shape ({t}, {n})")
        for metric, column in self.values.items():
            if column.shape != (t, n):
                raise ValueError(f"TraceBlock values {metric} must have shape ({t}, {n})")
        for label, per_step in self.labels.items():
            if per_step.shape != (t, n):
                raise ValueError(f"TraceBlock labels {label!r} must have shape ({t}, {n})")
        # The same per-GPU arrays go into every step's snapshot: frozen, state keyed by them
        # knows them by identity (`LastKeys`) instead of comparing 1,000s of strings per step.
        for per_gpu in (self.uuid, self.model):
            freeze(per_gpu)

    def snapshot(self, j: int, budget_w: float | None = None) -> Snapshot:
        """Step j as a Snapshot (GPUs not seen yet at that step left out)."""
        seen = np.isfinite(self.age_s[j])
        if bool(seen.all()):  # the common case: the per-GPU arrays as they are
            node_names, node_idx = self._nodes
            rows: slice | BoolArray = slice(None)
            gpu, uuid, model = self.gpu, self.uuid, self.model
            labels = {k: v[j] for k, v in self.labels.items()}
        else:
            node_names, node_idx = np.unique(self.node[seen], return_inverse=True)
            rows = seen
            gpu, uuid, model = self.gpu[rows], self.uuid[rows], self.model[rows]
            labels = {k: v[j, rows] for k, v in self.labels.items()}
        values = {m: np.asarray(v[j, rows], dtype=np.float64) for m, v in self.values.items()}
        return Snapshot(
            time_s=float(self.time_s[j]),
            node_names=node_names,
            node=node_idx.astype(np.int64),
            gpu=gpu,
            uuid=uuid,
            model=model,
            job=self.job[j, rows],
            values=values,
            valid={m: np.isfinite(v) for m, v in values.items()},
            age_s=np.asarray(self.age_s[j, rows], dtype=np.float64),
            stale=self.stale[j, rows],
            budget_w=budget_w,
            labels=labels,
        )

    @functools.cached_property
    def _nodes(self) -> tuple[StrArray, IntArray]:
        names, idx = np.unique(self.node, return_inverse=True)
        return names, idx.astype(np.int64)


@dataclass(frozen=True)
class TraceSummary:
    path: Path
    steps: int
    gpus: int  # most GPUs in one step
    rows: int
    row_groups: int
    start_s: float
    end_s: float
    bytes: int


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _finite_or_none(values: FloatArray) -> list[float | None]:
    return [None if not math.isfinite(v) else v for v in values.tolist()]


class TraceWriter:
    """Writes a trace. Use as a context manager, or call `close()`: a file left unclosed has no
    Parquet footer and reads back as truncated."""

    def __init__(
        self,
        path: Path,
        *,
        time_base: TimeBase,
        step_s: float,
        source: Mapping[str, Any],
        metrics: Sequence[Metric] = tuple(Metric),
        labels: Sequence[str] = (),
        scenario: Mapping[str, Any] | None = None,
        rows_per_group: int = ROWS_PER_GROUP,
    ) -> None:
        self.path = Path(path)
        self.metrics = tuple(metrics)
        self.labels = tuple(labels)
        self.rows_per_group = rows_per_group
        self.step_s = step_s
        fields = [
            pa.field("time_s", pa.float64(), nullable=False),
            pa.field("node", pa.dictionary(pa.int32(), pa.string()), nullable=False),
            pa.field("gpu", pa.int16(), nullable=False),
            pa.field("uuid", pa.dictionary(pa.int32(), pa.string()), nullable=False),
            pa.field("model", pa.dictionary(pa.int32(), pa.string()), nullable=False),
            pa.field("job", pa.dictionary(pa.int32(), pa.string())),
            pa.field("stale", pa.bool_(), nullable=False),
            pa.field("age_s", pa.float32()),
            *(pa.field(metric_column(m).name, metric_column(m).type) for m in self.metrics),
            *(
                pa.field(LABEL_PREFIX + name, pa.dictionary(pa.int32(), pa.string()))
                for name in self.labels
            ),
        ]
        header = {
            "format": FORMAT,
            "version": VERSION,
            "time_base": time_base,
            "step_s": step_s,
            "source": dict(source),
            "scenario": dict(scenario) if scenario is not None else None,
            "metrics": [str(m) for m in self.metrics],
            "labels": list(self.labels),
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.schema = pa.schema(
            fields, metadata={META_HEADER: json.dumps(header, default=_json_default).encode()}
        )
        dictionary = ["time_s", "node", "gpu", "uuid", "model", "job"]
        dictionary += [LABEL_PREFIX + name for name in self.labels]
        encodings = {"age_s": "BYTE_STREAM_SPLIT"}
        encodings |= {metric_column(m).name: "BYTE_STREAM_SPLIT" for m in self.metrics}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(
            self.path,
            self.schema,
            compression="zstd",
            use_dictionary=dictionary,
            column_encoding=encodings,
            write_page_checksum=True,
        )
        self._buffer: _StepBuffer | None = None
        self._steps_t: list[float] = []
        self._steps_budget: list[float] = []
        self._steps_gpus: list[int] = []
        self._group_steps: list[int] = []
        self._rows = 0
        self._max_gpus = 0
        self._closed = False

    # -- appending ---------------------------------------------------------------------------

    def append(self, snapshot: Snapshot, budget_w: float | None = None) -> None:
        """One step. Consecutive steps with the same GPUs (same UUIDs in the same order, each on
        the same node at the same index) share a block; a change of the fleet starts a new one.
        Jobs and labels are per step: they may change within a block."""
        budget = snapshot.budget_w if budget_w is None else budget_w
        buf = self._buffer
        last = buf.time_s[buf.steps - 1] if buf is not None and buf.steps else None
        if last is None and self._steps_t:
            last = self._steps_t[-1]
        if last is not None and not snapshot.time_s > last:
            raise ValueError(
                f"trace {self.path}: steps must move forward in time "
                f"({snapshot.time_s} after {last})"
            )
        if buf is not None and (buf.full or not buf.same_gpus(snapshot)):
            self.flush()
            buf = None
        if buf is None:
            steps = max(1, self.rows_per_group // max(snapshot.n_gpus, 1))
            buf = self._buffer = _StepBuffer(snapshot, self.metrics, self.labels, steps)
        buf.add(snapshot, math.nan if budget is None else float(budget))

    def flush(self) -> None:
        """Write the buffered steps as a row group."""
        buf, self._buffer = self._buffer, None
        if buf is not None and buf.steps:
            self.write_block(buf.block())

    def write_block(self, block: TraceBlock) -> None:
        """A rectangular chunk, rows sorted by GPU then time (split to keep row groups small)."""
        if self._closed:
            raise ValueError(f"trace {self.path}: already closed")
        if self._steps_t and block.n_steps and block.time_s[0] <= self._steps_t[-1]:
            raise ValueError(f"trace {self.path}: steps must move forward in time")
        # `gpu` is identity (never null): an index int16 cannot hold is refused, not wrapped.
        wide = (block.gpu < 0) | (block.gpu > GPU_INDEX_MAX)
        if wide.any():
            i = int(np.flatnonzero(wide)[0])
            raise ValueError(
                f"trace {self.path}: GPU index {int(block.gpu[i])} of {str(block.uuid[i])!r} on "
                f"node {str(block.node[i])!r} does not fit the gpu column (0..{GPU_INDEX_MAX})"
            )
        per_group = max(1, self.rows_per_group // max(block.n_gpus, 1))
        for start in range(0, block.n_steps, per_group):
            self._write_group(block, slice(start, min(block.n_steps, start + per_group)))

    def _write_group(self, block: TraceBlock, steps: slice) -> None:
        n = block.n_gpus
        times = block.time_s[steps]
        t = times.shape[0]
        order = np.lexsort((block.gpu, block.node))  # GPU-major, by node then index
        columns: dict[str, pa.Array] = {
            "time_s": pa.array(np.tile(times, n), type=pa.float64()),
            "node": _dictionary_repeat(block.node[order], t),
            "gpu": pa.array(np.repeat(block.gpu[order], t).astype(np.int16), type=pa.int16()),
            "uuid": _dictionary_repeat(block.uuid[order], t),
            "model": _dictionary_repeat(block.model[order], t),
            "job": _dictionary(_gpu_major(block.job, steps, order), null=""),
            "stale": pa.array(_gpu_major(block.stale, steps, order), type=pa.bool_()),
            "age_s": _numeric(_gpu_major(block.age_s, steps, order), pa.float32(), 1.0, 3),
        }
        for metric in self.metrics:
            col = metric_column(metric)
            raw = block.values.get(metric)
            data = np.full(n * t, np.nan) if raw is None else _gpu_major(raw, steps, order)
            columns[col.name] = _numeric(data, col.type, col.scale, None)
        for name in self.labels:
            labels = block.labels.get(name)
            rows = np.full(n * t, "") if labels is None else _gpu_major(labels, steps, order)
            columns[LABEL_PREFIX + name] = _dictionary(rows, null="")
        table = pa.Table.from_pydict(columns, schema=self.schema)
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        budget = np.full(t, np.nan) if block.budget_w is None else np.asarray(block.budget_w)[steps]
        self._steps_t.extend(times.tolist())
        self._steps_budget.extend(budget.tolist())
        seen = np.isfinite(block.age_s[steps]).sum(axis=1)
        self._steps_gpus.extend(seen.astype(int).tolist())
        self._group_steps.append(t)
        self._rows += n * t
        self._max_gpus = max(self._max_gpus, n)

    def close(self) -> TraceSummary:
        if self._closed:
            raise ValueError(f"trace {self.path}: already closed")
        self.flush()
        steps = {
            "time_s": self._steps_t,
            "budget_w": _finite_or_none(np.asarray(self._steps_budget, dtype=np.float64)),
            "gpus": self._steps_gpus,
            "group_steps": self._group_steps,
            "rows": self._rows,
        }
        self._writer.add_key_value_metadata({META_STEPS: json.dumps(steps).encode()})
        self._writer.close()
        self._closed = True
        return TraceSummary(
            path=self.path,
            steps=len(self._steps_t),
            gpus=self._max_gpus,
            rows=self._rows,
            row_groups=len(self._group_steps),
            start_s=self._steps_t[0] if self._steps_t else math.nan,
            end_s=self._steps_t[-1] if self._steps_t else math.nan,
            bytes=self.path.stat().st_size,
        )

    def abort(self) -> None:
        """Give up: close the file handle without a valid footer's promise of completeness."""
        if not self._closed:
            self._closed = True
            self._writer.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            if not self._closed:
                self.close()
        else:
            self.abort()


class _StepBuffer:
    """Steps of one fleet, written in place into preallocated (steps x GPUs) arrays."""

    def __init__(
        self, first: Snapshot, metrics: Sequence[Metric], labels: Sequence[str], capacity: int
    ) -> None:
        n = first.n_gpus
        self.first = first
        self.node = first.node_of()
        self.capacity = capacity
        self.steps = 0
        self.time_s = np.zeros(capacity)
        self.budget_w = np.zeros(capacity)
        # float32 holds every stored value exactly (mW, whole units) except energy in mJ.
        self.values = {
            m: np.empty((capacity, n), dtype=np.float64 if m is Metric.ENERGY_J else np.float32)
            for m in metrics
        }
        self.age_s = np.empty((capacity, n), dtype=np.float32)
        self.stale = np.empty((capacity, n), dtype=bool)
        # Jobs as codes into a small dictionary: per-step string arrays can be wide (U21).
        self.job_codes = np.empty((capacity, n), dtype=np.int32)
        self.job_names: dict[str, int] = {}
        # Labels alike, per step: one may follow the job on a GPU (the twin's `priority`).
        self.label_codes = {k: np.empty((capacity, n), dtype=np.int32) for k in labels}
        self.label_names: dict[str, dict[str, int]] = {k: {} for k in labels}
        self._last_labels: dict[str, StrArray] = {}  # each label's values at the last step
        self._no_label = np.full(n, "", dtype=np.str_)

    @property
    def full(self) -> bool:
        return self.steps >= self.capacity

    def same_gpus(self, snapshot: Snapshot) -> bool:
        """Whether `snapshot` holds this block's GPUs: the same UUIDs in the same order, each at
        the same index on the same node (a block stores these once per GPU)."""
        first = self.first
        if not (
            first.n_gpus == snapshot.n_gpus
            and np.array_equal(first.uuid, snapshot.uuid)
            and np.array_equal(first.gpu, snapshot.gpu)
        ):
            return False
        if np.array_equal(first.node_names, snapshot.node_names):
            return bool(np.array_equal(first.node, snapshot.node))  # integers, not names
        return bool(np.array_equal(self.node, snapshot.node_of()))

    def add(self, snapshot: Snapshot, budget_w: float) -> None:
        j = self.steps
        self.time_s[j] = snapshot.time_s
        self.budget_w[j] = budget_w
        with np.errstate(over="ignore"):  # beyond float32: infinite here, missing when written
            for metric, column in self.values.items():
                column[j] = snapshot.column(metric)[0]
            self.age_s[j] = snapshot.age_s
        self.stale[j] = snapshot.stale
        self.job_codes[j] = _codes(snapshot.job, self.job_names)
        for name, codes in self.label_codes.items():
            values = snapshot.labels.get(name, self._no_label)
            last = self._last_labels.get(name)
            if last is None:
                codes[j] = _codes(values, self.label_names[name])
            else:  # labels change at a few GPUs a step: only those are encoded again
                changed = np.flatnonzero(values != last)
                codes[j] = codes[j - 1]
                if not changed.size:
                    continue
                codes[j, changed] = _codes(values[changed], self.label_names[name])
            self._last_labels[name] = values.copy()
        self.steps += 1

    def block(self) -> TraceBlock:
        t, first = self.steps, self.first
        return TraceBlock(
            time_s=self.time_s[:t],
            node=self.node,
            gpu=first.gpu,
            uuid=first.uuid,
            model=first.model,
            job=_decode(self.job_names, self.job_codes[:t]),
            values={m: v[:t] for m, v in self.values.items()},
            age_s=self.age_s[:t],
            stale=self.stale[:t],
            labels={k: _decode(self.label_names[k], c[:t]) for k, c in self.label_codes.items()},
            budget_w=self.budget_w[:t],
        )


def _codes(values: StrArray, names: dict[str, int]) -> npt.NDArray[np.int32]:
    """Each string's code in `names` (new strings added): one lookup per distinct string."""
    distinct, inverse = np.unique(values, return_inverse=True)
    codes = np.array([names.setdefault(x, len(names)) for x in distinct.tolist()], dtype=np.int32)
    return codes[inverse]


def _decode(names: dict[str, int], codes: npt.NDArray[np.int32]) -> StrArray:
    """Codes (`_codes`) back to strings."""
    return np.asarray(list(names) or [""], dtype=np.str_)[codes]


def _gpu_major(values: npt.NDArray[Any], steps: slice, order: IntArray) -> npt.NDArray[Any]:
    """(T, n) samples of some steps as the rows of a row group: GPU by GPU, in time order."""
    return np.ascontiguousarray(values[steps][:, order].T).ravel()


def _step_major(rows: npt.NDArray[Any], n: int, t: int) -> npt.NDArray[Any]:
    """A row group's column (GPU by GPU, in time order) as (T, n)."""
    return np.ascontiguousarray(rows.reshape(n, t).T)


def _dictionary_repeat(values: StrArray, repeat: int) -> pa.Array:
    """Per-GPU strings repeated for each step, as a dictionary array (no per-row strings)."""
    uniq, inverse = np.unique(values, return_inverse=True)
    indices = np.repeat(inverse.astype(np.int32), repeat)
    return pa.DictionaryArray.from_arrays(pa.array(indices, type=pa.int32()), pa.array(uniq))


def _dictionary(values: StrArray, null: str) -> pa.Array:
    """Per-row strings as a dictionary array (hash-encoded by Arrow); `null` becomes null."""
    arr = pa.array(values, type=pa.string())
    arr = pc.if_else(pc.equal(arr, null), pa.scalar(None, pa.string()), arr)
    return arr.dictionary_encode()


def _numeric(
    values: npt.NDArray[np.floating[Any]], kind: pa.DataType, scale: float, digits: int | None
) -> pa.Array:
    """Numbers (NaN = missing) as a nullable Arrow array of `kind`, stored = value x scale. A
    value the column cannot hold is missing too: numpy's cast would wrap it (int32 mW beyond
    2,147 kW) or make it infinite, a different number read back."""
    data = np.array(values, dtype=np.float64)  # one working copy, changed in place
    if pa.types.is_integer(kind):
        dtype = np.dtype(kind.to_pandas_dtype())
        np.multiply(data, scale, out=data)
        np.round(data, out=data)
        low = float(np.iinfo(dtype).min)  # -2^(bits-1), exact in float64; -low is past the top
        missing = ~((data >= low) & (data < -low))  # NaN compares false: missing as well
        data[missing] = 0.0
        return pa.array(data.astype(dtype), mask=missing, type=kind)
    missing = ~(np.abs(data) <= np.finfo(np.float32).max)
    data[missing] = 0.0
    if digits is not None:
        np.round(data, digits, out=data)
    return pa.array(data.astype(np.float32), mask=missing, type=pa.float32())


# -- reading --------------------------------------------------------------------------------------


class _Meta(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class _Identity(BaseModel):
    """What a trace says it is, read first: another format or version gets its own message."""

    model_config = ConfigDict(extra="ignore")
    format: Any = None
    version: Any = None


_M = TypeVar("_M", bound=BaseModel)


class _Fault(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")
    spec: str = Field(max_length=1024)


class _Scenario(BaseModel):
    """The fields of a twin's scenario that readers use; the rest is kept as it is."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")
    node_overhead_w: float | None = Field(None, ge=0)
    faults: list[_Fault] = Field(default_factory=list, max_length=100_000)


class _Header(_Meta):
    time_base: Literal["unix", "twin"]
    step_s: float = Field(gt=0, le=MAX_STEP_S)
    source: dict[str, Any] | None = None
    scenario: _Scenario | None = None
    metrics: list[str] = Field(max_length=len(Metric))
    labels: list[str] = Field(default_factory=list, max_length=64)
    created_utc: str = Field("", max_length=64)


class _Steps(_Meta):
    time_s: list[float] = Field(max_length=MAX_STEPS)
    budget_w: list[float | None] = Field(max_length=MAX_STEPS)
    gpus: list[int] = Field(max_length=MAX_STEPS)
    group_steps: list[int] = Field(max_length=MAX_STEPS)
    rows: int = Field(ge=0)


def _problem(exc: ValidationError) -> str:
    """A pydantic error as one short line: where, what, and the value when it is short."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "value"
    message = first["msg"]
    if first["type"] not in ("missing", "json_invalid") and "input" in first:
        shown = repr(first["input"])
        if len(shown) <= 40:
            message += f" (got {shown})"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}: {message}{more}"


@dataclass(frozen=True)
class TraceMeta:
    time_base: TimeBase
    step_s: float
    source: Mapping[str, Any]
    scenario: Mapping[str, Any] | None
    metrics: tuple[Metric, ...]
    labels: tuple[str, ...]
    created_utc: str
    time_s: FloatArray  # per step
    budget_w: FloatArray  # per step, NaN = none
    gpus: IntArray  # per step: GPUs seen
    group_steps: IntArray  # steps per row group
    rows: int

    @property
    def steps(self) -> int:
        return int(self.time_s.shape[0])


class TraceReader:
    """Reads a trace; also a TelemetrySource: `observe(now_s)` gives the newest step at or before
    `now_s` (TelemetryError before the first step)."""

    def __init__(self, path: Path, metrics: Sequence[Metric] | None = None) -> None:
        """`metrics`: read only these (default: every metric in the trace)."""
        self.path = Path(path)
        try:
            self._file = pq.ParquetFile(self.path, page_checksum_verification=True)
        except FileNotFoundError:
            raise TraceError(f"trace {self.path}: no such file") from None
        except (OSError, ValueError, pa.ArrowException) as exc:  # bad UTF-8 is a ValueError
            size = self.path.stat().st_size if self.path.exists() else 0
            raise TraceError(
                f"trace {self.path}: not a trace or truncated: the Parquet footer at the end of "
                f"the file ({size} bytes) is unreadable ({_first_line(exc)})"
            ) from None
        self.meta = self._read_meta()
        self._check_schema()
        if metrics is None:
            self.metrics = self.meta.metrics
        else:
            absent = [str(m) for m in metrics if m not in self.meta.metrics]
            if absent:
                raise self._err("metrics", f"{absent} not recorded in this trace")
            self.metrics = tuple(metrics)
        self._columns = [
            *IDENTITY_COLUMNS,
            *(metric_column(m).name for m in self.metrics),
            *(LABEL_PREFIX + x for x in self.meta.labels),
        ]
        self._group_start = np.concatenate([[0], np.cumsum(self.meta.group_steps)]).astype(int)
        self._cached: tuple[int, TraceBlock] | None = None

    def _err(self, place: str, problem: str) -> TraceError:
        return TraceError(f"trace {self.path}: {place}: {problem}")

    def _raw(self, metadata: Mapping[bytes, bytes], key: bytes) -> bytes:
        raw = metadata.get(key)
        if raw is None:
            if key == META_HEADER:
                raise self._err("metadata", f"no {key.decode()!r} key: not an ooda trace")
            raise self._err(
                "metadata", f"no {key.decode()!r} key: the writer did not finish (truncated)"
            )
        if len(raw) > MAX_METADATA_BYTES:
            raise self._err(f"metadata {key.decode()!r}", f"larger than {MAX_METADATA_BYTES} bytes")
        return raw

    def _model(self, model: type[_M], raw: bytes, key: bytes) -> _M:
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise self._err(f"metadata {key.decode()!r}", _problem(exc)) from None

    def _read_meta(self) -> TraceMeta:
        file_meta = self._file.metadata
        schema_meta = self._file.schema_arrow.metadata or {}
        footer = file_meta.metadata or {}
        raw_header = self._raw(schema_meta, META_HEADER)
        raw_steps = self._raw(footer, META_STEPS)
        identity = self._model(_Identity, raw_header, META_HEADER)
        if identity.format != FORMAT:
            raise self._err("metadata 'ooda.trace'", f"format is {identity.format!r}")
        if identity.version not in READABLE_VERSIONS:
            raise self._err(
                "metadata 'ooda.trace'",
                f"version {identity.version!r} is not supported "
                f"(this reader: {', '.join(map(str, READABLE_VERSIONS))})",
            )
        header = self._model(_Header, raw_header, META_HEADER)
        steps = self._model(_Steps, raw_steps, META_STEPS)
        try:
            metrics = tuple(Metric(m) for m in header.metrics)
        except ValueError as exc:
            raise self._err("metadata 'ooda.trace'", f"metrics: {exc}") from None
        long_label = next((x for x in header.labels if len(x) > 64), None)
        if long_label is not None:
            raise self._err("metadata 'ooda.trace'", "labels: a name longer than 64 characters")
        meta = TraceMeta(
            time_base=header.time_base,
            step_s=header.step_s,
            source=header.source or {},
            scenario=(
                header.scenario.model_dump(exclude_unset=True)
                if header.scenario is not None
                else None
            ),
            metrics=metrics,
            labels=tuple(header.labels),
            created_utc=header.created_utc,
            time_s=np.asarray(steps.time_s, dtype=np.float64),
            budget_w=np.array(
                [math.nan if b is None else b for b in steps.budget_w], dtype=np.float64
            ),
            gpus=np.asarray(steps.gpus, dtype=np.int64),
            group_steps=np.asarray(steps.group_steps, dtype=np.int64),
            rows=steps.rows,
        )
        self._check_steps(meta, file_meta)
        return meta

    def _check_steps(self, meta: TraceMeta, file_meta: pq.FileMetaData) -> None:
        n = meta.steps
        where = "metadata 'ooda.trace.steps'"
        if not meta.budget_w.shape == meta.gpus.shape == (n,):
            raise self._err(where, "per-step lists differ in length")
        if n and not (int(meta.gpus.min()) >= 0 and int(meta.gpus.max()) <= MAX_GPUS):
            raise self._err(where, f"gpus: a count outside 0..{MAX_GPUS}")
        if n and not bool(np.all(np.isnan(meta.budget_w) | (meta.budget_w >= 0))):
            raise self._err(where, "budget_w: a negative budget")
        if meta.group_steps.size and int(meta.group_steps.min()) < 1:
            raise self._err(where, "group_steps: a row group of no steps")
        if int(meta.group_steps.sum()) != n or meta.group_steps.size != file_meta.num_row_groups:
            raise self._err(
                where,
                f"{meta.group_steps.size} row groups of {int(meta.group_steps.sum())} steps "
                f"listed, the file has {file_meta.num_row_groups} row groups and {n} steps",
            )
        if file_meta.num_rows != meta.rows:
            raise self._err("row count", f"{file_meta.num_rows} rows, metadata says {meta.rows}")
        if n > 1 and not bool(np.all(np.diff(meta.time_s) > 0)):
            raise self._err(where, "step times do not increase")

    def _check_schema(self) -> None:
        names = set(self._file.schema_arrow.names)
        wanted = set(IDENTITY_COLUMNS) | {metric_column(m).name for m in self.meta.metrics}
        wanted |= {LABEL_PREFIX + x for x in self.meta.labels}
        missing = sorted(wanted - names)
        if missing:
            raise self._err("schema", f"missing columns {missing}")

    # -- blocks -------------------------------------------------------------------------------

    @property
    def row_groups(self) -> int:
        return int(self.meta.group_steps.size)

    def block(self, group: int) -> TraceBlock:
        """Row group `group` as a TraceBlock, checked for shape and time order."""
        if self._cached is not None and self._cached[0] == group:
            return self._cached[1]
        first, last = int(self._group_start[group]), int(self._group_start[group + 1])
        place = f"row group {group} (steps {first}..{last - 1})"
        stats = self._file.metadata.row_group(group)
        if stats.num_rows > MAX_ROWS_PER_GROUP or stats.total_byte_size > MAX_GROUP_BYTES:
            raise self._err(
                place,
                f"{stats.num_rows} rows, {stats.total_byte_size} bytes uncompressed: more than "
                f"a reader takes ({MAX_ROWS_PER_GROUP} rows, {MAX_GROUP_BYTES} bytes)",
            )
        try:
            table = self._file.read_row_group(group, columns=self._columns)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise self._err(self._locate(group, place), _first_line(exc)) from None
        times = self.meta.time_s[first:last]
        t = last - first
        rows = table.num_rows
        if t == 0 or rows % t:
            raise self._err(place, f"{rows} rows is not a whole number of GPUs x {t} steps")
        n = rows // t
        try:
            block = self._decode(table, n, t, times, self.meta.budget_w[first:last])
        except (ValueError, TypeError, pa.ArrowException) as exc:
            raise self._err(place, f"malformed ({_first_line(exc)})") from None
        time_grid = block.time_s
        if not np.array_equal(time_grid, times):
            raise self._err(place, "row times differ from the step times in the metadata")
        self._cached = (group, block)
        return block

    def _locate(self, group: int, place: str) -> str:
        """Which column of a bad row group is unreadable (for the error message)."""
        for name in self._file.schema_arrow.names:
            try:
                self._file.read_row_group(group, columns=[name])
            except (OSError, ValueError, pa.ArrowException):
                return f"{place}, column {name!r}"
        return place

    def _decode(
        self, table: pa.Table, n: int, t: int, times: FloatArray, budget: FloatArray
    ) -> TraceBlock:
        def strings(name: str, per_gpu: bool) -> StrArray:
            """A string column: per sample as (t, n), or per GPU as (n,) (checked constant)."""
            col = table.column(name).combine_chunks()
            if not isinstance(col, pa.DictionaryArray):
                col = col.dictionary_encode()
            if len(col.dictionary):
                longest = pc.max(pc.utf8_length(col.dictionary)).as_py() or 0
                if longest > MAX_STRING_CHARS:
                    raise ValueError(
                        f"column {name!r} has a value of {longest} characters (at most "
                        f"{MAX_STRING_CHARS})"
                    )
            dictionary = np.asarray([*col.dictionary.to_pylist(), ""], dtype=np.str_)
            # Nulls point at the "" appended to the dictionary.
            idx = pc.fill_null(col.indices, len(dictionary) - 1).to_numpy().reshape(n, t)
            if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= len(dictionary)):
                raise ValueError(f"column {name!r} points outside its dictionary")
            if not per_gpu:
                return np.asarray(dictionary[np.ascontiguousarray(idx.T)], dtype=np.str_)
            if n and not bool(np.all(idx == idx[:, :1])):
                raise ValueError(f"column {name!r} changes within a GPU's rows")
            return np.asarray(dictionary[idx[:, 0]], dtype=np.str_)

        def numbers(name: str, scale: float) -> FloatArray:
            col = table.column(name).to_numpy()
            out = _step_major(np.asarray(col, dtype=np.float64), n, t)
            if scale != 1.0:
                out /= scale
            return out

        grid = numbers("time_s", 1.0)  # (t, n): every GPU's column must be the step times
        if n and not bool(np.all(grid == grid[:, :1])):
            raise ValueError("rows are not sorted by GPU then time")
        if table.column("gpu").null_count:  # NaN would cast to a garbage index
            raise ValueError("column 'gpu' has missing values")
        gpu = table.column("gpu").to_numpy().astype(np.int64).reshape(n, t)
        if n and not bool(np.all(gpu == gpu[:, :1])):
            raise ValueError("column 'gpu' changes within a GPU's rows")
        values = {m: numbers(metric_column(m).name, metric_column(m).scale) for m in self.metrics}
        return TraceBlock(
            time_s=np.ascontiguousarray(grid[:, 0]) if n else times,
            node=strings("node", True),
            gpu=gpu[:, 0].copy(),
            uuid=strings("uuid", True),
            model=strings("model", True),
            job=strings("job", False),
            values=values,
            age_s=numbers("age_s", 1.0),
            stale=_step_major(table.column("stale").to_numpy(zero_copy_only=False), n, t),
            labels={x: strings(LABEL_PREFIX + x, False) for x in self.meta.labels},
            budget_w=budget,
        )

    def blocks(self) -> Iterator[TraceBlock]:
        for group in range(self.row_groups):
            yield self.block(group)

    def snapshots(self) -> Iterator[Snapshot]:
        """Every step in order."""
        for group in range(self.row_groups):
            block = self.block(group)
            for j in range(block.n_steps):
                yield block.snapshot(j, _budget(block, j))

    def snapshot(self, step: int) -> Snapshot:
        if not 0 <= step < self.meta.steps:
            raise IndexError(f"trace {self.path} has steps 0..{self.meta.steps - 1}")
        group = int(np.searchsorted(self._group_start, step, side="right") - 1)
        block = self.block(group)
        j = step - int(self._group_start[group])
        return block.snapshot(j, _budget(block, j))

    def observe(self, now_s: float) -> Snapshot:
        step = int(np.searchsorted(self.meta.time_s, now_s, side="right") - 1)
        if step < 0:
            start = self.meta.time_s[0] if self.meta.steps else math.nan
            raise TelemetryError(
                f"trace {self.path}: no step at or before {now_s} (starts {start})"
            )
        return self.snapshot(step)


def _budget(block: TraceBlock, j: int) -> float | None:
    if block.budget_w is None or not math.isfinite(block.budget_w[j]):
        return None
    return float(block.budget_w[j])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
