"""Health classes from XID, ECC and row-remap signals, with NVIDIA's documented remediation.

The mapping is NVIDIA's (NVSentinel's `xiderrorsmapping.csv`, summarized in
shared/reference/gpu-health.md): 48, 62, 64, 74, 79, 95, 119, 120, 140 -> drain; 94 -> restart the
job; 13, 31, 63, 92 -> watch; 43 -> nothing; 45 (preemptive cleanup) is read with the XID before it.

What the signals can and cannot say:
- DCGM's XID gauge holds only the *last* XID. A repeat of the same code is invisible; an event is a
  change of the gauge to a non-zero code. A return to 0 means the GPU was reset (or the driver
  reloaded), which clears what the XIDs said.
- A milder XID after a fatal one does not clear the fatal one (only a reset does), and a code that
  stays on the gauge is old news: watch conditions expire after `watch_hold_s`.
- The volatile double-bit ECC counter rising means a DBE happened (drain); it falls back when the
  GPU is reset. A row-remap failure holds while the flag is set. Uncorrectable remapped rows rising
  means a remap is pending until the next reset (watch): until the XID gauge returns to 0 or the
  DBE counter falls, or `watch_hold_s`.

Every condition is held with the time it started (`since_s`). State is columnar, keyed by UUID.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.core.keyed import KeyedColumns
from agent.core.situation import HealthSeverity, HealthStatus
from agent.core.snapshot import Metric, Snapshot

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

OK, WATCH, RESTART, DRAIN = (int(s) for s in HealthSeverity)


@dataclass(frozen=True, slots=True)
class XidClass:
    severity: HealthSeverity
    meaning: str
    remediation: str


XID_CLASSES: dict[int, XidClass] = {
    13: XidClass(
        HealthSeverity.WATCH,
        "graphics engine exception",
        "watch; restart the application; repeated on one GPU: notify",
    ),
    31: XidClass(
        HealthSeverity.WATCH,
        "GPU memory page fault",
        "watch; restart the application (usually an application bug)",
    ),
    43: XidClass(HealthSeverity.OK, "GPU stopped processing", "none (informational)"),
    48: XidClass(
        HealthSeverity.DRAIN,
        "double-bit ECC error",
        "drain; GPU reset or node reboot needed",
    ),
    62: XidClass(HealthSeverity.DRAIN, "PMU halt", "drain, reset the GPU"),
    63: XidClass(
        HealthSeverity.WATCH,
        "row remap / page retirement recorded",
        "watch; reset the GPU when convenient",
    ),
    64: XidClass(
        HealthSeverity.DRAIN, "row remap / page retirement failed", "drain now, reset the GPU"
    ),
    74: XidClass(
        HealthSeverity.DRAIN,
        "NVLink error",
        "drain; check NVLink (the fault may be at the remote end)",
    ),
    79: XidClass(
        HealthSeverity.DRAIN,
        "GPU fell off the bus",
        "drain, requeue its jobs; restart the node (bare metal)",
    ),
    92: XidClass(HealthSeverity.WATCH, "high single-bit ECC rate", "watch"),
    94: XidClass(
        HealthSeverity.RESTART_JOB,
        "contained ECC error",
        "requeue the job that hit it; the GPU stays in service",
    ),
    95: XidClass(
        HealthSeverity.DRAIN, "uncontained ECC error", "drain, requeue its jobs, reset the GPU"
    ),
    119: XidClass(HealthSeverity.DRAIN, "GSP RPC timeout", "drain, reset the GPU"),
    120: XidClass(HealthSeverity.DRAIN, "GSP error", "drain, reset the GPU"),
    140: XidClass(HealthSeverity.DRAIN, "unrecovered ECC error", "drain, reset the GPU"),
}
XID_CORRELATE = 45  # preemptive cleanup: a consequence of the XID before it
UNKNOWN_XID = XidClass(HealthSeverity.WATCH, "unknown XID", "watch; look the code up")

_MAX_CODE = 1024
_SEVERITY_OF = np.full(_MAX_CODE, int(HealthSeverity.WATCH), dtype=np.int64)
for _code, _cls in XID_CLASSES.items():
    _SEVERITY_OF[_code] = int(_cls.severity)
_SEVERITY_OF[XID_CORRELATE] = int(HealthSeverity.WATCH)
_SEVERITY_OF[0] = int(HealthSeverity.OK)


def xid_severity(codes: npt.ArrayLike) -> IntArray:
    """Severity per XID code (vectorized); unknown codes watch."""
    c = np.asarray(codes, dtype=np.int64)
    inside = (c >= 0) & (c < _MAX_CODE)
    return np.where(inside, _SEVERITY_OF[np.clip(c, 0, _MAX_CODE - 1)], WATCH).astype(np.int64)


def xid_class(code: int) -> XidClass:
    if code == XID_CORRELATE:
        return XidClass(
            HealthSeverity.WATCH,
            "preemptive cleanup after another error",
            "watch; read it with the XID before it",
        )
    return XID_CLASSES.get(code, UNKNOWN_XID)


ECC_DBE = XidClass(
    HealthSeverity.DRAIN,
    "double-bit ECC errors (volatile count rose)",
    "drain; reset the GPU",
)
ROW_REMAP_FAILURE = XidClass(
    HealthSeverity.DRAIN, "row remapping failed", "drain now, reset the GPU"
)
REMAPPED_ROWS = XidClass(
    HealthSeverity.WATCH,
    "uncorrectable error remapped a row (pending until reset)",
    "watch; reset the GPU when convenient",
)


class HealthClassifier:
    """Per GPU: held health conditions, updated from each Snapshot."""

    def __init__(self, watch_hold_s: float = 3600.0, restart_hold_s: float = 900.0) -> None:
        self.watch_hold_s = watch_hold_s
        self.restart_hold_s = restart_hold_s
        self.state = KeyedColumns(
            {
                "last_xid": (np.float64, np.nan),  # the gauge as last seen (NaN: never)
                "xid_code": (np.int64, 0),  # the held XID condition (0: none)
                "xid_sev": (np.int64, 0),
                "xid_since": (np.float64, np.nan),
                "xid_after": (np.int64, 0),  # a 45 seen after the held code
                "xid_job": ("U64", ""),  # the job a restart-the-job condition belongs to
                "dbe_last": (np.float64, np.nan),
                "dbe_since": (np.float64, np.nan),
                "remap_fail_since": (np.float64, np.nan),
                "rows_last": (np.float64, np.nan),
                "rows_since": (np.float64, np.nan),
            }
        )

    # -- state ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.to_dict()}

    def load_dict(self, data: Mapping[str, Any]) -> None:
        self.state.load_dict(data.get("state", {}))

    # -- update -----------------------------------------------------------------------------------

    def update(self, snapshot: Snapshot) -> HealthStatus:
        n = snapshot.n_gpus
        if n == 0:
            return HealthStatus.healthy(0)
        now = snapshot.time_s
        slot = self.state.slots(snapshot.uuid)
        xid_reset = self._update_xid(snapshot, slot, now)
        self._update_ecc(snapshot, slot, now, xid_reset)
        return self._status(snapshot, slot, now)

    def _update_xid(self, snapshot: Snapshot, slot: IntArray, now: float) -> BoolArray:
        """Update the held XID conditions; per GPU, whether a reset was seen this cycle."""
        st = self.state.cols
        xid, ok = snapshot.column(Metric.XID)
        ok = ok & np.isfinite(xid)
        s = slot[ok]
        cur = np.rint(xid[ok]).astype(np.int64)
        prev = st["last_xid"][s]
        seen = np.isfinite(prev)
        prev_code = np.where(seen, prev, -1).astype(np.int64)
        held_code = st["xid_code"][s]
        held_sev = st["xid_sev"][s]

        # A return to 0 after an XID: the GPU was reset; what the XIDs said is gone.
        reset = seen & (prev_code != 0) & (cur == 0)
        # A new event: the gauge changed to a non-zero code (or shows one when first seen).
        event = (cur != 0) & (cur != prev_code)
        correlate = event & (cur == XID_CORRELATE) & (held_sev > OK)
        new_sev = xid_severity(cur)
        replace = event & ~correlate & (new_sev >= held_sev) & (new_sev > OK)
        # A milder XID after a held one leaves the held one (only a reset clears it).
        code = np.where(reset, 0, np.where(replace, cur, held_code))
        sev = np.where(reset, OK, np.where(replace, new_sev, held_sev))
        since = np.where(reset, np.nan, np.where(replace, now, st["xid_since"][s]))
        after = np.where(reset | replace, 0, np.where(correlate, XID_CORRELATE, st["xid_after"][s]))
        st["xid_code"][s] = code
        st["xid_sev"][s] = sev
        st["xid_since"][s] = since
        st["xid_after"][s] = after
        if replace.any():  # (string columns touched only where something happened)
            st["xid_job"][s[replace]] = snapshot.job[ok][replace]
        st["last_xid"][s] = cur

        # Expiry: watch conditions after watch_hold_s; restart-the-job once the job is gone.
        sev_all = st["xid_sev"][slot]
        age = now - st["xid_since"][slot]
        watch_done = (sev_all == WATCH) & (age >= self.watch_hold_s)
        restart = np.flatnonzero(sev_all == RESTART)
        held_job = st["xid_job"][slot[restart]]
        # Only a fresh reading says which job runs: a stale GPU carries no job label, which is
        # no news of the job (one missed scrape must not drop the condition for good).
        job_gone = snapshot.fresh[restart] & (held_job != "") & (held_job != snapshot.job[restart])
        restart_done = np.zeros(slot.shape[0], dtype=bool)
        restart_done[restart] = job_gone | (
            (held_job == "") & (age[restart] >= self.restart_hold_s)
        )
        done = slot[watch_done | restart_done]
        st["xid_code"][done] = 0
        st["xid_sev"][done] = OK
        st["xid_since"][done] = np.nan
        st["xid_after"][done] = 0
        reset_rows = np.zeros(slot.shape[0], dtype=bool)
        reset_rows[ok] = reset
        return reset_rows

    def _update_ecc(
        self, snapshot: Snapshot, slot: IntArray, now: float, xid_reset: BoolArray
    ) -> None:
        """Update the ECC and row-remap conditions; `xid_reset`: per GPU, whether the XID gauge
        went back to 0 this cycle (a reset)."""
        st = self.state.cols
        dbe, dbe_ok = snapshot.column(Metric.ECC_DBE_TOTAL)
        dbe_ok = dbe_ok & np.isfinite(dbe)
        s = slot[dbe_ok]
        cur = dbe[dbe_ok]
        prev = st["dbe_last"][s]
        seen = np.isfinite(prev)
        rose = np.where(seen, cur > prev, cur > 0)
        fell = seen & (cur < prev)  # volatile counter cleared: the GPU was reset
        dbe_reset = np.zeros(slot.shape[0], dtype=bool)
        dbe_reset[dbe_ok] = fell
        since = st["dbe_since"][s]
        since = np.where(fell, np.nan, np.where(rose & np.isnan(since), now, since))
        st["dbe_since"][s] = since
        st["dbe_last"][s] = cur

        fail, fail_ok = snapshot.column(Metric.ROW_REMAP_FAILURE)
        fail_ok = fail_ok & np.isfinite(fail)
        s = slot[fail_ok]
        failing = fail[fail_ok] >= 0.5
        held = st["remap_fail_since"][s]
        st["remap_fail_since"][s] = np.where(failing, np.where(np.isnan(held), now, held), np.nan)

        rows, rows_ok = snapshot.column(Metric.REMAPPED_ROWS_UNCORRECTABLE)
        rows_ok = rows_ok & np.isfinite(rows)
        s = slot[rows_ok]
        cur_rows = rows[rows_ok]
        prev_rows = st["rows_last"][s]
        # Rows remapped before we first looked are history (applied at an earlier reset).
        rose_rows = np.isfinite(prev_rows) & (cur_rows > prev_rows)
        since_rows = np.where(rose_rows, now, st["rows_since"][s])
        st["rows_since"][s] = since_rows
        st["rows_last"][s] = cur_rows

        # A reset seen this cycle (the XID gauge going back to 0, or the volatile DBE counter
        # cleared) also applies pending remaps; a gauge that merely sits at 0 is no reset. A
        # watch on remapped rows otherwise expires like any watch.
        reset = xid_reset | dbe_reset
        r = st["rows_since"][slot]
        stale_watch = np.isfinite(r) & (now - r >= self.watch_hold_s)
        cleared = slot[stale_watch | (np.isfinite(r) & reset & (now > r))]
        st["rows_since"][cleared] = np.nan

    def _status(self, snapshot: Snapshot, slot: IntArray, now: float) -> HealthStatus:
        st = self.state.cols
        n = snapshot.n_gpus
        xid_code = st["xid_code"][slot]
        xid_sev = st["xid_sev"][slot]
        dbe = np.isfinite(st["dbe_since"][slot])
        fail = np.isfinite(st["remap_fail_since"][slot])
        rows = np.isfinite(st["rows_since"][slot])
        # Candidates in order of precedence on equal severity.
        sev_c = np.stack(
            [
                np.where(fail, DRAIN, OK),
                np.where(dbe, DRAIN, OK),
                xid_sev,
                np.where(rows, WATCH, OK),
            ]
        )
        since_c = np.stack(
            [
                st["remap_fail_since"][slot],
                st["dbe_since"][slot],
                st["xid_since"][slot],
                st["rows_since"][slot],
            ]
        )
        pick = np.argmax(sev_c, axis=0)  # first of the highest
        severity = sev_c[pick, np.arange(n)].astype(np.int64)
        since = np.where(severity > OK, since_c[pick, np.arange(n)], np.nan)
        # Strings only for the few GPUs with a condition (no per-GPU work for healthy ones).
        bad = np.flatnonzero((severity > OK) | fail | dbe | rows | (xid_code != 0))
        after = st["xid_after"][slot]
        code: list[str] = []
        remediation: list[str] = []
        conditions: list[str] = []
        for i in bad.tolist():
            parts: list[tuple[str, XidClass]] = []
            if fail[i]:
                parts.append(("row_remap_failure", ROW_REMAP_FAILURE))
            if dbe[i]:
                parts.append(("ecc_dbe", ECC_DBE))
            if xid_code[i] != 0:
                parts.append((f"xid:{int(xid_code[i])}", xid_class(int(xid_code[i]))))
            if rows[i]:
                parts.append(("remapped_rows", REMAPPED_ROWS))
            if after[i]:
                parts.append((f"xid:{int(after[i])}", xid_class(int(after[i]))))
            conditions.append(",".join(p[0] for p in parts))
            label, detail = "", ""
            if severity[i] > OK:
                label, cls = next(p for p in parts if int(p[1].severity) == severity[i])
                detail = f"{cls.remediation} ({cls.meaning})"
            code.append(label)
            remediation.append(detail)
        return HealthStatus(
            severity=severity,
            code=_scatter(n, bad, code),
            remediation=_scatter(n, bad, remediation),
            since_s=since,
            conditions=_scatter(n, bad, conditions),
        )


def _scatter(n: int, rows: npt.NDArray[np.int64], texts: list[str]) -> npt.NDArray[np.str_]:
    """n strings, `texts` at `rows` and "" elsewhere."""
    given = np.asarray(texts, dtype=np.str_)
    out = np.zeros(n, dtype=given.dtype if given.size else "<U1")
    out[rows] = given
    return out
