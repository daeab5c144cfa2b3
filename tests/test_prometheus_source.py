"""PrometheusSource's parsing and joins, against a hand-written fake of prometheus-api-client's
client (canned answers per query shape), and its errors against a real closed port."""

from __future__ import annotations

import math
from json import loads as json_loads
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.dcgm import DCGM_FIELDS
from agent.core.errors import TelemetryError
from agent.core.snapshot import Metric
from agent.observe.prometheus import (
    PrometheusSettings,
    PrometheusSource,
    Vector,
    fast_series,
    lookup,
)
from tests.conftest import free_port

NOW = 1_700_000_000.0
MODEL = "NVIDIA H100 80GB HBM3"


def sample(value: float, **labels: str) -> dict[str, Any]:
    return {"metric": labels, "value": [NOW, repr(value)]}


def per_field(values: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Answers for the per-field value queries, `max by (...) (NAME...)`."""
    names = {v["metric"]["__name__"] for v in values}
    return [
        (
            f"({name}",
            [
                {
                    "metric": {k: x for k, x in v["metric"].items() if k != "__name__"},
                    "value": v["value"],
                }
                for v in values
                if v["metric"]["__name__"] == name
            ],
        )
        for name in sorted(names)
    ]


class FakePrometheus:
    """Answers instant queries by the first marker found in the query text."""

    def __init__(self, answers: list[tuple[str, list[dict[str, Any]]]]) -> None:
        self.answers = answers
        self.queries: list[tuple[str, dict[str, str]]] = []
        self.closed = False

    def custom_query(self, query: str, params: dict[str, str] | None = None) -> Any:
        self.queries.append((query, params or {}))
        for marker, result in self.answers:
            if marker in query:
                return result
        return []

    def close(self) -> None:
        self.closed = True


def gpu(host: str, i: int, *, new_label: bool = False) -> dict[str, str]:
    key = "hostname" if new_label else "Hostname"
    return {key: host, "gpu": str(i), "UUID": f"GPU-{host}-{i}", "modelName": MODEL}


def test_joins_values_by_host_and_gpu_and_marks_stale_gpus() -> None:
    inventory = [gpu("node1", 0), gpu("node1", 1), gpu("node2", 0, new_label=True)]
    live = [
        {"metric": {**gpu("node1", 0), "hpc_job": "42"}, "value": [NOW, str(NOW - 2)]},
        {"metric": {**gpu("node1", 1)}, "value": [NOW, str(NOW - 1)]},
    ]
    values = [
        sample(410.5, __name__="DCGM_FI_DEV_POWER_USAGE", Hostname="node1", gpu="0"),
        sample(90.0, __name__="DCGM_FI_DEV_POWER_USAGE", Hostname="node1", gpu="1"),
        sample(61.0, __name__="DCGM_FI_DEV_GPU_TEMP", Hostname="node1", gpu="0"),
        sample(5e6, __name__="DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", Hostname="node1", gpu="0"),
        # node2 is not live: whatever values linger are not used.
        sample(300.0, __name__="DCGM_FI_DEV_POWER_USAGE", hostname="node2", gpu="0"),
    ]
    fake = FakePrometheus(
        [
            ("last_over_time", [{"metric": m, "value": [NOW, "1"]} for m in inventory]),
            ("timestamp(", live),
            *per_field(values),
        ]
    )
    fake.answers.insert(
        0,
        (
            "max_over_time",
            [{"metric": {"hostname": "node2", "gpu": "0"}, "value": [NOW, str(NOW - 95)]}],
        ),
    )
    source = PrometheusSource(PrometheusSettings(scrape_interval_s=15), client=fake)
    snap = source.observe(NOW)
    assert list(snap.node_of()) == ["node1", "node1", "node2"]
    assert list(snap.gpu) == [0, 1, 0]
    assert list(snap.uuid) == ["GPU-node1-0", "GPU-node1-1", "GPU-node2-0"]
    assert list(snap.job) == ["42", "", ""]
    np.testing.assert_allclose(snap.age_s, [2.0, 1.0, 95.0])
    assert list(snap.stale) == [False, False, True]
    power, ok = snap.column(Metric.POWER_W)
    assert power[0] == 410.5 and power[1] == 90.0 and math.isnan(power[2])
    assert list(ok) == [True, True, False]
    temp, temp_ok = snap.column(Metric.TEMP_C)
    assert temp[0] == 61.0 and not temp_ok[1]  # missing, not 0
    assert snap.column(Metric.ENERGY_J)[0][0] == 5000.0  # mJ -> J
    limit, limit_ok = snap.column(Metric.POWER_LIMIT_W)
    assert not limit_ok.any() and np.isnan(limit).all()  # not exported: missing
    assert source.queries == 2 + len(DCGM_FIELDS) + 1  # inventory, live, one per field, stale
    # Every query was evaluated at the same time; the stale-host one names only node2.
    assert {p["time"] for _, p in fake.queries} == {f"{NOW:.3f}"}
    stale_query = next(q for q, _ in fake.queries if "max_over_time" in q)
    assert "[600s:15s]" in stale_query
    assert '"node2"' in stale_query and "node1" not in stale_query
    assert 'timestamp(DCGM_FI_DEV_POWER_USAGE{Hostname=~"node2"})' in stale_query
    assert 'timestamp(DCGM_FI_DEV_POWER_USAGE{hostname=~"node2"})' in stale_query


def test_old_samples_are_stale_even_when_prometheus_still_has_them() -> None:
    live = [{"metric": gpu("node1", 0), "value": [NOW, str(NOW - 100)]}]
    fake = FakePrometheus([("last_over_time", []), ("timestamp(", live)])
    source = PrometheusSource(PrometheusSettings(scrape_interval_s=15), client=fake)
    snap = source.observe(NOW)
    assert snap.n_gpus == 1 and bool(snap.stale[0]) and snap.age_s[0] == 100.0


def test_a_job_change_keeps_the_newest_series() -> None:
    live = [
        {"metric": {**gpu("node1", 0), "hpc_job": "old"}, "value": [NOW, str(NOW - 14)]},
        {"metric": {**gpu("node1", 0), "hpc_job": "new"}, "value": [NOW, str(NOW - 1)]},
    ]
    fake = FakePrometheus([("timestamp(", live)])
    snap = PrometheusSource(PrometheusSettings(), client=fake).observe(NOW)
    assert snap.n_gpus == 1 and snap.job[0] == "new" and snap.age_s[0] == 1.0


def test_series_without_host_or_gpu_are_reported_not_guessed() -> None:
    live = [
        {"metric": {"gpu": "0", "UUID": "GPU-x"}, "value": [NOW, str(NOW)]},
        {"metric": {"Hostname": "n", "gpu": "MIG-1"}, "value": [NOW, str(NOW)]},
        {"metric": {"Hostname": "n", "gpu": "9" * 20}, "value": [NOW, str(NOW)]},
    ]
    fake = FakePrometheus([("timestamp(", live)])
    snap = PrometheusSource(PrometheusSettings(), client=fake).observe(NOW)
    assert snap.n_gpus == 0
    assert any("3 series without a host label" in e for e in snap.errors)


def test_a_zero_padded_gpu_label_joins_its_values() -> None:
    """Identity and values are joined by (host, gpu index): "03" and "3" are one GPU."""
    labels = {"Hostname": "node1", "gpu": "03", "UUID": "GPU-a", "modelName": MODEL}
    live = [{"metric": labels, "value": [NOW, str(NOW - 1)]}]
    values = [sample(410.5, __name__="DCGM_FI_DEV_POWER_USAGE", Hostname="node1", gpu="03")]
    fake = FakePrometheus([("timestamp(", live), *per_field(values)])
    snap = PrometheusSource(PrometheusSettings(), client=fake).observe(NOW)
    assert snap.gpu.tolist() == [3] and snap.column(Metric.POWER_W)[0].tolist() == [410.5]


def test_an_unchanged_fleet_keeps_one_frozen_identity_array() -> None:
    """Cycle after cycle the same UUIDs come as the same read-only array (state keyed by UUID
    then knows them without comparing); a change gives a new one."""
    live = [{"metric": gpu("node1", i), "value": [NOW, str(NOW - 1)]} for i in range(2)]
    fake = FakePrometheus([("timestamp(", live)])
    source = PrometheusSource(PrometheusSettings(), client=fake)
    first, second = source.observe(NOW), source.observe(NOW + 15)
    assert second.uuid is first.uuid and not second.uuid.flags.writeable
    live.append({"metric": gpu("node2", 0), "value": [NOW, str(NOW - 1)]})
    third = source.observe(NOW + 30)
    assert third.uuid is not first.uuid and third.uuid.tolist()[-1] == "GPU-node2-0"


def test_relabelled_names_and_matchers() -> None:
    settings = PrometheusSettings(
        metrics={Metric.POWER_W: "gpu_power_watts", Metric.TEMP_C: "gpu_temp"},
        host_labels=("node",),
        gpu_label="index",
        match={"cluster": "lab"},
    )
    live = [{"metric": {"node": "a", "index": "3", "UUID": "u"}, "value": [NOW, str(NOW)]}]
    values = [sample(55.0, __name__="gpu_temp", node="a", index="3")]
    fake = FakePrometheus([("timestamp(", live), *per_field(values)])
    snap = PrometheusSource(settings, client=fake).observe(NOW)
    assert snap.column(Metric.TEMP_C)[0][0] == 55.0
    texts = " ".join(q for q, _ in fake.queries)
    assert 'gpu_power_watts{cluster="lab"}' in texts
    assert "by (node, index" in texts
    assert "DCGM" not in texts


@pytest.mark.parametrize(
    ("answer", "budget", "error"),
    [
        ([sample(25000.0)], 25000.0, None),
        ([NOW, "18000"], 18000.0, None),  # a scalar expression
        ([], None, "returned 0 series"),
        ([sample(1.0), sample(2.0)], None, "returned 2 series"),
        ([sample(-5.0)], None, "not a positive number"),
        # A range vector or a string answer: a budget error, not a failed cycle.
        ([{"metric": {}, "values": [[NOW, "5000"]]}], None, "malformed answer (KeyError"),
        ([NOW, "five kW"], None, "malformed answer (ValueError"),
    ],
)
def test_budget_from_promql(answer: Any, budget: float | None, error: str | None) -> None:
    fake = FakePrometheus([("facility_budget", answer)])
    source = PrometheusSource(
        PrometheusSettings(budget_query="facility_budget_watts"),
        client=fake,
    )
    snap = source.observe(NOW)
    assert snap.budget_w == budget
    if error is None:
        assert not snap.errors
    else:
        assert any(error in e for e in snap.errors)


def test_unreachable_prometheus_names_url_and_cause() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    source = PrometheusSource(PrometheusSettings(url=url, retries=1, timeout_s=2))
    with pytest.raises(TelemetryError) as exc:
        source.observe(NOW)
    message = str(exc.value)
    assert message.startswith(f"prometheus {url}: connection refused")


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="power_w is required"):
        PrometheusSettings(metrics={Metric.TEMP_C: "t"})
    with pytest.raises(ValueError, match="label name"):
        PrometheusSettings(host_labels=("bad-label",))
    assert PrometheusSettings(scrape_interval_s=5).staleness_limit_s == 15


def test_lookup() -> None:
    keys = np.array(["b", "a", "c"])
    assert list(lookup(keys, np.array(["a", "z", "c", "b"]))) == [1, -1, 2, 0]
    assert list(lookup(np.array([], dtype=np.str_), np.array(["a"]))) == [-1]


def node1_source(
    settings: PrometheusSettings, fields: dict[str, float]
) -> tuple[FakePrometheus, PrometheusSource, list[dict[str, Any]], list[dict[str, Any]]]:
    """A source over a fake Prometheus where node1's GPU 0 is live with `fields` (name ->
    value); also the fake's live and value answers, to change between cycles."""
    live = [{"metric": gpu("node1", 0), "value": [NOW, str(NOW - 1)]}]
    values = [sample(v, __name__=name, Hostname="node1", gpu="0") for name, v in fields.items()]
    fake = FakePrometheus([("timestamp(", live), *per_field(values)])
    return fake, PrometheusSource(settings, client=fake), live, values


