"""Trace files: round trips, fleet changes, the twin's traces, and damaged files."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agent.core.errors import TelemetryError, TraceError
from agent.core.snapshot import Metric, Snapshot, build_snapshot
from agent.observe.openmetrics import write_openmetrics
from agent.observe.prometheus import PrometheusSettings, PrometheusSource
from agent.observe.record import record_prometheus
from agent.observe.trace import TraceReader, TraceWriter
from agent.replay.twin_trace import record_twin
from agent.sim.exporter import dcgm_metric_values, served_fields
from agent.sim.faults import parse_fault
from agent.sim.twin import BudgetSchedule, Twin, TwinSpec
from tests.conftest import make_snapshot

METRICS = (Metric.POWER_W, Metric.POWER_LIMIT_W, Metric.TEMP_C, Metric.UTIL_PCT, Metric.ENERGY_J)


def _snap(t: float, power: list[float], stale: list[bool] | None = None, **kw: object):  # type: ignore[no-untyped-def]
    snap = make_snapshot(power, time_s=t, stale=stale, **kw)  # type: ignore[arg-type]
    return snap


def _gpus(
    t: float,
    uuid: list[str],
    values: dict[Metric, list[float]],
    *,
    node: list[str] | None = None,
    gpu: list[int] | None = None,
    job: list[str] | None = None,
    age_s: list[float] | None = None,
    stale: list[bool] | None = None,
    labels: dict[str, list[str]] | None = None,
) -> Snapshot:
    """GPUs of model "m" on node n1 (indexes 0..n-1), idle, seen now, unless told otherwise."""
    n = len(uuid)
    return build_snapshot(
        time_s=t,
        node_of_gpu=node or ["n1"] * n,
        gpu=list(range(n)) if gpu is None else gpu,
        uuid=uuid,
        model=["m"] * n,
        job=job or [""] * n,
        values=values,
        age_s=age_s or [0.0] * n,
        stale=stale or [False] * n,
        labels=labels,
    )


def test_round_trip_keeps_values_gaps_and_identity(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    written = []
    with TraceWriter(
        path, time_base="unix", step_s=15, source={"kind": "test"}, metrics=METRICS
    ) as w:
        for k in range(5):
            snap = _snap(
                1000.0 + 15 * k,
                [400.123 + k, 300.5, 250.0, 100.0, 90.0],
                stale=[False, False, k >= 3, False, False],
                jobs=["7", "7", "", "9", "9"],
                budget_w=5000.0 + k,
            )
            w.append(snap)
            written.append(snap)
    reader = TraceReader(path)
    assert reader.meta.steps == 5 and reader.meta.time_base == "unix"
    assert list(reader.meta.budget_w) == [5000.0, 5001.0, 5002.0, 5003.0, 5004.0]
    for orig, back in zip(written, reader.snapshots(), strict=True):
        assert back.time_s == orig.time_s
        assert list(back.uuid) == list(orig.uuid)
        assert list(back.node_of()) == list(orig.node_of())
        assert list(back.gpu) == list(orig.gpu)
        assert list(back.job) == list(orig.job)
        assert list(back.stale) == list(orig.stale)
        assert back.budget_w == orig.budget_w
        for m in (Metric.POWER_W, Metric.POWER_LIMIT_W, Metric.TEMP_C, Metric.UTIL_PCT):
            np.testing.assert_array_equal(back.column(m)[0], orig.column(m)[0])
            np.testing.assert_array_equal(back.column(m)[1], orig.column(m)[1])
        assert not back.column(Metric.ENERGY_J)[1].any()  # never given: missing, not 0
    # The reader is a TelemetrySource stepping through time.
    assert reader.observe(1031.0).time_s == 1030.0
    assert reader.observe(5000.0).time_s == 1060.0
    with pytest.raises(TelemetryError, match="no step at or before"):
        reader.observe(999.0)


def test_fleet_changes_start_new_blocks(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    with TraceWriter(path, time_base="twin", step_s=1, source={}, metrics=METRICS) as w:
        w.append(_snap(0, [100.0, 200.0]))
        w.append(_snap(1, [101.0, 201.0]))
        w.append(_snap(2, [102.0, 202.0, 302.0, 402.0]))  # two GPUs joined
        summary = w.close()
    assert summary.steps == 3 and summary.row_groups == 2 and summary.gpus == 4
    snaps = list(TraceReader(path).snapshots())
    assert [s.n_gpus for s in snaps] == [2, 2, 4]
    assert snaps[2].column(Metric.POWER_W)[0][3] == 402.0


def test_rows_per_group_bounds_memory(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    with TraceWriter(
        path, time_base="twin", step_s=1, source={}, metrics=METRICS, rows_per_group=10
    ) as w:
        for k in range(7):
            w.append(_snap(k, [float(k)] * 4))
    reader = TraceReader(path)
    assert reader.row_groups == 4  # 2 steps x 4 GPUs per group
    assert [s.column(Metric.POWER_W)[0][0] for s in reader.snapshots()] == list(range(7))
    assert reader.snapshot(5).time_s == 5


def test_twin_trace_matches_what_the_exporter_serves(tmp_path: Path) -> None:
    spec = TwinSpec(
        nodes=3,
        gpus_per_node=2,
        seed=4,
        budget=BudgetSchedule.demand_response(3000, 2000, 60, 60),
        faults=(parse_fault("dropout:node2@45+30"), parse_fault("xid=79:node3/gpu1@30")),
    )
    path = tmp_path / "twin.parquet"
    summary = record_twin(spec, path, duration_s=150, step_s=15)
    assert summary.steps == 10 and summary.gpus == 6
    reader = TraceReader(path)
    assert reader.meta.scenario is not None
    assert [f["spec"] for f in reader.meta.scenario["faults"]] == [
        "dropout:node2@45+30",
        "xid:node3/gpu1@30",
    ]
    assert list(reader.meta.budget_w) == [3000.0] * 4 + [2000.0] * 4 + [3000.0] * 2
    # The same twin, stepped alike: every recorded value is what its exporter served.
    twin = Twin(TwinSpec(**{**spec.__dict__, "step_s": 15.0}))
    fields = served_fields()
    for snap in reader.snapshots():
        served = dcgm_metric_values(twin, fields)
        down = 45 <= snap.time_s < 75
        node2 = snap.node_of() == "node2"
        assert list(snap.stale) == list(node2 & down)
        if down:
            np.testing.assert_allclose(snap.age_s[node2], snap.time_s - 45)
        for metric, values in served.items():
            got = snap.column(metric)[0]
            np.testing.assert_allclose(got[~snap.stale], values[~snap.stale], rtol=0, atol=1e-6)
            assert np.isnan(got[snap.stale]).all()
        # The twin applies a fault from the physics step that starts at or after its time.
        if snap.time_s >= 45:
            assert snap.column(Metric.XID)[0][5] == 79
        assert list(snap.labels["priority"]) == list(twin.job_priority().astype(str))
        assert set(snap.model) == {"NVIDIA H100 80GB HBM3"}
        twin.step()


def test_openmetrics_export(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    with TraceWriter(path, time_base="unix", step_s=15, source={}, metrics=METRICS) as w:
        w.append(_snap(1000.0, [400.5, 300.0], stale=[False, True], jobs=["7", ""]))
        w.append(_snap(1015.0, [401.25, 301.0], jobs=["7", ""]))
    out = tmp_path / "t.om"
    with out.open("w") as f:
        n = write_openmetrics(path, f, offset_s=100.0)
    text = out.read_text()
    assert text.endswith("# EOF\n")
    assert "# TYPE DCGM_FI_DEV_POWER_USAGE gauge" in text
    power = re.findall(r"^DCGM_FI_DEV_POWER_USAGE\{(.*)\} (\S+) (\S+)$", text, re.M)
    assert [(v, t) for _, v, t in power] == [
        ("400.5", "1100.000"),
        ("401.25", "1115.000"),
        ("301", "1115.000"),  # the stale sample is left out
    ]
    assert 'Hostname="node1",gpu="0",UUID="GPU-0000"' in power[0][0]
    assert 'hpc_job="7"' in power[0][0] and "hpc_job" not in power[2][0]
    assert not re.search(r"^DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION\{", text, re.M)  # all missing
    assert n == 4 * 3 - 0  # power, limit, temp, util x 3 fresh samples


def _trace(tmp_path: Path, steps: int = 40) -> Path:
    path = tmp_path / "t.parquet"
    with TraceWriter(
        path, time_base="twin", step_s=1, source={}, metrics=METRICS, rows_per_group=64
    ) as w:
        for k in range(steps):
            w.append(_snap(k, [100.0 + k] * 8, gpus_per_node=4))
    return path


def test_truncated_file_names_the_footer(tmp_path: Path) -> None:
    path = _trace(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match=rf"trace {re.escape(str(path))}: .*truncated.*footer"):
        TraceReader(path)


def test_corrupted_page_names_row_group_and_column(tmp_path: Path) -> None:
    path = _trace(tmp_path)
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(2).column(8)  # power_mw in the third row group
    assert col.path_in_schema == "power_mw"
    data = bytearray(path.read_bytes())
    middle = col.data_page_offset + col.total_compressed_size // 2
    for i in range(middle, middle + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    reader = TraceReader(path)  # the footer is intact
    reader.block(0)
    with pytest.raises(TraceError, match=r"row group 2 \(steps 16\.\.23\), column 'power_mw'"):
        list(reader.snapshots())


def test_not_a_trace(tmp_path: Path) -> None:
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), plain)
    with pytest.raises(TraceError, match="not an ooda trace"):
        TraceReader(plain)
    text = tmp_path / "x.parquet"
    text.write_text("hello")
    with pytest.raises(TraceError, match="not a trace or truncated"):
        TraceReader(text)
    with pytest.raises(TraceError, match="no such file"):
        TraceReader(tmp_path / "missing.parquet")


def test_unclosed_writer_leaves_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    w = TraceWriter(path, time_base="twin", step_s=1, source={}, metrics=METRICS)
    w.append(_snap(0, [1.0]))
    w.flush()
    with pytest.raises(TraceError, match="truncated"):
        TraceReader(path)
    w.close()
    assert TraceReader(path).meta.steps == 1


def test_steps_must_move_forward(tmp_path: Path) -> None:
    with (
        TraceWriter(
            tmp_path / "t.parquet", time_base="twin", step_s=1, source={}, metrics=METRICS
        ) as w,
        pytest.raises(ValueError, match="forward"),
    ):
        w.append(_snap(5, [1.0]))
        w.append(_snap(5, [1.0]))


def _round_trip(path: Path, snap: Snapshot) -> Snapshot:
    """`snap` written as a one-step trace and read back."""
    with TraceWriter(path, time_base="unix", step_s=15, source={}, metrics=METRICS) as w:
        w.append(snap)
    return TraceReader(path).snapshot(0)


def test_snapshot_with_unseen_gpus(tmp_path: Path) -> None:
    """A GPU not seen yet at a step (age NaN) is left out of that step's Snapshot."""
    path = tmp_path / "t.parquet"
    snap = _gpus(
        0.0,
        ["u1", "u2"],
        {Metric.POWER_W: [1.0, math.nan]},
        node=["a", "b"],
        gpu=[0, 0],
        age_s=[0.0, math.nan],
        stale=[False, True],
    )
    back = _round_trip(path, snap)
    assert list(back.uuid) == ["u1"] and list(back.node_names) == ["a"]


