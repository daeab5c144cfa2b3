from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.clock import FakeClock
from agent.core.curves import (
    allocate_power,
    power_for_throughput,
    throughput_at_cap,
    throughput_at_power,
)
from agent.core.intents import GpuTargets, SetPowerCap
from agent.core.keyed import KeyedColumns, LastKeys, freeze
from agent.core.snapshot import Metric, Snapshot
from tests.conftest import make_snapshot


def test_snapshot_marks_missing_and_stale_explicitly() -> None:
    snap = make_snapshot([300.0, 400.0, 500.0, 600.0], stale=[False, True, False, False])
    power, ok = snap.column(Metric.POWER_W)
    assert ok.tolist() == [True, False, True, True]
    assert np.isnan(power[1])  # never a 0.0 that makes a dead GPU look idle
    assert snap.fresh.tolist() == [True, False, True, True]
    assert snap.usable(Metric.POWER_W).sum() == 3
    absent, absent_ok = snap.column(Metric.ECC_DBE_TOTAL)
    assert np.isnan(absent).all() and not absent_ok.any()


def test_snapshot_targets_and_nodes() -> None:
    snap = make_snapshot([1.0] * 8, gpus_per_node=4)
    assert snap.n_gpus == 8 and snap.n_nodes == 2
    assert snap.target(5) == "node2/gpu1"
    assert snap.rows_of_node("node2").tolist() == [4, 5, 6, 7]
    assert snap.rows_of_node("node9").size == 0


def test_snapshot_rejects_misaligned_columns() -> None:
    snap = make_snapshot([1.0, 2.0])
    with pytest.raises(ValueError, match="rows"):
        Snapshot(
            time_s=0,
            node_names=snap.node_names,
            node=snap.node,
            gpu=snap.gpu,
            uuid=snap.uuid,
            model=snap.model,
            job=snap.job,
            values={Metric.POWER_W: np.zeros(3)},
            valid={Metric.POWER_W: np.ones(3, dtype=bool)},
            age_s=snap.age_s,
            stale=snap.stale,
        )


def test_empty_snapshot_carries_the_error() -> None:
    snap = Snapshot.empty(10.0, errors=("prometheus unreachable",))
    assert snap.n_gpus == 0 and snap.errors == ("prometheus unreachable",)


def test_cap_intent_records_subset_and_evidence() -> None:
    snap = make_snapshot([300.0, 400.0, 500.0])
    intent = SetPowerCap(
        policy="p",
        reason="r",
        evidence={"budget_w": 1000.0, "power_w": np.array([300.0, 400.0, 500.0])},
        targets=GpuTargets.from_rows(snap, [0, 1, 2]),
        watts=np.array([250.0, 350.0, 450.0]),
    )
    records = intent.to_records()
    assert [r["target"] for r in records] == ["node1/gpu0", "node1/gpu1", "node1/gpu2"]
    assert records[1]["watts"] == 350.0 and records[1]["evidence"] == {
        "budget_w": 1000.0,
        "power_w": 400.0,
    }
    sub = intent.subset(np.array([False, True, True]))
    assert isinstance(sub, SetPowerCap)
    assert sub.watts.tolist() == [350.0, 450.0] and sub.evidence["power_w"].tolist() == [
        400.0,
        500.0,
    ]
    with pytest.raises(ValueError):
        SetPowerCap(
            policy="p",
            reason="r",
            targets=GpuTargets.from_rows(snap, [0]),
            watts=np.array([1.0, 2.0]),
        )


def test_fake_clock() -> None:
    clock = FakeClock(100.0)
    clock.sleep(5)
    assert clock.now() == 105.0
    clock.set(50.0)  # clock jumps are allowed explicitly
    assert clock.now() == 50.0
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_curve_family_and_inverse() -> None:
    assert throughput_at_power(700, 600, 1.0, 1.6) == pytest.approx(1.0)
    t = throughput_at_power(420, 600, 1.13, 1.65)  # x = 0.7
    assert t == pytest.approx(1 - 1.13 * 0.3**1.65)
    assert power_for_throughput(t, 600, 1.13, 1.65) == pytest.approx(420)
    # A cap above the natural draw changes nothing; under it the draw follows the cap.
    assert throughput_at_cap(650, 600, 1.0, 1.6, 0.95) == pytest.approx(1.0)
    assert throughput_at_cap(400, 600, 1.0, 1.6, 1.0) < 1.0