def test_static_fields_are_read_again_only_when_due_or_for_a_new_gpu() -> None:
    fake, source, live, values = node1_source(
        PrometheusSettings(scrape_interval_s=15, static_refresh_s=300),
        {
            "DCGM_FI_DEV_POWER_MGMT_LIMIT_MAX": 700.0,
            "DCGM_FI_DEV_POWER_MGMT_LIMIT_MIN": 200.0,
            "DCGM_FI_DEV_POWER_USAGE": 410.0,
        },
    )

    def limit_queries() -> int:
        return sum("LIMIT_MAX" in q for q, _ in fake.queries)

    assert source.observe(NOW).column(Metric.MAX_LIMIT_W)[0][0] == 700.0
    assert limit_queries() == 1
    snap = source.observe(NOW + 15)  # not due: from the last read, not asked again
    assert limit_queries() == 1
    assert snap.column(Metric.MAX_LIMIT_W)[0][0] == 700.0
    assert snap.column(Metric.MIN_LIMIT_W)[0][0] == 200.0
    assert snap.column(Metric.POWER_W)[0][0] == 410.0
    assert source.queries == 1 + len(DCGM_FIELDS) - 3  # the inventory is not due either
    # A GPU the last read did not cover: read again at once.
    live.append({"metric": gpu("node2", 0), "value": [NOW, str(NOW + 29)]})
    values.append(
        sample(600.0, __name__="DCGM_FI_DEV_POWER_MGMT_LIMIT_MAX", Hostname="node2", gpu="0")
    )
    fake.answers = [("timestamp(", live), *per_field(values)]
    snap = source.observe(NOW + 30)
    assert limit_queries() == 2
    assert list(snap.column(Metric.MAX_LIMIT_W)[0]) == [700.0, 600.0]
    source.observe(NOW + 45)
    assert limit_queries() == 2
    source.observe(NOW + 400)  # due
    assert limit_queries() == 3
    source.observe(NOW + 100)  # the clock went back: read again
    assert limit_queries() == 4