def _on_n1(*indexes: str) -> list[tuple[dict[str, str], Callable[[int], bool]]]:
    """GPUs of node n1 by index, live at every step."""
    ident = {"Hostname": "n1", "modelName": "NVIDIA H100 80GB HBM3"}
    return [({**ident, "gpu": i, "UUID": f"U{i}"}, lambda k: True) for i in indexes]


class _RangeAnswers:
    """Range-query answers, a point per step from T0 within the range asked: the live query's
    from `series` (each one's labels, and the steps it is live at), 300 W for every live GPU
    from the field query, and the budget signal (one value per step)."""

    T0 = 1_700_000_040.0

    def __init__(
        self,
        series: list[tuple[dict[str, str], Callable[[int], bool]]],
        budget: Sequence[str] = (),
    ) -> None:
        self.series = series
        self.budget = budget

    def custom_query_range(
        self, query: str, *, start_time: Any, end_time: Any, **_: object
    ) -> list[dict[str, object]]:
        first = round((start_time.timestamp() - self.T0) / 15)
        steps = range(first, round((end_time.timestamp() - self.T0) / 15) + 1)

        def t(k: int) -> float:
            return self.T0 + 15 * k

        if "facility_budget" in query:
            points = [[t(k), self.budget[k]] for k in steps if k < len(self.budget)]
            return [{"metric": {}, "values": points}]
        out: list[dict[str, object]] = []
        for labels, live in self.series:
            ks = [k for k in steps if live(k)]
            if not ks:
                continue
            if "timestamp(" in query:  # each step's sample, taken a second before it
                out.append({"metric": labels, "values": [[t(k), str(t(k) - 1)] for k in ks]})
            else:
                field = {"__name__": "DCGM_FI_DEV_POWER_USAGE", "Hostname": labels["Hostname"]}
                out.append(
                    {
                        "metric": field | {"gpu": labels["gpu"]},
                        "values": [[t(k), "300"] for k in ks],
                    }
                )
        return out

    def close(self) -> None:
        pass


