"""The 100,000-GPU cycle's shortcuts (issue 27) give exactly what the plain computations give:
incremental grouping, job keys, targets found by the rows they were taken from, and the lowest
cap per GPU grouped by those rows."""

from __future__ import annotations

import numpy as np
import pytest

from agent.core.intents import GpuTargets, SetPowerCap
from agent.core.keyed import KeyedColumns, RowIndex, distinct, freeze
from agent.core.snapshot import Snapshot
from agent.orient.stats import Grouper
from policies.conflicts import _resolve_caps


def test_grouper_matches_unique_as_labels_change() -> None:
    rng = np.random.default_rng(0)
    pool = np.array([f"job{k}" for k in range(40)] + ["", "a-much-longer-job-name"])
    grouper = Grouper()
    labels = rng.choice(pool, 500)
    for step in range(200):
        labels = labels.copy()
        changed = rng.integers(0, labels.size, int(rng.integers(0, 200 if step % 5 else 500)))
        if step % 9 == 0:  # narrower or wider strings
            labels = labels.astype(f"U{rng.integers(3, 30)}")
        labels[changed] = rng.choice(pool, changed.size)
        ids, names = grouper.ids(labels)
        want_names, want_ids = np.unique(labels, return_inverse=True)
        assert names.dtype == want_names.dtype
        assert np.array_equal(names, want_names)
        assert np.array_equal(ids, want_ids)
        assert np.array_equal(grouper.hashes(labels), Grouper().hashes(labels))


def _snapshot(job: list[str]) -> Snapshot:
    n = len(job)
    return Snapshot(
        time_s=0.0,
        node_names=np.array(["n0"]),
        node=np.zeros(n, dtype=np.int64),
        gpu=np.arange(n, dtype=np.int64),
        uuid=np.array([f"GPU-{k}-{'x' * k}" for k in range(n)]),
        model=np.full(n, "H100"),
        job=np.array(job),
        values={},
        valid={},
        age_s=np.zeros(n),
        stale=np.zeros(n, dtype=bool),
    )


@pytest.mark.parametrize("job", [["", "a", ""], ["a-very-long-job-name", ""], ["a", "b"], []])
def test_job_key_as_defined(job: list[str]) -> None:
    snap = _snapshot(job)
    want = np.where(snap.job != "", snap.job, np.char.add("gpu:", snap.uuid.astype(np.str_)))
    got = snap.job_key
    assert got.dtype == want.dtype
    assert np.array_equal(got, want)


def _fleet(n: int) -> np.ndarray:
    return freeze(np.array([f"GPU-{k:05d}" for k in range(n)]))


def test_targets_found_by_their_rows() -> None:
    uuid = _fleet(300)
    rows = np.random.default_rng(1).choice(300, 120, replace=False)
    targets = GpuTargets(
        node=np.full(120, "n"), gpu=rows, uuid=uuid[rows], rows=rows, of_uuid=uuid
    ).subset(np.arange(120) % 3 != 0)
    picked = targets.picked()
    assert picked is not None
    index = RowIndex(uuid)
    found = zip(index.find_picked(targets.uuid, picked), index.find(targets.uuid), strict=True)
    for got, want in found:
        assert np.array_equal(got, want)
    table = KeyedColumns({"x": (np.float64, np.nan)}, hashed=True)
    table.slots(uuid[:200])  # some of the fleet known
    want_slots = KeyedColumns({"x": (np.float64, np.nan)}, hashed=True)
    want_slots.slots(uuid[:200])
    assert np.array_equal(table.slots_picked(targets.uuid, picked), want_slots.slots(targets.uuid))
    assert np.array_equal(table.keys, want_slots.keys)
    # Not from a read-only array: nothing is assumed.
    loose = GpuTargets(targets.node, targets.gpu, targets.uuid, targets.rows, uuid.copy())
    assert loose.picked() is None


def test_a_repeated_uuid_is_not_told_apart_by_row() -> None:
    uuid = freeze(np.array(["GPU-a", "GPU-b", "GPU-a"]))
    assert not distinct(uuid)
    assert RowIndex(uuid).find_picked(uuid[[2]], (uuid, np.array([2])))[0].tolist() == [0]


def _cap(
    uuid: np.ndarray, rows: np.ndarray, watts: np.ndarray, policy: str, picked: bool
) -> SetPowerCap:
    targets = GpuTargets(
        node=np.full(rows.size, "n"),
        gpu=rows.astype(np.int64),
        uuid=uuid[rows],
        rows=rows if picked else None,
        of_uuid=uuid if picked else None,
    )
    return SetPowerCap(policy=policy, reason="r", targets=targets, watts=watts)


@pytest.mark.parametrize("repeated", [False, True])
def test_lowest_cap_by_rows_as_by_uuid(repeated: bool) -> None:
    rng = np.random.default_rng(2)
    uuid = _fleet(200)
    if repeated:
        uuid = freeze(np.concatenate([uuid[:150], uuid[:50]]))
    for _ in range(50):
        sets = []
        for k in range(int(rng.integers(1, 4))):
            rows = rng.choice(200, int(rng.integers(1, 150)), replace=False)
            sets.append((rows, rng.choice([100.0, 150.0, 200.0], rows.size), f"p{k}"))

        assert _resolved(uuid, sets, True) == _resolved(uuid, sets, False)


def _resolved(
    uuid: np.ndarray, sets: list[tuple[np.ndarray, np.ndarray, str]], picked: bool
) -> list[object]:
    kept, lost = _resolve_caps([_cap(uuid, r, w, p, picked) for r, w, p in sets], [])
    return [
        (i.policy, i.targets.uuid.tolist(), getattr(i, "watts", np.zeros(0)).tolist()) for i in kept
    ] + [(o.intent.policy, o.intent.targets.uuid.tolist(), o.reason) for o in lost]