def test_a_fallback_field_is_read_only_while_some_gpu_lacks_the_field_it_stands_in_for() -> None:
    fake, source, live, values = node1_source(
        PrometheusSettings(
            scrape_interval_s=15, fallbacks={Metric.ENFORCED_LIMIT_W: Metric.POWER_LIMIT_W}
        ),
        {
            "DCGM_FI_DEV_POWER_USAGE": 410.0,
            "DCGM_FI_DEV_POWER_MGMT_LIMIT": 500.0,
            "DCGM_FI_DEV_ENFORCED_POWER_LIMIT": 450.0,
        },
    )

    def enforced(t: float) -> tuple[bool, list[float]]:
        before = len(fake.queries)
        snap = source.observe(t)
        asked = any("ENFORCED" in q for q, _ in fake.queries[before:])
        return asked, snap.column(Metric.ENFORCED_LIMIT_W)[0].tolist()

    assert enforced(NOW) == (True, [450.0])  # the first cycle reads it
    asked, column = enforced(NOW + 15)  # every fresh GPU has its limit: not read, missing
    assert not asked and math.isnan(column[0])
    # node2 exports the enforced limit only: read from the cycle after it is first seen on.
    live[0]["value"][1] = str(NOW + 29)
    live.append({"metric": gpu("node2", 0), "value": [NOW, str(NOW + 29)]})
    values += [
        sample(300.0, __name__="DCGM_FI_DEV_POWER_USAGE", Hostname="node2", gpu="0"),
        sample(400.0, __name__="DCGM_FI_DEV_ENFORCED_POWER_LIMIT", Hostname="node2", gpu="0"),
    ]
    fake.answers = [("timestamp(", live), *per_field(values)]
    assert not enforced(NOW + 30)[0]
    assert enforced(NOW + 45) == (True, [450.0, 400.0])
    assert enforced(NOW + 60)[0]
    with pytest.raises(ValueError, match="fallbacks: xid cannot stand in for power_limit_w"):
        PrometheusSettings(fallbacks={Metric.XID: Metric.POWER_LIMIT_W})