def _record(
    path: Path,
    answers: _RangeAnswers,
    steps: int,
    settings: PrometheusSettings | None = None,
    **kw: Any,
) -> list[Snapshot]:
    """`steps` steps (15 s apart, from `_RangeAnswers.T0`) recorded through a PrometheusSource on
    `answers` into `path` (with the settings' extra labels), read back."""
    settings = settings or PrometheusSettings(scrape_interval_s=15)
    source = PrometheusSource(settings, client=answers)  # type: ignore[arg-type]
    t0 = _RangeAnswers.T0
    metrics = list(source.value_metrics.values())
    with TraceWriter(
        path, time_base="unix", step_s=15, source={}, metrics=metrics, labels=settings.extra_labels
    ) as w:
        record_prometheus(source, w, start_s=t0, end_s=t0 + 15 * (steps - 1), step_s=15, **kw)
    return list(TraceReader(path).snapshots())


def test_recorded_budget_is_screened_as_the_live_source_screens_it(tmp_path: Path) -> None:
    """The live source takes no budget from 0 W, a negative or a non-finite reading; a trace
    recorded from the same Prometheus holds none there either (replay would see 0 W)."""
    snaps = _record(
        tmp_path / "t.parquet",
        _RangeAnswers(_on_n1("0"), ["5000", "0", "-1", "NaN", "+Inf"]),
        5,
        PrometheusSettings(scrape_interval_s=15, budget_query="facility_budget"),
    )
    assert [s.budget_w for s in snaps] == [5000.0, None, None, None, None]
    assert [s.column(Metric.POWER_W)[0][0] for s in snaps] == [300.0] * 5