def test_allocation_meets_budget_and_equalizes_marginals() -> None:
    natural = np.array([600.0, 600.0, 300.0, 650.0])
    a = np.array([1.1, 0.4, 0.8, 1.1])
    b = np.array([1.6, 1.2, 1.5, 1.6])
    alloc = allocate_power(1700.0, natural, a, b, 1.0, 200.0, 700.0)
    assert alloc.feasible
    assert alloc.power_w.sum() <= 1700.0 + 1e-6
    assert alloc.power_w.sum() == pytest.approx(1700.0, rel=1e-3)
    # The insensitive job (a=0.4) gives up more power than the sensitive one of the same draw.
    assert alloc.power_w[1] < alloc.power_w[0]
    # No one gets more than its natural draw; caps lie within bounds.
    assert np.all(alloc.power_w <= natural + 1e-9)
    assert np.all((alloc.cap_w >= 200) & (alloc.cap_w <= 700))


def test_allocation_unconstrained_and_infeasible() -> None:
    natural = np.array([300.0, 300.0])
    free = allocate_power(10_000.0, natural, 1.0, 1.5, 1.0, 200.0, 700.0)
    assert free.feasible and not free.binding.any() and np.all(free.cap_w == 700.0)
    tight = allocate_power(100.0, natural, 1.0, 1.5, 1.0, 200.0, 700.0)
    assert not tight.feasible and np.all(tight.cap_w == 200.0)


def test_allocation_weights_cap_low_priority_first() -> None:
    natural = np.array([600.0, 600.0])
    alloc = allocate_power(
        1000.0, natural, 1.1, 1.6, 1.0, 200.0, 700.0, weight=np.array([1.0, 16.0])
    )
    assert alloc.power_w[0] < alloc.power_w[1]


@pytest.mark.parametrize("hashed", [False, True])
def test_keyed_columns_grow_and_persist(hashed: bool) -> None:
    table = KeyedColumns({"x": (np.float64, np.nan), "tag": ("U16", "")}, hashed=hashed)
    slots = table.slots(np.array(["b", "a"]))
    table["x"][slots] = [2.0, 1.0]
    slots2 = table.slots(np.array(["c", "a", "b"]))
    assert table["x"][slots2][1:].tolist() == [1.0, 2.0] and np.isnan(table["x"][slots2][0])
    _pos, found = table.lookup(np.array(["a", "zz"]))
    assert found.tolist() == [True, False]
    copy = KeyedColumns({"x": (np.float64, np.nan), "tag": ("U16", "")}, hashed=hashed)
    copy.load_dict(table.to_dict())
    assert copy.keys.tolist() == ["a", "b", "c"] and copy["x"][0] == 1.0


@pytest.mark.parametrize("hashed", [False, True])
def test_keyed_columns_take_an_empty_key_array_before_any_key(hashed: bool) -> None:
    # An outage snapshot has no GPUs; the first cycle of a fresh agent can be one.
    table = KeyedColumns({"x": (np.float64, np.nan)}, hashed=hashed)
    assert table.slots(np.array([], dtype=np.str_)).tolist() == []
    assert table.slots(np.array(["a"])).tolist() == [0]