def test_a_slow_field_is_read_every_so_often_and_missing_in_between() -> None:
    fake, source, _, _ = node1_source(
        PrometheusSettings(
            scrape_interval_s=15, staleness_s=600, slow_fields={Metric.MEM_UTIL_PCT: 60.0}
        ),
        {"DCGM_FI_DEV_POWER_USAGE": 410.0, "DCGM_FI_DEV_MEM_COPY_UTIL": 35.0},
    )

    def mem_util(t: float) -> float | None:
        before = len(fake.queries)
        value = float(source.observe(t).column(Metric.MEM_UTIL_PCT)[0][0])
        asked = any("MEM_COPY_UTIL" in q for q, _ in fake.queries[before:])
        assert asked is not math.isnan(value)  # missing exactly when not read
        return value if asked else None

    # Read at the first cycle, then a minute on; again at once when the clock goes back.
    read = [t for t in (0, 15, 30, 45, 60, 75, 30, 45) if mem_util(NOW + t) is not None]
    assert read == [0, 60, 30]
    with pytest.raises(ValueError, match="slow_fields: power_w has its own schedule"):
        PrometheusSettings(slow_fields={Metric.POWER_W: 60.0})
    with pytest.raises(ValueError, match=r"every 0\.0 s, want > 0"):
        PrometheusSettings(slow_fields={Metric.TEMP_C: 0.0})