def test_a_value_the_column_cannot_hold_is_missing_not_another_number(tmp_path: Path) -> None:
    """Power is int32 mW (to 2,147 kW), energy int64 mJ, others float32: a broken exporter's
    3,000,000 W would wrap to -2,147,483 W; out of range reads back missing instead."""
    snap = _gpus(
        100.0,
        ["A", "B", "C"],
        {
            Metric.POWER_W: [3.0e6, 300.0, -3.0e6],
            Metric.POWER_LIMIT_W: [2_147_483.0, 2_147_484.0, -2_147_483.0],
            Metric.ENERGY_J: [1e17, 5.0e6, 9.2e15],
            Metric.TEMP_C: [1e39, 50.0, -1e39],
        },
    )
    back = _round_trip(tmp_path / "t.parquet", snap)
    np.testing.assert_array_equal(back.column(Metric.POWER_W)[0], [np.nan, 300.0, np.nan])
    np.testing.assert_array_equal(
        back.column(Metric.POWER_LIMIT_W)[0], [2_147_483.0, np.nan, -2_147_483.0]
    )
    np.testing.assert_array_equal(back.column(Metric.ENERGY_J)[0], [np.nan, 5.0e6, 9.2e15])
    np.testing.assert_array_equal(back.column(Metric.TEMP_C)[0], [np.nan, 50.0, np.nan])
    assert list(back.column(Metric.POWER_W)[1]) == [False, True, False]


