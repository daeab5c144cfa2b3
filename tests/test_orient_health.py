"""Health classes from XID, ECC and row-remap signals, against NVIDIA's mapping."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.core.situation import HealthSeverity
from agent.core.snapshot import Metric, Snapshot, build_snapshot
from agent.orient.health import HealthClassifier, xid_severity

# NVIDIA's resolution per XID (shared/reference/gpu-health.md, from NVSentinel's mapping).
NVIDIA = {
    48: HealthSeverity.DRAIN,
    62: HealthSeverity.DRAIN,
    64: HealthSeverity.DRAIN,
    74: HealthSeverity.DRAIN,
    79: HealthSeverity.DRAIN,
    95: HealthSeverity.DRAIN,
    119: HealthSeverity.DRAIN,
    120: HealthSeverity.DRAIN,
    140: HealthSeverity.DRAIN,
    94: HealthSeverity.RESTART_JOB,
    13: HealthSeverity.WATCH,
    31: HealthSeverity.WATCH,
    63: HealthSeverity.WATCH,
    92: HealthSeverity.WATCH,
    43: HealthSeverity.OK,
}


def snap(
    t: float,
    xid: list[float],
    dbe: list[float] | None = None,
    remap_fail: list[float] | None = None,
    rows: list[float] | None = None,
    jobs: list[str] | None = None,
    stale: list[bool] | None = None,
) -> Snapshot:
    n = len(xid)
    zeros = [0.0] * n
    unseen = np.zeros(n, dtype=bool) if stale is None else np.asarray(stale, dtype=bool)
    values = {
        Metric.XID: xid,
        Metric.ECC_DBE_TOTAL: dbe or zeros,
        Metric.ROW_REMAP_FAILURE: remap_fail or zeros,
        Metric.REMAPPED_ROWS_UNCORRECTABLE: rows or zeros,
    }
    # As the Prometheus source gives a stale GPU: no values, no job label.
    values = {m: np.where(unseen, np.nan, np.asarray(v, dtype=float)) for m, v in values.items()}
    return build_snapshot(
        time_s=t,
        node_of_gpu=["node1"] * n,
        gpu=list(range(n)),
        uuid=[f"GPU-{i}" for i in range(n)],
        model=["NVIDIA H100 80GB HBM3"] * n,
        job=np.where(unseen, "", np.asarray(jobs or ["7"] * n, dtype=str)).tolist(),
        values=values,
        age_s=np.where(unseen, 120.0, 0.0),
        stale=unseen,
    )


@pytest.mark.parametrize(("code", "severity"), sorted(NVIDIA.items()))
def test_xid_classes_follow_nvidia(code: int, severity: HealthSeverity) -> None:
    assert int(xid_severity([code])[0]) == int(severity)
    h = HealthClassifier()
    h.update(snap(0, [0.0]))
    status = h.update(snap(15, [float(code)]))
    assert int(status.severity[0]) == int(severity)
    if severity > HealthSeverity.OK:
        assert status.code[0] == f"xid:{code}"
        assert status.since_s[0] == 15
        assert status.remediation[0]
    else:
        assert status.code[0] == "" and np.isnan(status.since_s[0])


def test_a_remedy_names_the_action() -> None:
    h = HealthClassifier()
    status = h.update(snap(0, [79.0, 94.0, 63.0]))
    assert "drain" in status.remediation[0] and "requeue" in status.remediation[0]
    assert "requeue the job" in status.remediation[1]
    assert status.remediation[2].startswith("watch")


def test_the_gauge_holds_the_last_xid_repeats_changes_and_resets() -> None:
    h = HealthClassifier()
    h.update(snap(0, [0.0]))
    first = h.update(snap(15, [79.0]))
    assert first.severity[0] == HealthSeverity.DRAIN and first.since_s[0] == 15
    # The same code later is no new event (DCGM keeps the last XID: a repeat is invisible).
    again = h.update(snap(600, [79.0]))
    assert again.since_s[0] == 15
    # A milder XID does not clear the fatal one; 45 is read with the one before it.
    milder = h.update(snap(615, [13.0]))
    assert milder.severity[0] == HealthSeverity.DRAIN and milder.code[0] == "xid:79"
    cleanup = h.update(snap(630, [45.0]))
    assert cleanup.code[0] == "xid:79"
    assert cleanup.conditions is not None and "xid:45" in str(cleanup.conditions[0])
    # Back to 0: the GPU was reset, the condition is gone.
    reset = h.update(snap(645, [0.0]))
    assert reset.severity[0] == HealthSeverity.OK and reset.code[0] == ""
    # A new fatal code after the reset is a new event with its own since-time.
    again = h.update(snap(660, [48.0]))
    assert again.code[0] == "xid:48" and again.since_s[0] == 660


def test_a_stronger_code_replaces_a_weaker_one_and_45_alone_watches() -> None:
    h = HealthClassifier()
    h.update(snap(0, [13.0, 45.0]))
    status = h.update(snap(15, [95.0, 45.0]))
    assert status.code[0] == "xid:95" and status.since_s[0] == 15
    assert status.severity[1] == HealthSeverity.WATCH


def test_watch_expires_restart_clears_when_the_job_changes() -> None:
    h = HealthClassifier(watch_hold_s=600, restart_hold_s=300)
    h.update(snap(0, [63.0, 94.0], jobs=["7", "8"]))
    mid = h.update(snap(300, [63.0, 94.0], jobs=["7", "8"]))
    assert list(mid.severity) == [HealthSeverity.WATCH, HealthSeverity.RESTART_JOB]
    # The job that hit XID 94 was requeued: another job runs there now.
    later = h.update(snap(615, [63.0, 94.0], jobs=["7", "9"]))
    assert list(later.severity) == [HealthSeverity.OK, HealthSeverity.OK]
    # The gauge still shows the old codes: no new event.
    still = h.update(snap(900, [63.0, 94.0], jobs=["7", "9"]))
    assert list(still.severity) == [HealthSeverity.OK, HealthSeverity.OK]


def test_a_missed_scrape_does_not_end_a_restart_condition() -> None:
    h = HealthClassifier(restart_hold_s=900)
    h.update(snap(0, [0.0, 0.0], jobs=["42", "43"]))
    hit = h.update(snap(15, [94.0, 94.0], jobs=["42", "43"]))
    assert hit.severity.tolist() == [HealthSeverity.RESTART_JOB] * 2
    # One missed scrape: stale, no values and no job label; that is no news of the job.
    unseen = h.update(snap(30, [0.0, 0.0], jobs=["42", "43"], stale=[True, True]))
    assert unseen.severity.tolist() == [HealthSeverity.RESTART_JOB] * 2
    # Seen again: still job 42 on GPU 0 (held); GPU 1 idle, no job (the job is gone).
    back = h.update(snap(45, [94.0, 94.0], jobs=["42", ""]))
    assert back.severity.tolist() == [HealthSeverity.RESTART_JOB, HealthSeverity.OK]
    assert back.code[0] == "xid:94" and back.since_s[0] == 15


def test_remapped_rows_watch_holds_until_a_reset_or_its_hold() -> None:
    h = HealthClassifier(watch_hold_s=600)
    h.update(snap(0, [0.0, 13.0, 0.0]))
    rose = h.update(snap(15, [0.0, 13.0, 0.0], dbe=[0, 0, 2], rows=[1, 1, 1]))
    assert rose.code.tolist() == ["remapped_rows", "xid:13", "ecc_dbe"]
    # An XID gauge that sits at 0 is no reset: the remap is still pending.
    held = h.update(snap(300, [0.0, 13.0, 0.0], dbe=[0, 0, 2], rows=[1, 1, 1]))
    assert held.severity.tolist()[:2] == [HealthSeverity.WATCH] * 2
    assert held.conditions is not None
    assert all("remapped_rows" in str(c) for c in held.conditions)
    # A reset: GPU 1's gauge goes back to 0, GPU 2's volatile DBE count clears.
    reset = h.update(snap(315, [0.0, 0.0, 0.0], dbe=[0, 0, 0], rows=[1, 1, 1]))
    assert reset.severity.tolist() == [HealthSeverity.WATCH, HealthSeverity.OK, HealthSeverity.OK]
    # GPU 0's watch expires after watch_hold_s.
    expired = h.update(snap(615, [0.0] * 3, rows=[1, 1, 1]))
    assert expired.severity.tolist() == [HealthSeverity.OK] * 3


def test_ecc_and_row_remap_signals() -> None:
    h = HealthClassifier(watch_hold_s=600)
    h.update(snap(0, [0.0] * 4, dbe=[0, 0, 0, 0], rows=[0, 0, 0, 3]))
    status = h.update(
        snap(15, [0.0] * 4, dbe=[2, 0, 0, 0], remap_fail=[0, 1, 0, 0], rows=[0, 0, 1, 3])
    )
    assert status.severity.tolist() == [3, 3, 1, 0]  # old remapped rows (row 3) are history
    assert status.code.tolist() == ["ecc_dbe", "row_remap_failure", "remapped_rows", ""]
    held = h.update(
        snap(30, [0.0] * 4, dbe=[2, 0, 0, 0], remap_fail=[0, 1, 0, 0], rows=[0, 0, 1, 3])
    )
    assert held.since_s[0] == 15 and held.since_s[1] == 15
    # Reset: the volatile DBE count clears, the failure flag drops.
    cleared = h.update(snap(45, [0.0] * 4, dbe=[0, 0, 0, 0], rows=[0, 0, 1, 3]))
    assert cleared.severity.tolist()[:2] == [0, 0]


def test_missing_signals_hold_conditions() -> None:
    h = HealthClassifier()
    h.update(snap(0, [79.0]))
    gone = snap(15, [float("nan")])
    assert h.update(gone).severity[0] == HealthSeverity.DRAIN


def test_state_round_trips_through_json() -> None:
    h = HealthClassifier()
    h.update(snap(0, [0.0, 0.0]))
    h.update(snap(15, [79.0, 13.0], dbe=[1, 0]))
    data = json.loads(json.dumps(h.to_dict(), allow_nan=True))
    restored = HealthClassifier()
    restored.load_dict(data)
    a = h.update(snap(30, [79.0, 0.0], dbe=[1, 0]))
    b = restored.update(snap(30, [79.0, 0.0], dbe=[1, 0]))
    assert a.severity.tolist() == b.severity.tolist()
    assert a.code.tolist() == b.code.tolist()
    assert a.since_s[0] == b.since_s[0] == 15