def test_the_inventory_is_remembered_between_full_reads() -> None:
    """Between full reads (`static_refresh_s`) the inventory is the last cycle's GPUs plus the
    ones live now; a remembered GPU that stops answering stays, stale, while it has a sample in
    the window, and leaves when it has none."""
    live = [{"metric": gpu(h, 0), "value": [NOW, str(NOW - 1)]} for h in ("node1", "node2")]
    inventory = [{"metric": gpu("node1", 0), "value": [NOW, "1"]}]
    last_seen: list[dict[str, Any]] = []
    fake = FakePrometheus(
        [("max_over_time", last_seen), ("last_over_time", inventory), ("timestamp(", live)]
    )
    source = PrometheusSource(  # samples stay fresh long enough for the clock to move on
        PrometheusSettings(scrape_interval_s=15, staleness_s=600, static_refresh_s=300),
        client=fake,
    )

    def inventory_reads() -> int:
        return sum("last_over_time" in q for q, _ in fake.queries)

    assert list(source.observe(NOW).node_of()) == ["node1", "node2"]
    assert inventory_reads() == 1
    # node2 stops answering: remembered, stale, aged by its newest sample.
    del live[1]
    last_seen.append({"metric": {"Hostname": "node2", "gpu": "0"}, "value": [NOW, str(NOW)]})
    snap = source.observe(NOW + 60)
    assert inventory_reads() == 1
    assert list(snap.node_of()) == ["node1", "node2"]
    assert list(snap.stale) == [False, True]
    assert snap.age_s[1] == 60.0
    assert not snap.errors
    # A GPU new since the full read joins as soon as it is live.
    live.append({"metric": gpu("node3", 1), "value": [NOW, str(NOW + 89)]})
    assert list(source.observe(NOW + 90).node_of()) == ["node1", "node2", "node3"]
    # No sample of node2 left in the window: it has left the inventory, without an error.
    last_seen.clear()
    snap = source.observe(NOW + 120)
    assert list(snap.node_of()) == ["node1", "node3"]
    assert not snap.errors
    assert inventory_reads() == 1
    source.observe(NOW + 400)  # due: read in full again
    assert inventory_reads() == 2


def _body(result: list[dict[str, Any]]) -> bytes:
    import json

    doc = {"status": "success", "data": {"resultType": "vector", "result": result}}
    return json.dumps(doc, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "labels",
    [
        {"Hostname": "node1", "gpu": "0"},
        {"gpu": "3", "hostname": "rack-2.node_7"},
        {"Hostname": 'quo"te\\back', "gpu": "1"},  # escapes inside label values
        {"Hostname": "ünïcode", "gpu": "2", "hpc_job": "42", "modelName": "NVIDIA H100"},
    ],
)
def test_plain_bodies_are_read_as_the_full_decoder_reads_them(labels: dict[str, str]) -> None:
    result = [
        {"metric": labels, "value": [NOW, v]} for v in ("410.5", "NaN", "+Inf", "-1e-06", "0")
    ]
    fast = fast_series(_body(result))
    assert fast is not None
    texts, values = fast
    full = Vector.parse(result, list(labels))
    assert [json_loads(t) for t in texts] == [labels] * len(result)
    np.testing.assert_array_equal(values, full.values)