def test_a_gpu_index_the_gpu_column_cannot_hold_is_refused_not_wrapped(tmp_path: Path) -> None:
    snap = _gpus(0.0, ["A", "B"], {Metric.POWER_W: [1.0, 2.0]}, gpu=[0, 40_000])
    w = TraceWriter(tmp_path / "t.parquet", time_base="twin", step_s=1, source={})
    w.append(snap)
    with pytest.raises(ValueError, match=r"GPU index 40000 of 'B' on node 'n1' does not fit"):
        w.close()
    w.abort()


def test_the_recorder_leaves_out_a_gpu_index_a_trace_cannot_hold(tmp_path: Path) -> None:
    """A series with gpu="40000" is as unusable as one without an index: the other GPUs are
    recorded, and no index is wrapped to another."""
    snaps = _record(tmp_path / "t.parquet", _RangeAnswers(_on_n1("0", "40000")), 3)
    assert [list(s.uuid) for s in snaps] == [["U0"]] * 3


def _labelled(t: float, nodes: list[str], gpus: list[int], priority: list[str]) -> Snapshot:
    return _gpus(
        t,
        ["A", "B"],
        {Metric.POWER_W: [100.0, 300.0]},
        node=nodes,
        gpu=gpus,
        job=["" if p == "0" else "j7" for p in priority],
        labels={"priority": priority},
    )


def test_labels_nodes_and_indexes_read_back_as_they_were_at_each_step(tmp_path: Path) -> None:
    """The twin's `priority` follows the job on a GPU; a host can be renamed; an index can
    change with the same UUIDs. Each step reads back as written, not as the block's first."""
    path = tmp_path / "t.parquet"
    written = [
        _labelled(0.0, ["n1", "n2"], [0, 0], ["0", "0"]),
        _labelled(15.0, ["n1", "n2"], [0, 0], ["0", "2"]),  # a class-2 job starts on B
        _labelled(30.0, ["n1", "n2"], [0, 0], ["1", "2"]),
        _labelled(45.0, ["n1", "n3"], [0, 0], ["1", "2"]),  # B's host renamed n2 -> n3
        _labelled(60.0, ["n1", "n3"], [0, 1], ["1", "0"]),  # B's index changed
    ]
    with TraceWriter(
        path, time_base="twin", step_s=15, source={}, metrics=METRICS, labels=("priority",)
    ) as w:
        for snap in written:
            w.append(snap)
        summary = w.close()
    # A label change stays in its block; a GPU's node or index starts a new one.
    assert summary.row_groups == 3
    back = list(TraceReader(path).snapshots())
    for orig, got in zip(written, back, strict=True):
        assert list(got.labels["priority"]) == list(orig.labels["priority"])
        assert list(got.job) == list(orig.job)
        assert list(got.node_of()) == list(orig.node_of())
        assert list(got.gpu) == list(orig.gpu)
        assert list(got.uuid) == ["A", "B"]


