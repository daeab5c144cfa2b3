"""The newest sample of every series received, in numpy columns, and the Snapshot they make.

Every series gets a slot: its GPU (a row per `host, gpu` pair), its field, the time and value of
its newest sample and the time of its newest staleness marker. A body's series that the store
knows (by the hash of their label block, see `wire`) are written into their slots with a few
numpy calls; new ones are decoded in full once, named, and given a slot. Series of no interest
(another metric, another `match`) get one too, so that they cost no decoding the next time.

`snapshot(now)` answers what the Prometheus source's queries answer at `now` against a
Prometheus holding the same samples:

- a series is live when its newest sample is not a staleness marker and is at most `lookback_s`
  old (PromQL's instant selector); a GPU is known when its power series has a sample within the
  inventory window, and fresh when one of them is live and at most `staleness_s` old;
- a GPU's age, UUID, model, job (and extra labels) are its newest live power series' (its newest
  one's when none is live, with no job, as a stale GPU has in the Prometheus source);
- a field's value is the largest of the GPU's live series of it (`max by (host, gpu)`), in the
  metric's unit; NaN where none, and on every stale GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.core.dcgm import FIELD_BY_METRIC
from agent.core.keyed import LastKeys
from agent.core.snapshot import Metric, Snapshot
from agent.observe.remote_write import wire

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
StrArray = npt.NDArray[np.str_]

NEVER = np.iinfo(np.int64).min  # no sample (ms)
IGNORED = -1  # a series of no interest: another metric, another `match`
NAMELESS = -2  # a power series without a host label or an integer gpu label
KEY_SEP = "\x1f"


@dataclass(frozen=True)
class SeriesNaming:
    """Which series are read and how they name a GPU and a field."""

    metrics: Mapping[Metric, str]  # field -> metric name ('' leaves it out)
    host_labels: tuple[str, ...]
    gpu_label: str
    uuid_label: str
    model_label: str
    job_label: str
    match: Mapping[str, str] = field(default_factory=dict)
    extra_labels: tuple[str, ...] = ()


@dataclass
class IngestResult:
    """What one body added: samples kept (stale markers among them), new series, and new series
    refused because the store is full."""

    samples: int = 0
    markers: int = 0
    new_series: int = 0
    refused_series: int = 0
    slow_series: int = 0  # decoded in full (new, or not in the usual shape)


class HashIndex:
    """Label-block hash -> slot, an open-addressing table in two numpy arrays: a whole body's
    series are looked up in a few numpy calls (a dict costs a Python call per series, and
    several times the memory). -1 marks an empty place (Python's hash() is never -1)."""

    EMPTY = -1

    def __init__(self, capacity: int = 1024) -> None:
        size = 1 << max(10, (2 * capacity - 1).bit_length())  # at most half full
        self._keys = np.full(size, self.EMPTY, dtype=np.int64)
        self._slots = np.full(size, -1, dtype=np.int64)
        self._mask = size - 1
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def _home(self, keys: IntArray) -> IntArray:
        return (keys.view(np.uint64) & np.uint64(self._mask)).astype(np.int64)

    def find(self, keys: IntArray) -> IntArray:
        """Each key's slot, -1 where absent."""
        out = np.full(keys.size, -1, dtype=np.int64)
        at = self._home(keys)
        pending = np.arange(keys.size)
        while pending.size:
            found = self._keys[at]
            hit = found == keys[pending]
            out[pending[hit]] = self._slots[at[hit]]
            going = ~hit & (found != self.EMPTY)
            pending, at = pending[going], (at[going] + 1) & self._mask
        return out

    def add_many(self, keys: IntArray, slots: IntArray) -> None:
        """Keys not in the table yet (distinct), each with its slot: placed in rounds, each key
        probing on from its home place until it claims an empty one (where several reach the
        same empty place in a round, one claims it and the others probe on), so a
        million keys cost a few dozen numpy rounds, not a million Python calls."""
        if 2 * (self.size + keys.size) > self._keys.size:
            self._grow(self.size + keys.size)
        at = self._home(keys)
        pending = np.arange(keys.size)
        while pending.size:
            # Every key at an empty place writes itself there; one write per place stays.
            empty = self._keys[at] == self.EMPTY
            self._keys[at[empty]] = keys[pending[empty]]
            won = self._keys[at] == keys[pending]  # keys are distinct: the one that stayed
            self._slots[at[won]] = slots[pending[won]]
            # Every other key's place is taken now (it was, or another key claimed it).
            pending, at = pending[~won], (at[~won] + 1) & self._mask
        self.size += keys.size

    def _grow(self, holding: int) -> None:
        """A table at most half full when it holds `holding` keys; the keys held re-placed."""
        used = self._keys != self.EMPTY
        keys, slots = self._keys[used], self._slots[used]
        self.__init__(holding)  # type: ignore[misc]
        self.add_many(keys, slots)

    @staticmethod
    def of(keys: IntArray) -> HashIndex:
        """A table of `keys` (distinct), each key's slot its position."""
        index = HashIndex(keys.size)
        index.add_many(np.asarray(keys, dtype=np.int64), np.arange(keys.size, dtype=np.int64))
        return index


class _StrTable:
    """Rows of strings (an identity: UUID, model, job, extra labels) kept as one numpy string
    array per column, appended to in place (capacity doubles; a longer string widens the
    column) so that adding a few identities a cycle costs a few, not the whole table."""

    def __init__(self, width: int) -> None:
        self.columns: list[StrArray] = [np.zeros(1024, dtype="U1") for _ in range(width)]
        self._pending: list[tuple[str, ...]] = []
        self.size = 0

    def append(self, row: tuple[str, ...]) -> None:
        self._pending.append(row)

    def arrays(self) -> list[StrArray]:
        """The columns (rows added so far), as views."""
        if self._pending:
            end = self.size + len(self._pending)
            for k, values in enumerate(zip(*self._pending, strict=True)):
                column = self.columns[k]
                chars = column.itemsize // 4
                longest = max(map(len, values))
                capacity = column.size if end <= column.size else max(2 * column.size, end)
                if longest > chars or capacity != column.size:
                    grown = np.zeros(capacity, dtype=f"U{max(longest, chars)}")
                    grown[: self.size] = column[: self.size]
                    column = self.columns[k] = grown
                column[self.size : end] = values
            self.size = end
            self._pending = []
        return [column[: self.size] for column in self.columns]


class _Columns:
    """Per-slot numpy columns that grow by doubling."""

    SPEC: Mapping[str, tuple[npt.DTypeLike, float | int]] = {
        "hash": (np.int64, 0),
        "row": (np.int64, -1),
        "field": (np.int16, IGNORED),
        "ident": (np.int64, -1),
        "real_ms": (np.int64, NEVER),  # newest sample that is not a staleness marker
        "marker_ms": (np.int64, NEVER),  # newest staleness marker
        "value": (np.float64, np.nan),
    }

    def __init__(self) -> None:
        self.size = 0
        self.cols: dict[str, npt.NDArray[Any]] = {
            name: np.full(1024, fill, dtype=dtype) for name, (dtype, fill) in self.SPEC.items()
        }

    def extend(self, **values: IntArray) -> int:
        """New slots with these columns' values (the others at their fill); the first one."""
        n = len(next(iter(values.values())))
        end = self.size + n
        if end > self.cols["hash"].size:
            capacity = max(2 * self.cols["hash"].size, end)
            for name, (dtype, fill) in self.SPEC.items():
                grown = np.full(capacity, fill, dtype=dtype)
                grown[: self.size] = self.cols[name][: self.size]
                self.cols[name] = grown
        first = self.size
        for name, value in values.items():
            self.cols[name][first:end] = value
        self.size = end
        return first

    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        return self.cols[name][: self.size]

    def keep(self, mask: BoolArray) -> None:
        kept = int(mask.sum())
        for name, (dtype, fill) in self.SPEC.items():
            column = np.full(max(1024, 2 * kept), fill, dtype=dtype)
            column[:kept] = self.cols[name][: self.size][mask]
            self.cols[name] = column
        self.size = kept


class SeriesStore:
    """The received series, for one source. `ingest` (the receiver's threads) and `snapshot`
    (the loop) may run at once: one lock guards the columns."""

    def __init__(
        self,
        naming: SeriesNaming,
        *,
        max_series: int,
        lookback_s: float,
        staleness_s: float,
        inventory_window_s: float,
    ) -> None:
        self.naming = naming
        self.max_series = max_series
        self.lookback_s = lookback_s
        self.staleness_s = staleness_s
        self.inventory_window_s = inventory_window_s
        self._lock = threading.Lock()
        self._slots = _Columns()
        self._memo = HashIndex()  # label block's hash -> slot
        self.fields: list[Metric] = [m for m, name in naming.metrics.items() if name]
        self._field_of_name = {naming.metrics[m]: k for k, m in enumerate(self.fields)}
        self._power = self.fields.index(Metric.POWER_W)
        self._row_of: dict[str, int] = {}
        self._row_host: list[str] = []
        self._row_gpu: list[int] = []
        self._ident_of: dict[tuple[str, ...], int] = {}
        self._idents: list[tuple[str, ...]] = []
        self._changed = True  # slots added or dropped since the per-field index was built
        self._by_field: list[IntArray] = []  # per field: its slots
        self._indexed = 0  # slots in `_by_field`
        self._idents_table = _StrTable(3 + len(naming.extra_labels))
        self._rows_known = 0  # rows in `_row_arrays`
        self._row_arrays: tuple[IntArray, IntArray, IntArray, StrArray] | None = None
        self._last_identity: tuple[IntArray, list[StrArray]] | None = None
        self._last_job: tuple[BoolArray, StrArray] | None = None
        self._nameless: list[int] = []  # slots of power series that name no GPU
        self._uuids = LastKeys()
        self._models = LastKeys()
        self._refused = 0  # new series refused since the last snapshot
        self._last_sweep_s: float | None = None
        self.received_any = threading.Event()

    # -- ingest -----------------------------------------------------------------------------

    def ingest(self, series: list[bytes], raw: wire.Raw) -> IngestResult:
        """One body's series (split from `raw`) into their slots; BodyError when a series the
        fast path cannot read turns out malformed (nothing of the body is kept then)."""
        tails = wire.tails(series, raw)
        fast = np.flatnonzero(tails.fast)
        hashes = wire.label_hashes(series, tails.label_bytes, fast)
        result = IngestResult()
        with self._lock:
            slots = self._memo.find(hashes)
            known = slots >= 0
            learnt = self._learn(series, tails, fast[~known], hashes[~known], result)
            rows = fast[known]
            self._record(slots[known], tails.value[rows], tails.time_ms[rows], result)
            self._record(*learnt, result)
            self._refused += result.refused_series
        if result.samples:
            self.received_any.set()
        return result

    def _learn(
        self,
        series: list[bytes],
        tails: wire.Tails,
        new: IntArray,
        new_hashes: IntArray,
        result: IngestResult,
    ) -> tuple[IntArray, FloatArray, IntArray]:
        """The series the store does not know (by their label block) and those not in the usual
        shape, decoded by protobuf: named and given slots (up to `max_series`). Returns their
        samples' slots, values and times. BodyError before anything changes if one is
        malformed."""
        found: list[tuple[int, dict[str, str], FloatArray, IntArray]] = []
        odd = np.flatnonzero(~tails.fast).tolist()
        for i, key in zip(new.tolist(), new_hashes.tolist(), strict=True):
            block = series[i][: int(tails.label_bytes[i])]
            labels = wire.decode_labels(block)
            if labels is None:  # not labels alone: several samples, another field order...
                odd.append(i)
                continue
            found.append((key, labels, tails.value[i : i + 1], tails.time_ms[i : i + 1]))
        for i in odd:
            one = wire.decode_series(series[i])
            found.append((hash(one.label_block), one.labels, one.values, one.time_ms))
        result.slow_series = len(found)
        if not found:
            empty = np.zeros(0, dtype=np.int64)
            return empty, np.zeros(0), empty
        keys = np.array([key for key, *_ in found], dtype=np.int64)
        slots = self._memo.find(keys)
        added: dict[int, int] = {}  # the same new series twice in a body: one slot
        names: list[tuple[int, int, int, int]] = []  # each new slot's (key, row, field, ident)
        for k in np.flatnonzero(slots < 0).tolist():
            key, labels, *_ = found[k]
            slot = added.get(key)
            if slot is None:
                if len(self._memo) + len(names) >= self.max_series:
                    result.refused_series += 1
                    continue
                slot = added[key] = self._slots.size + len(names)
                names.append((key, *self._name(labels)))
            slots[k] = slot
        self._add_slots(names)
        result.new_series += len(names)
        counts = np.array([v.size for _, _, v, _ in found], dtype=np.int64)
        per_sample = np.repeat(slots, counts)
        values = np.concatenate([v for _, _, v, _ in found])
        time_ms = np.concatenate([t for *_, t in found])
        kept = per_sample >= 0
        return per_sample[kept], values[kept], time_ms[kept]

    def _record(
        self, slots: IntArray, values: FloatArray, time_ms: IntArray, result: IngestResult
    ) -> None:
        """Samples into their slots: a slot keeps its newest sample and its newest marker."""
        if slots.size == 0:
            return
        marker = values.view(np.uint64) == wire.STALE_NAN_BITS
        real = ~marker
        columns = self._slots
        real_ms, value = columns["real_ms"], columns["value"]
        s, t = slots[real], time_ms[real]
        np.maximum.at(real_ms, s, t)
        newest = real_ms[s] == t
        value[s[newest]] = values[real][newest]
        if marker.any():
            np.maximum.at(columns["marker_ms"], slots[marker], time_ms[marker])
        result.samples += int(slots.size)
        result.markers += int(marker.sum())

    def _add_slots(self, names: list[tuple[int, int, int, int]]) -> None:
        """New slots, numbered from the current size on: (key, row, field, ident) each."""
        if not names:
            return
        key, row, field_index, ident = (
            np.array(c, dtype=np.int64) for c in zip(*names, strict=True)
        )
        first = self._slots.extend(hash=key, row=row, field=field_index, ident=ident)
        self._memo.add_many(key, first + np.arange(key.size, dtype=np.int64))
        self._nameless.extend((first + np.flatnonzero(field_index == NAMELESS)).tolist())
        self._changed = True

    def _name(self, labels: Mapping[str, str]) -> tuple[int, int, int]:
        """A new series' GPU row, field and identity (-1: none), from its labels."""
        n = self.naming
        field_index = self._field_of_name.get(labels.get("__name__", ""), IGNORED)
        if field_index != IGNORED and any(labels.get(k) != v for k, v in n.match.items()):
            field_index = IGNORED
        row = ident = -1
        if field_index != IGNORED:
            host = next((labels[h] for h in n.host_labels if labels.get(h)), "")
            gpu = labels.get(n.gpu_label, "")
            if host and gpu.isdecimal() and len(gpu) <= 9:
                row = self._row(host, int(gpu))
                if field_index == self._power:
                    ident = self._ident(labels)
            else:  # a power series of no GPU is reported; other fields are simply unusable
                field_index = NAMELESS if field_index == self._power else IGNORED
        return row, field_index, ident

    def _row(self, host: str, gpu: int) -> int:
        key = f"{host}{KEY_SEP}{gpu}"
        row = self._row_of.get(key)
        if row is None:
            row = self._row_of[key] = len(self._row_host)
            self._row_host.append(host)
            self._row_gpu.append(gpu)
        return row

    def _ident(self, labels: Mapping[str, str]) -> int:
        n = self.naming
        names = (n.uuid_label, n.model_label, n.job_label, *n.extra_labels)
        ident = tuple(labels.get(name, "") for name in names)
        found = self._ident_of.get(ident)
        if found is None:
            found = self._ident_of[ident] = len(self._idents)
            self._idents.append(ident)
            self._idents_table.append(ident)
        return found

    # -- the snapshot ---------------------------------------------------------------------

    @property
    def series(self) -> int:
        return self._slots.size

    def snapshot(self, now_s: float) -> Snapshot:
        with self._lock:
            self._sweep(now_s)
            return self._snapshot(now_s)

    def _snapshot(self, now_s: float) -> Snapshot:
        if self._changed:
            self._index_fields()
        cols = self._slots
        now_ms = int(now_s * 1000)
        real_ms = cols["real_ms"]
        live = self._live(now_ms)
        best = self._gpus(now_ms, live)
        rows = cols["row"][best]
        is_live = live[best]
        age = np.maximum(now_s - real_ms[best] / 1000.0, 0.0)
        stale = ~is_live | ~(age <= self.staleness_s)
        uuid, model, job, extra = self._identity(cols["ident"][best], is_live)
        node_names, node = self._nodes(rows)
        values = self._values(rows, live, stale)
        return Snapshot(
            time_s=float(now_s),
            node_names=node_names,
            node=node,
            gpu=self._row_info()[2][rows],
            uuid=self._uuids.interned(uuid),
            model=self._models.interned(model),
            job=job,
            values=values,
            valid={m: np.isfinite(v) for m, v in values.items()},
            age_s=age,
            stale=stale,
            errors=self._errors(now_ms, extra),
            labels=extra,
        )

    def _live(self, now_ms: int) -> BoolArray:
        """Per slot: its newest sample is no staleness marker and within the lookback."""
        real_ms = self._slots["real_ms"]
        lookback_ms = int(self.lookback_s * 1000)
        return np.asarray((real_ms > self._slots["marker_ms"]) & (real_ms >= now_ms - lookback_ms))

    def _gpus(self, now_ms: int, live: BoolArray) -> IntArray:
        """Per GPU known (a power series sampled within the inventory window), in the order of
        (host, gpu), its best power series: a live one before others, then the newest."""
        cols = self._slots
        real_ms, row_of = cols["real_ms"], cols["row"]
        power = self._by_field[self._power]
        power = power[real_ms[power] >= now_ms - int(self.inventory_window_s * 1000)]
        rank = self._row_info()[0]
        order = np.lexsort((real_ms[power], live[power], rank[row_of[power]]))
        ranked = power[order]
        last = np.ones(ranked.size, dtype=bool)
        last[:-1] = row_of[ranked[1:]] != row_of[ranked[:-1]]
        return np.asarray(ranked[last], dtype=np.int64)

    def _row_info(self) -> tuple[IntArray, IntArray, IntArray, StrArray]:
        """Per row: its rank in (host, gpu) order, its host's number among the hosts (sorted),
        its gpu index; and the hosts. Made again only when rows were added or dropped."""
        if self._row_arrays is None or self._rows_known != len(self._row_host):
            hosts = np.asarray(self._row_host, dtype=np.str_)
            gpus = np.asarray(self._row_gpu, dtype=np.int64)
            names, host_id = np.unique(hosts, return_inverse=True)
            rank = np.empty(hosts.size, dtype=np.int64)
            rank[np.lexsort((gpus, host_id))] = np.arange(hosts.size)
            self._row_arrays = (rank, host_id.astype(np.int64), gpus, names)
            self._rows_known = len(self._row_host)
        return self._row_arrays

    def _nodes(self, rows: IntArray) -> tuple[StrArray, IntArray]:
        """The GPUs' node names (sorted) and each GPU's node among them."""
        _, host_id, _, names = self._row_info()
        present, node = np.unique(host_id[rows], return_inverse=True)
        return names[present], node.astype(np.int64)

    def _identity(
        self, ident: IntArray, is_live: BoolArray
    ) -> tuple[StrArray, StrArray, StrArray, dict[str, StrArray]]:
        """Per GPU its UUID, model, job (none where no power series is live) and extra labels,
        from its best power series' identity; the same arrays as the last cycle's while the
        identities are the same."""
        last = self._last_identity
        if last is None or not np.array_equal(last[0], ident):
            last = (ident, self._identity_columns(ident, last))
            self._last_identity = last
            self._last_job = None
        columns = last[1]
        if self._last_job is None or not np.array_equal(self._last_job[0], is_live):
            self._last_job = (is_live, np.asarray(np.where(is_live, columns[2], ""), np.str_))
        names = self.naming.extra_labels
        extra = {name: columns[3 + k] for k, name in enumerate(names)}
        return columns[0], columns[1], self._last_job[1], extra

    def _identity_columns(
        self, ident: IntArray, last: tuple[IntArray, list[StrArray]] | None
    ) -> list[StrArray]:
        """Per GPU, each identity column at `ident`; where only a few GPUs' identities changed
        since `last` (a job started or ended), the last columns with those rows rewritten
        (gathering 100,000 UUIDs, models and jobs again costs a few hundredths of a second)."""
        table = self._idents_table.arrays()
        if last is not None and last[0].shape == ident.shape:
            changed = np.flatnonzero(last[0] != ident)
            same_types = all(
                old.dtype == column.dtype for old, column in zip(last[1], table, strict=True)
            )
            if same_types and changed.size <= ident.size // 4:
                columns = [old.copy() for old in last[1]]
                for out, column in zip(columns, table, strict=True):
                    out[changed] = column[ident[changed]]
                return columns
        return [column[ident] for column in table]

    def _errors(self, now_ms: int, extra: Mapping[str, StrArray]) -> tuple[str, ...]:
        errors: list[str] = []
        nameless = np.asarray(self._nameless, dtype=np.int64)
        window_ms = now_ms - int(self.inventory_window_s * 1000)
        count = int((self._slots["real_ms"][nameless] >= window_ms).sum())
        if count:
            labels = ", ".join(self.naming.host_labels)
            errors.append(
                f"{count} series without a host label ({labels}) or an integer "
                f"{self.naming.gpu_label!r} label were ignored"
            )
        if self._refused:
            errors.append(
                f"{self._refused} new series refused since the last cycle: the receiver holds "
                f"max_series = {self.max_series}"
            )
            self._refused = 0
        for name, of_gpu in extra.items():
            unlabelled = int((of_gpu == "").sum())
            if unlabelled:
                errors.append(f"{unlabelled} GPUs have no {name!r} label")
        return tuple(errors)

    def _values(
        self, rows: IntArray, live: BoolArray, stale: BoolArray
    ) -> dict[Metric, FloatArray]:
        """Per field, per GPU of `rows`: the largest value of its live series (NaN: none, or
        the GPU is stale), in the metric's unit."""
        n_rows = len(self._row_host)
        value = self._slots["value"]
        row_of = self._slots["row"]
        out: dict[Metric, FloatArray] = {}
        for k, metric in enumerate(self.fields):
            slots = self._by_field[k]
            slots = slots[live[slots]]
            of_row = row_of[slots]
            column = np.full(n_rows, np.nan)
            if of_row.size and np.bincount(of_row, minlength=n_rows).max() > 1:
                np.fmax.at(column, of_row, value[slots])  # a job changed: two series live
            else:
                column[of_row] = value[slots]
            picked = column[rows] * FIELD_BY_METRIC[metric].to_metric
            picked[stale] = np.nan
            out[metric] = picked
        return out

    def _index_fields(self) -> None:
        """Each field's slots: the slots added since the last call appended (slots are only
        ever added, until a sweep drops some and this starts afresh)."""
        if not self._by_field:
            self._indexed = 0
            self._by_field = [np.zeros(0, dtype=np.int64) for _ in self.fields]
        new = np.arange(self._indexed, self._slots.size, dtype=np.int64)
        fields = self._slots["field"][new]
        order = np.argsort(fields, kind="stable")
        bounds = np.searchsorted(fields[order], np.arange(len(self.fields) + 1))
        for k in range(len(self.fields)):
            added = new[order[bounds[k] : bounds[k + 1]]]
            if added.size:
                self._by_field[k] = np.concatenate([self._by_field[k], added])
        self._indexed = self._slots.size
        self._changed = False

    def _sweep(self, now_s: float) -> None:
        """Forget series with no sample (nor marker) within the inventory window and the
        lookback (they name no GPU any more), at most every quarter window."""
        window_s = max(self.inventory_window_s, self.lookback_s)
        if self._last_sweep_s is not None and 0 <= now_s - self._last_sweep_s < window_s / 4:
            return
        self._last_sweep_s = now_s
        cols = self._slots
        horizon_ms = int((now_s - window_s) * 1000)
        newest = np.maximum(cols["real_ms"], cols["marker_ms"])
        keep = (newest >= horizon_ms) & ~self._superseded(int(now_s * 1000))
        if keep.all():
            return
        cols.keep(keep)
        self._memo = HashIndex.of(cols["hash"])
        self._changed = True
        self._by_field = []  # slots renumbered: indexed afresh
        self._forget_rows()

    def _superseded(self, now_ms: int) -> BoolArray:
        """Per slot: a series ended by its staleness marker (a job's, when the GPU's job
        changed) whose GPU has a live series of the same field. The snapshot reads nothing of
        it (a GPU's identity, age and values are its live series'), so it need not wait out the
        inventory window: with job churn at 100,000 GPUs that is hundreds of thousands of
        series held for nothing."""
        cols = self._slots
        named = (cols["row"] >= 0) & (cols["field"] >= 0)
        key = cols["row"] * (len(self.fields) + 1) + cols["field"]
        live_keys = np.unique(key[named & self._live(now_ms)])
        ended = named & (cols["marker_ms"] >= cols["real_ms"])
        return np.asarray(ended & np.isin(key, live_keys))

    def _forget_rows(self) -> None:
        """Rows and identities no slot refers to any more, dropped (a fleet's churn over
        months must not grow them)."""
        cols = self._slots
        for column, names in (("row", ("_row_host", "_row_gpu")), ("ident", ("_idents",))):
            of_slot = cols[column]
            used = np.unique(of_slot[of_slot >= 0])
            renumber = np.full(len(getattr(self, names[0])) + 1, -1, dtype=np.int64)
            renumber[used] = np.arange(used.size)
            of_slot[:] = np.where(of_slot >= 0, renumber[of_slot], -1)
            for name in names:
                old = getattr(self, name)
                setattr(self, name, [old[i] for i in used.tolist()])
        self._row_of = {
            f"{h}{KEY_SEP}{g}": k
            for k, (h, g) in enumerate(zip(self._row_host, self._row_gpu, strict=True))
        }
        self._ident_of = {ident: k for k, ident in enumerate(self._idents)}
        self._idents_table = _StrTable(len(self._idents_table.columns))
        for ident in self._idents:
            self._idents_table.append(ident)
        self._row_arrays = None
        self._last_identity = self._last_job = None
        self._nameless = np.flatnonzero(cols["field"] == NAMELESS).tolist()


def naming_of(
    metrics: Mapping[Metric, str],
    host_labels: Sequence[str],
    gpu_label: str,
    uuid_label: str,
    model_label: str,
    job_label: str,
    match: Mapping[str, str],
    extra_labels: Sequence[str],
) -> SeriesNaming:
    return SeriesNaming(
        metrics=dict(metrics),
        host_labels=tuple(host_labels),
        gpu_label=gpu_label,
        uuid_label=uuid_label,
        model_label=model_label,
        job_label=job_label,
        match=dict(match),
        extra_labels=tuple(extra_labels),
    )
