"""Scoring detection against the twin's injected faults (for tests and benchmarks).

Each fault kind maps to what the agent should say about its target:

| fault      | the agent's alarm                                                        |
|------------|--------------------------------------------------------------------------|
| xid=CODE   | health code `xid:CODE` on the GPU (with NVIDIA's class for the code)     |
| ecc        | a health condition `ecc_dbe` or `row_remap_failure` on the GPU           |
| fan        | anomaly kind `temp` or `hot_vs_peers` on the GPU                         |
| straggler  | anomaly kind `straggler` on the GPU                                      |
| spike      | anomaly kind `power` on the GPU                                          |
| dropout    | anomaly kind `dropout` on any GPU of the node                            |

An *alarm episode* is a run of consecutive cycles in which a target carries one kind of alarm.
An episode is a true positive when it starts while a fault of that kind is active on its target
(or within `grace_cycles` after it ends); precision is the share of true episodes, recall the
share of faults with at least one, and the delay of a fault counts cycles from the first cycle
at or after its *observable* onset (that cycle is 1) to its first alarm. A fault whose effect the
telemetry cannot show (a straggler on an idle GPU: nothing runs slower) is observable from the
first cycle its target runs work; one never observable is left out and counted apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from agent.core.situation import Situation
from agent.sim.faults import FaultKind, FaultSpec
from agent.sim.twin import FATAL_XIDS, Twin

FAMILY_KINDS: dict[FaultKind, frozenset[str]] = {
    FaultKind.FAN: frozenset({"temp", "hot_vs_peers"}),
    FaultKind.STRAGGLER: frozenset({"straggler"}),
    FaultKind.SPIKE: frozenset({"power"}),
    FaultKind.DROPOUT: frozenset({"dropout"}),
}
ECC_CONDITIONS = ("ecc_dbe", "row_remap_failure")
XID_CODES = (79, 48, 94, 13, 63, 74, 95, 31, 119, 64, 62, 92)


@dataclass
class Recorder:
    """Per cycle: what the agent said about every GPU, and whether each fault was observable."""

    times_s: list[float] = field(default_factory=list)
    kind: list[npt.NDArray[np.str_]] = field(default_factory=list)  # primary anomaly kind
    xid_code: list[npt.NDArray[np.int64]] = field(default_factory=list)  # held XID (0: none)
    ecc: list[npt.NDArray[np.bool_]] = field(default_factory=list)
    working: list[npt.NDArray[np.bool_]] = field(default_factory=list)  # truth: runs work

    def record(self, situation: Situation, twin: Twin) -> None:
        """Rows of the twin and of the snapshot coincide (the twin's source keeps its order)."""
        n = twin.spec.n_gpus
        snap = situation.snapshot
        if snap.n_gpus != n:
            raise ValueError("the recorder needs the twin's own source (one row per twin GPU)")
        self.times_s.append(situation.time_s)
        anomalies = situation.anomalies
        self.kind.append(
            np.where(anomalies.flagged, anomalies.kind, "").astype(np.str_)
            if anomalies is not None
            else np.full(n, "", dtype=np.str_)
        )
        health = situation.health
        codes = np.zeros(n, dtype=np.int64)
        ecc = np.zeros(n, dtype=bool)
        if health is not None:
            cond = health.conditions if health.conditions is not None else health.code
            for row in np.flatnonzero(cond != "").tolist():  # the few GPUs with a condition
                parts = str(cond[row]).split(",")
                ecc[row] = any(p in ECC_CONDITIONS for p in parts)
                xids = [int(p[4:]) for p in parts if p.startswith("xid:")]
                codes[row] = xids[0] if xids else 0
        self.xid_code.append(codes)
        self.ecc.append(ecc)
        failed = np.isin(twin.xid, list(FATAL_XIDS))
        self.working.append((twin.job_row >= 0) & ~failed)


@dataclass(frozen=True, slots=True)
class KindScore:
    fault: str
    precision: float
    recall: float
    median_delay_cycles: float
    faults: int
    detected: int
    episodes: int
    true_episodes: int
    unobservable: int
    delays: tuple[float, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "fault": self.fault,
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "median_delay_cycles": self.median_delay_cycles,
            "faults": self.faults,
            "detected": self.detected,
            "alarm_episodes": self.episodes,
            "true_episodes": self.true_episodes,
            "unobservable": self.unobservable,
        }


def _episodes(alarm: npt.NDArray[np.bool_]) -> list[tuple[int, int, int]]:
    """(target, first cycle, last cycle) of each run of alarms; alarm is cycles x targets."""
    out: list[tuple[int, int, int]] = []
    padded = np.vstack([np.zeros((1, alarm.shape[1]), dtype=bool), alarm])
    starts = np.argwhere(padded[1:] & ~padded[:-1])
    for cycle, target in starts.tolist():
        end = cycle
        while end + 1 < alarm.shape[0] and alarm[end + 1, target]:
            end += 1
        out.append((int(target), int(cycle), int(end)))
    return out


def score(
    rec: Recorder,
    faults: Sequence[FaultSpec],
    kind: FaultKind,
    gpus_per_node: int,
    grace_cycles: int = 2,
) -> KindScore:
    """Precision, recall and delay of the agent's alarms for one fault kind."""
    times = np.asarray(rec.times_s)
    per_node = kind is FaultKind.DROPOUT
    if kind is FaultKind.XID:
        alarm_codes = np.stack(rec.xid_code)
        alarm = alarm_codes != 0
    elif kind is FaultKind.ECC:
        alarm = np.stack(rec.ecc)
        alarm_codes = None
    else:
        kinds = np.stack(rec.kind)
        alarm = np.isin(kinds, list(FAMILY_KINDS[kind]))
        alarm_codes = None
    if per_node:
        n_nodes = alarm.shape[1] // gpus_per_node
        alarm = alarm.reshape(alarm.shape[0], n_nodes, gpus_per_node).any(axis=2)
    working = np.stack(rec.working)
    mine = [f for f in faults if f.kind is kind]
    # An ECC fault raises XID 48 (as a double-bit error does): that XID is no false alarm.
    explains = mine + (
        [replace(f, kind=FaultKind.XID, param=48.0) for f in faults if f.kind is FaultKind.ECC]
        if kind is FaultKind.XID
        else []
    )

    def targets(f: FaultSpec) -> list[int]:
        if per_node:
            return [f.node - 1]
        base = (f.node - 1) * gpus_per_node
        return [base + f.gpu] if f.gpu is not None else list(range(base, base + gpus_per_node))

    def window(f: FaultSpec) -> tuple[int, int]:
        """Cycles in which an episode may start and count for f."""
        first = int(np.searchsorted(times, f.start_s, side="left"))
        end = int(np.searchsorted(times, f.end_s, side="left")) + grace_cycles
        return first, min(end, times.size - 1)

    def matches(f: FaultSpec, target: int, cycle: int) -> bool:
        lo, hi = window(f)
        if target not in targets(f) or not lo <= cycle <= hi:
            return False
        if alarm_codes is not None:
            return bool(alarm_codes[cycle, target] == int(f.param))
        return True

    episodes = _episodes(alarm)
    true_eps = sum(
        1 for target, start, _end in episodes if any(matches(f, target, start) for f in explains)
    )
    delays: list[float] = []
    unobservable = 0
    detected = 0
    for f in mine:
        lo, hi = window(f)
        onset = lo
        if kind is FaultKind.STRAGGLER:
            rows = targets(f)
            seen = np.flatnonzero(working[lo : hi + 1, rows].any(axis=1))
            if seen.size == 0:
                unobservable += 1
                continue
            onset = lo + int(seen[0])
        hits = [
            start for target, start, _end in episodes if matches(f, target, start) and start >= lo
        ]
        if hits:
            detected += 1
            delays.append(float(max(min(hits) - onset, 0) + 1))
    counted = len(mine) - unobservable
    return KindScore(
        fault=str(kind),
        precision=true_eps / len(episodes) if episodes else 1.0,
        recall=detected / counted if counted else 1.0,
        median_delay_cycles=float(np.median(delays)) if delays else float("nan"),
        faults=counted,
        detected=detected,
        episodes=len(episodes),
        true_episodes=true_eps,
        unobservable=unobservable,
        delays=tuple(delays),
    )


def merge(scores: Sequence[KindScore]) -> KindScore:
    """One score from several runs of the same kind (counts add up, delays pool)."""
    faults = sum(s.faults for s in scores)
    detected = sum(s.detected for s in scores)
    episodes = sum(s.episodes for s in scores)
    true_eps = sum(s.true_episodes for s in scores)
    delays = tuple(d for s in scores for d in s.delays)
    return KindScore(
        fault=scores[0].fault,
        precision=true_eps / episodes if episodes else 1.0,
        recall=detected / faults if faults else 1.0,
        median_delay_cycles=float(np.median(delays)) if delays else float("nan"),
        faults=faults,
        detected=detected,
        episodes=episodes,
        true_episodes=true_eps,
        unobservable=sum(s.unobservable for s in scores),
        delays=delays,
    )


def random_faults(
    rng: np.random.Generator,
    kinds: Sequence[FaultKind],
    per_kind: int,
    nodes: int,
    gpus_per_node: int,
    start_s: tuple[float, float],
    duration_s: float,
) -> tuple[FaultSpec, ...]:
    """Faults at distinct targets (no GPU hit twice, no node dropped twice or while one of its
    GPUs has another fault), at random times in `start_s`, each lasting `duration_s`."""
    faults: list[FaultSpec] = []
    used_gpus: set[int] = set()
    dropout_nodes: set[int] = set()
    n = nodes * gpus_per_node
    # Dropouts first: GPU faults then avoid the nodes whose exporter goes down.
    ordered = sorted(kinds, key=lambda k: k is not FaultKind.DROPOUT)
    for kind in ordered:
        for _ in range(per_kind):
            start = float(np.round(rng.uniform(*start_s)))
            if kind is FaultKind.DROPOUT:
                free = [k for k in range(nodes) if k not in dropout_nodes]
                free = [
                    k for k in free if not any(g // gpus_per_node == k for g in used_gpus)
                ] or free
                node = int(rng.choice(free))
                dropout_nodes.add(node)
                faults.append(FaultSpec(kind, node + 1, None, start, duration_s, 0.0))
                continue
            free_gpus = [
                g
                for g in range(n)
                if g not in used_gpus and g // gpus_per_node not in dropout_nodes
            ]
            gpu = int(rng.choice(free_gpus))
            used_gpus.add(gpu)
            param = {
                FaultKind.XID: float(rng.choice(XID_CODES)),
                FaultKind.ECC: 1.0,
                FaultKind.FAN: 1.6,
                FaultKind.STRAGGLER: 0.7,
                FaultKind.SPIKE: float("nan"),
            }[kind]
            faults.append(
                FaultSpec(
                    kind, gpu // gpus_per_node + 1, gpu % gpus_per_node, start, duration_s, param
                )
            )
    return tuple(faults)