def test_a_label_not_given_at_a_step_is_missing_there(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    no_label = _snap(15.0, [1.0, 2.0])
    with TraceWriter(
        path, time_base="twin", step_s=15, source={}, metrics=METRICS, labels=("priority",)
    ) as w:
        w.append(replace(_snap(0.0, [1.0, 2.0]), labels={"priority": np.array(["3", "1"])}))
        w.append(no_label)
    back = list(TraceReader(path).snapshots())
    assert [list(s.labels["priority"]) for s in back] == [["3", "1"], ["", ""]]
    table = pq.read_table(path, columns=["label.priority"])
    assert table.column("label.priority").null_count == 2  # "" is stored as null


@pytest.mark.parametrize(("version", "readable"), [(1, True), (2, True), (3, False)])
def test_versions_read_and_refused(tmp_path: Path, version: int, readable: bool) -> None:
    """Version 1 files (one label value per GPU) still read; a version from the future is
    refused by its number."""
    import json

    path = _trace(tmp_path, steps=8)
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    header = json.loads(meta[b"ooda.trace"])
    meta[b"ooda.trace.steps"] = pq.ParquetFile(path).metadata.metadata[b"ooda.trace.steps"]
    meta[b"ooda.trace"] = json.dumps(header | {"version": version}).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)
    if readable:
        assert len(list(TraceReader(path).snapshots())) == 8
    else:
        with pytest.raises(TraceError, match=r"version 3 is not supported \(this reader: 1, 2\)"):
            TraceReader(path)


def _racked() -> list[tuple[dict[str, str], Callable[[int], bool]]]:
    """Two GPUs of node n1 carrying a `rack` label: GPU 0 live throughout, moved from rack r1 to
    r9 at step 30; GPU 1 (rack r2) live until step 58, then silent."""
    ident = {"Hostname": "n1", "modelName": "m"}
    return [
        ({**ident, "gpu": "0", "UUID": "U0", "rack": "r1"}, lambda k: k < 30),
        ({**ident, "gpu": "0", "UUID": "U0", "rack": "r9"}, lambda k: k >= 30),
        ({**ident, "gpu": "1", "UUID": "U1", "rack": "r2"}, lambda k: k <= 58),
    ]


def test_the_recorder_keeps_the_group_label_per_step(tmp_path: Path) -> None:
    """`ooda record` with a group label: each step holds each GPU's label then (a change shows at
    its step), and a GPU gone silent keeps its last label while it is stale, across chunks, as the
    live source keeps a stale GPU's labels from its inventory."""
    settings = PrometheusSettings(scrape_interval_s=15, extra_labels=("rack",))
    snaps = _record(tmp_path / "t.parquet", _RangeAnswers(_racked()), 70, settings, max_points=40)
    assert len(snaps) == 70
    racks = [list(s.labels["rack"]) for s in snaps]
    assert racks[0] == ["r1", "r2"] and racks[29] == ["r1", "r2"] and racks[30] == ["r9", "r2"]
    assert racks[58] == ["r9", "r2"] and not snaps[58].stale.any()
    assert racks[59] == racks[69] == ["r9", "r2"]  # U1 stale from step 59, label kept
    assert list(snaps[69].stale) == [False, True]


def _moved() -> list[tuple[dict[str, str], Callable[[int], bool]]]:
    """GPU U0 on node n1 until step 29 and on node n2 from step 30 (moved); U1 on n1 throughout."""
    return [
        ({"Hostname": "n1", "gpu": "0", "UUID": "U0", "modelName": "m"}, lambda k: k < 30),
        ({"Hostname": "n2", "gpu": "0", "UUID": "U0", "modelName": "m"}, lambda k: k >= 30),
        ({"Hostname": "n1", "gpu": "1", "UUID": "U1", "modelName": "m"}, lambda k: True),
    ]


def test_the_recorder_keeps_a_moved_gpu_once(tmp_path: Path) -> None:
    """A GPU that moved host is one GPU at every step, within a chunk and across chunks: its old
    key, stale, is left out wherever its new one is fresh."""
    snaps = _record(tmp_path / "t.parquet", _RangeAnswers(_moved()), 70, max_points=40)
    assert len(snaps) == 70
    for snap in snaps:
        assert sorted(snap.uuid.tolist()) == ["U0", "U1"], snap.time_s
        assert not snap.stale.any()
    assert list(snaps[29].node_of()) == ["n1", "n1"]
    assert list(snaps[30].node_of()) == ["n1", "n2"] and list(snaps[65].node_of()) == ["n1", "n2"]