@pytest.mark.parametrize("hashed", [False, True])
def test_keyed_columns_trust_only_frozen_arrays_by_identity(hashed: bool) -> None:
    """The same frozen array is known without comparing; an array changed in place is not."""
    table = KeyedColumns({"x": (np.float64, np.nan)}, hashed=hashed)
    writable = np.array(["a", "b"])
    assert table.slots(writable).tolist() == [0, 1]
    writable[1] = "c"  # the same object, new contents: must not hit the cache
    assert table.keys.tolist() == ["a", "b"]
    assert table.slots(writable).tolist() == [0, 2] and table.keys.tolist() == ["a", "b", "c"]

    frozen_keys = freeze(np.array(["c", "a"]))
    slots = table.slots(frozen_keys)
    assert table.slots(frozen_keys) is slots  # by identity
    pos, found = table.lookup(frozen_keys)
    assert pos.tolist() == [2, 0] and found.all()
    with pytest.raises(ValueError):  # handed out again: no caller may change it
        slots[0] = 1
    # The same keys in a new frozen array (a new trace block) are found by comparison once.
    again = freeze(np.array(["c", "a"]))
    assert table.slots(again) is slots
    table.retain(np.array([True, False, True]))  # forgets "b": positions change
    assert table.slots(again).tolist() == [1, 0]


@pytest.mark.parametrize("hashed", [False, True])
def test_keyed_columns_lookup_answer_follows_added_keys(hashed: bool) -> None:
    table = KeyedColumns({"x": (np.float64, np.nan)}, hashed=hashed)
    table.slots(np.array(["a", "c"]))
    asked = freeze(np.array(["c", "b"]))
    pos, found = table.lookup(asked)
    assert found.tolist() == [True, False] and table.lookup(asked)[0] is pos
    table.slots(np.array(["b"]))  # a key added: the remembered answer is out of date
    pos, found = table.lookup(asked)
    assert pos.tolist() == [2, 1] and found.all()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["slots", "lookup", "retain"]),
            st.lists(st.sampled_from(["a", "b", "c", "GPU-1", "GPU-2", "é", ""]), max_size=6),
        ),
        max_size=12,
    )
)
def test_keyed_columns_hashed_or_searched_answer_alike(
    ops: list[tuple[str, list[str]]],
) -> None:
    """The dict-backed table is only faster: every answer and its state stay the same."""
    searched = KeyedColumns({"x": (np.float64, np.nan)})
    hashed = KeyedColumns({"x": (np.float64, np.nan)}, hashed=True)
    for op, keys in ops:
        arr = np.array(keys, dtype=np.str_)
        if op == "slots":
            a, b = searched.slots(arr), hashed.slots(arr)
            assert a.tolist() == b.tolist()
            searched["x"][a] = hashed["x"][b] = np.arange(a.size, dtype=np.float64)
        elif op == "lookup":
            (pa, fa), (pb, fb) = searched.lookup(arr), hashed.lookup(arr)
            assert fa.tolist() == fb.tolist() and pa[fa].tolist() == pb[fb].tolist()
        else:
            keep = np.array([k not in keys for k in searched.keys.tolist()], dtype=bool)
            searched.retain(keep)
            hashed.retain(keep)
        assert searched.keys.tolist() == hashed.keys.tolist()
        assert np.array_equal(searched["x"], hashed["x"], equal_nan=True)


def test_row_index_finds_rows_and_keeps_the_first_of_a_repeated_key() -> None:
    from agent.core.keyed import RowIndex

    index = RowIndex(np.array(["GPU-b", "GPU-a", "GPU-b", "GPU-c"]))
    rows, found = index.find(np.array(["GPU-c", "GPU-x", "GPU-b", "GPU-a"]))
    assert rows.tolist() == [3, 0, 0, 1] and found.tolist() == [True, False, True, True]
    assert index.find(np.array([], dtype=np.str_))[0].tolist() == []


def test_last_keys_interned_hands_out_one_frozen_array_while_the_keys_stay() -> None:
    last = LastKeys()
    first = last.interned(np.array(["a", "b"]))
    assert not first.flags.writeable
    assert last.interned(np.array(["a", "b"])) is first  # equal keys, a new array: the same one
    changed = last.interned(np.array(["a", "c"]))
    assert changed is not first and changed.tolist() == ["a", "c"]


def test_small_ints_read_indices_and_classes_and_nothing_else() -> None:
    from agent.core.text import small_ints

    values, ok = small_ints(np.array(["3", "03", "", "³", "9" * 10, "-1", "x1", "123456789"]))
    assert ok.tolist() == [True, True, False, False, False, False, False, True]
    assert values.tolist() == [3, 3, 0, 0, 0, 0, 0, 123456789]