@given(
    series=st.lists(
        st.tuples(
            st.dictionaries(
                st.text("abcXYZ_", min_size=1, max_size=8), st.text(max_size=12), max_size=4
            ),
            st.one_of(
                st.floats(allow_nan=False, width=64).map(repr),
                st.sampled_from(["NaN", "+Inf", "-Inf", "1e-06", "0"]),
            ),
        ),
        min_size=1,
        max_size=6,
    ),
    ascii_only=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_any_body_reads_as_the_full_decoder_reads_it_or_is_left_to_it(
    series: list[tuple[dict[str, str], str]], ascii_only: bool
) -> None:
    """Label values are anyone's text (quotes, braces, escapes, any script): the fast reader
    gives exactly what the full decoder gives, or declines."""
    import json

    result = [{"metric": labels, "value": [NOW, value]} for labels, value in series]
    doc = {"status": "success", "data": {"resultType": "vector", "result": result}}
    fast = fast_series(json.dumps(doc, separators=(",", ":"), ensure_ascii=ascii_only).encode())
    if fast is None:
        return
    texts, values = fast
    assert [json_loads(t) for t in texts] == [labels for labels, _ in series]
    expected = np.array([float(value) for _, value in series])
    np.testing.assert_array_equal(values, expected)


@pytest.mark.parametrize(
    "body",
    [
        # A label value with a brace: not the plain shape, decoded in full instead.
        _body([{"metric": {"Hostname": "n{1}", "gpu": "0"}, "value": [NOW, "1"]}]),
        # A value numpy cannot read.
        _body([{"metric": {"Hostname": "n1", "gpu": "0"}, "value": [NOW, "one"]}]),
        _body([]),
        b'{"status":"success","data":{"resultType":"scalar","result":[1700000000,"3"]}}',
        # A series the pattern does not match beside one it does: all or nothing.
        _body(
            [
                {"metric": {"Hostname": "n1", "gpu": "0"}, "value": [NOW, "1"]},
                {"metric": {"Hostname": "n2", "gpu": "0"}, "value": [NOW, "1"], "x": 1},
            ]
        ),
    ],
)
def test_other_bodies_are_left_to_the_full_decoder(body: bytes) -> None:
    assert fast_series(body) is None


def test_sparse_health_counters_read_only_where_not_zero_between_full_reads() -> None:
    """XID and the other health counters are read in full with the static fields; in between
    only their non-zero values are asked for: a GPU that exported the counter reads 0 when it is
    not in the answer, one that did not export it stays missing (NaN), never 0."""
    live = [{"metric": gpu("node1", i), "value": [NOW, str(NOW + 100)]} for i in (0, 1)]
    xid = [sample(0.0, Hostname="node1", gpu="0")]  # gpu 1 does not export XIDs
    nonzero: list[dict[str, Any]] = []
    fake = FakePrometheus(
        [("timestamp(", live), ("XID_ERRORS != 0)", nonzero), ("(DCGM_FI_DEV_XID_ERRORS", xid)]
    )
    source = PrometheusSource(
        PrometheusSettings(scrape_interval_s=15, static_refresh_s=300), client=fake
    )

    def xid_column(at: float) -> list[float]:
        return list(source.observe(at).column(Metric.XID)[0])

    assert xid_column(NOW + 100) == [0.0, pytest.approx(math.nan, nan_ok=True)]
    assert sum("XID_ERRORS != 0" in q for q, _ in fake.queries) == 0  # the full read
    nonzero.append(sample(79.0, Hostname="node1", gpu="0"))
    assert xid_column(NOW + 110)[0] == 79.0
    assert sum("XID_ERRORS != 0" in q for q, _ in fake.queries) == 1
    nonzero.clear()  # cleared (DCGM keeps the last XID; here the exporter restarted)
    values = xid_column(NOW + 115)
    assert values[0] == 0.0 and math.isnan(values[1])
    # A GPU the last full read did not cover: read in full again at once.
    live.append({"metric": gpu("node2", 0), "value": [NOW, str(NOW + 119)]})
    xid.append(sample(0.0, Hostname="node2", gpu="0"))
    full_reads = sum("(DCGM_FI_DEV_XID_ERRORS)" in q for q, _ in fake.queries)
    assert xid_column(NOW + 120)[2] == 0.0
    assert sum("(DCGM_FI_DEV_XID_ERRORS)" in q for q, _ in fake.queries) == full_reads + 1


def test_a_slow_health_counter_keeps_its_last_reading_between_reads() -> None:
    """A health counter that is also a slow field is asked (`!= 0`) only every so often, and
    read in full with the static fields whether due or not; in between it keeps its last
    reading, never missing and never 0 in place of a count seen. XID, not slow, is asked
    every cycle."""
    live = [{"metric": gpu("node1", i), "value": [NOW, str(NOW + 400)]} for i in (0, 1)]
    ecc = [sample(0.0, Hostname="node1", gpu="0")]  # gpu 1 does not export the counter
    nonzero: list[dict[str, Any]] = []
    fake = FakePrometheus(
        [
            ("timestamp(", live),
            ("ECC_DBE_VOL_TOTAL != 0)", nonzero),
            ("(DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", ecc),
        ]
    )
    source = PrometheusSource(
        PrometheusSettings(
            scrape_interval_s=15,
            static_refresh_s=300,
            slow_fields={Metric.ECC_DBE_TOTAL: 60.0},
        ),
        client=fake,
    )

    def ecc_at(t: float) -> tuple[str, float, float]:
        before = len(fake.queries)
        column = source.observe(NOW + t).column(Metric.ECC_DBE_TOTAL)[0]
        asked = [q for q, _ in fake.queries[before:] if "ECC_DBE" in q]
        assert sum("XID_ERRORS" in q for q, _ in fake.queries[before:]) == 1
        how = "" if not asked else "nonzero" if "!= 0" in asked[0] else "full"
        return how, float(column[0]), float(column[1])

    nan = pytest.approx(math.nan, nan_ok=True)
    assert ecc_at(100) == ("full", 0.0, nan)
    nonzero.append(sample(2.0, Hostname="node1", gpu="0"))
    assert ecc_at(115) == ("", 0.0, nan)  # not due: the last reading
    assert ecc_at(160) == ("nonzero", 2.0, nan)
    assert ecc_at(175) == ("", 2.0, nan)  # not 0: the count seen is kept
    nonzero.clear()  # a volatile counter cleared by a reboot
    assert ecc_at(220) == ("nonzero", 0.0, nan)
    nonzero.append(sample(5.0, Hostname="node1", gpu="0"))
    assert ecc_at(370) == ("nonzero", 5.0, nan)
    ecc[0] = sample(5.0, Hostname="node1", gpu="0")
    assert ecc_at(400) == ("full", 5.0, nan)  # the full read, though not due
    assert ecc_at(415) == ("", 5.0, nan)
    with pytest.raises(ValueError, match="slow_fields: max_limit_w has its own schedule"):
        PrometheusSettings(slow_fields={Metric.MAX_LIMIT_W: 60.0})


def test_a_gpu_stale_at_the_full_read_is_read_again_when_it_is_back() -> None:
    """node1/gpu0 is down at the full read of the static fields; back 30 s later (with its
    cap range exported), its range is read at once, not reported missing until the next one."""
    live = [{"metric": gpu("node1", 1), "value": [NOW, str(NOW - 1)]}]
    values = [
        sample(700.0, __name__="DCGM_FI_DEV_POWER_MGMT_LIMIT_MAX", Hostname="node1", gpu="1"),
        sample(1.0, __name__="DCGM_FI_DEV_XID_ERRORS", Hostname="node1", gpu="1"),
        sample(300.0, __name__="DCGM_FI_DEV_POWER_USAGE", Hostname="node1", gpu="1"),
    ]
    last_seen = [{"metric": {"Hostname": "node1", "gpu": "0"}, "value": [NOW, str(NOW - 200)]}]
    fake = FakePrometheus(
        [
            ("max_over_time", last_seen),
            ("last_over_time", [{"metric": gpu("node1", i), "value": [NOW, "1"]} for i in (0, 1)]),
            ("timestamp(", live),
            *per_field(values),
        ]
    )
    source = PrometheusSource(
        PrometheusSettings(scrape_interval_s=15, static_refresh_s=300), client=fake
    )

    def limit_queries() -> int:
        return sum("LIMIT_MAX" in q for q, _ in fake.queries)

    assert list(source.observe(NOW).stale) == [True, False]
    assert limit_queries() == 1
    live.append({"metric": gpu("node1", 0), "value": [NOW, str(NOW + 29)]})
    values += [
        sample(650.0, __name__="DCGM_FI_DEV_POWER_MGMT_LIMIT_MAX", Hostname="node1", gpu="0"),
        sample(250.0, __name__="DCGM_FI_DEV_POWER_USAGE", Hostname="node1", gpu="0"),
        sample(0.0, __name__="DCGM_FI_DEV_XID_ERRORS", Hostname="node1", gpu="0"),
    ]
    fake.answers = [("timestamp(", live), *per_field(values)]
    snap = source.observe(NOW + 30)
    assert limit_queries() == 2
    assert list(snap.stale) == [False, False]
    assert list(snap.column(Metric.MAX_LIMIT_W)[0]) == [650.0, 700.0]
    assert list(snap.column(Metric.XID)[0]) == [0.0, 1.0]  # exported: 0, not missing
    # Covered now: not read again until due.
    source.observe(NOW + 45)
    assert limit_queries() == 2


def test_a_gpu_that_moved_host_is_one_row_on_its_new_host() -> None:
    """GPU-X's host was renamed node-a -> node-b: the inventory window still holds its old
    series, but it is one GPU, fresh on node-b, not also a stale row on node-a."""
    old = {"Hostname": "node-a", "gpu": "0", "UUID": "GPU-X", "modelName": MODEL}
    new = {**old, "Hostname": "node-b"}
    other = gpu("node-c", 0)  # a GPU that is really down stays as a stale row
    fake = FakePrometheus(
        [
            (
                "max_over_time",
                [
                    {"metric": {"Hostname": h, "gpu": "0"}, "value": [NOW, str(NOW - 120)]}
                    for h in ("node-a", "node-c")
                ],
            ),
            ("last_over_time", [{"metric": m, "value": [NOW, "1"]} for m in (old, new, other)]),
            ("timestamp(", [{"metric": new, "value": [NOW, str(NOW - 1)]}]),
            *per_field(
                [sample(300.0, __name__="DCGM_FI_DEV_POWER_USAGE", Hostname="node-b", gpu="0")]
            ),
        ]
    )
    source = PrometheusSource(
        PrometheusSettings(scrape_interval_s=15, static_refresh_s=300), client=fake
    )
    for t in (NOW, NOW + 15):  # the full inventory read, then the remembered inventory
        snap = source.observe(t)
        assert list(snap.node_of()) == ["node-b", "node-c"]
        assert list(snap.uuid) == ["GPU-X", "GPU-node-c-0"]
        assert list(snap.stale) == [False, True]
        assert snap.column(Metric.POWER_W)[0][0] == 300.0


def test_the_group_label_reaches_the_snapshot_and_the_group_budgets() -> None:
    """`cluster.group_label = 'rack'` with Prometheus: each GPU's rack comes with its identity
    (a stale GPU keeps the one the inventory saw), the orienter builds the rack budgets from it,
    and a GPU whose series carry no rack label is said, not silently left out."""
    from agent.assembly import orienter_for, prometheus_settings
    from agent.config import parse_config

    config = parse_config(
        {
            "source": {"kind": "prometheus"},
            "cluster": {"group_label": "rack", "label_budgets_w": {"r1": 100.0}},
        }
    )
    inventory = [
        {**gpu("node1", 0), "rack": "r1"},
        {**gpu("node1", 1), "rack": "r1"},
        {**gpu("node2", 0), "rack": "r2"},
        gpu("node3", 0),  # no rack label
    ]
    live = [
        {"metric": m, "value": [NOW, str(NOW - 1)]}
        for m in (inventory[0], inventory[1], inventory[3])  # node2 went silent: stale
    ]
    values = [
        sample(410.0, __name__="DCGM_FI_DEV_POWER_USAGE", Hostname=h, gpu=g)
        for h, g in (("node1", "0"), ("node1", "1"), ("node3", "0"))
    ]
    fake = FakePrometheus(
        [
            ("max_over_time", [{"metric": {"Hostname": "node2", "gpu": "0"}, "value": [NOW, "1"]}]),
            ("last_over_time", [{"metric": m, "value": [NOW, "1"]} for m in inventory]),
            ("timestamp(", live),
            *per_field(values),
        ]
    )
    source = PrometheusSource(prometheus_settings(config), client=fake)
    snap = source.observe(NOW)
    assert list(snap.node_of()) == ["node1", "node1", "node2", "node3"]
    assert list(snap.stale) == [False, False, True, False]
    assert list(snap.labels["rack"]) == ["r1", "r1", "r2", ""]
    assert "1 GPUs have no 'rack' label" in snap.errors
    identity = [q for q, _ in fake.queries if "last_over_time" in q or "_job) (timestamp(" in q]
    assert len(identity) == 2 and all("rack" in q for q in identity)
    situation = orienter_for(config).orient(snap, None)
    budget_w, members = situation.group_budgets["rack=r1"]
    assert budget_w == 100.0 and list(members) == [True, True, False, False]
