"""health_drain: take nodes with failing GPUs out of service, requeue the jobs that hit the fault,
and bring back the nodes the agent drained once they have stayed healthy.

It follows orient's health classes, which follow NVIDIA's documented remediation (fatal XIDs such
as 48, 64, 74, 79, 95, double-bit ECC and row-remap failures: drain; XID 94: restart the job;
63 and friends: watch). Only nodes the agent drained itself are ever resumed (the placement
actuator marks its drains with the reason prefix `ooda:`); a node someone else drained is left
alone. How many nodes may be drained at once is the guard's business (its circuit breaker).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from agent.core.intents import DrainNode, Intent, Notify, RequeueJob, ResumeNode, Severity
from agent.core.situation import HealthSeverity, Situation
from policies.base import BasePolicy, Decision, PolicyMemory, PolicySettings

REQUEUE_WORDS = ("requeue", "restart the job", "restart app")


class HealthDrainSettings(PolicySettings):
    requeue: bool = Field(True, description="Requeue jobs whose GPU's health class says so.")
    drain_on_persistent_anomaly: bool = Field(
        False, description="Also drain nodes whose GPUs stay anomalous for many cycles."
    )
    resume_hold_s: float = Field(
        600.0, ge=0.0, description="A node we drained is resumed after this long healthy (s)."
    )
    notify_watch: bool = Field(
        True, description="Notify once per GPU and signal of the 'watch' class."
    )
    requeue_memory_s: float = Field(
        3600.0,
        gt=0.0,
        description="A job requeued by us is not requeued again within this time (s).",
    )
    lease_s: float = Field(300.0, gt=0.0, description="How long these intents stay valid (s).")


class HealthDrainMemory(PolicyMemory):
    healthy_since_s: dict[str, float] = Field(default_factory=dict)  # our drained node -> since
    requeued_at_s: dict[str, float] = Field(default_factory=dict)  # job -> when we requeued it
    notified: dict[str, float] = Field(default_factory=dict)  # "uuid:code" -> when


class HealthDrain(BasePolicy[HealthDrainSettings, HealthDrainMemory]):
    name: ClassVar[str] = "health_drain"
    safety: ClassVar[bool] = True
    description: ClassVar[str] = (
        "Drain nodes with fatal XIDs, ECC faults or persistent anomalies; requeue their jobs; "
        "resume our drains after a healthy hold."
    )
    Settings = HealthDrainSettings
    Memory = HealthDrainMemory

    def decide(
        self, situation: Situation, memory: PolicyMemory, now_s: float
    ) -> Decision[PolicyMemory]:
        assert isinstance(memory, HealthDrainMemory)
        if situation.snapshot.n_gpus == 0 or situation.health is None:
            return Decision([], memory)
        bad = self._bad_gpus(situation)
        expires_s = now_s + self.settings.lease_s
        intents: list[Intent] = self._drains(situation, bad, expires_s)
        requeued = {
            j: t
            for j, t in memory.requeued_at_s.items()
            if now_s - t < self.settings.requeue_memory_s
        }
        intents += self._requeues(situation, requeued, now_s, expires_s)
        healthy_since: dict[str, float] = {}
        intents += self._resumes(situation, bad, memory, healthy_since, now_s, expires_s)
        notified = dict(memory.notified)
        intents += self._notifications(situation, notified, now_s, expires_s)
        return Decision(
            intents,
            HealthDrainMemory(
                healthy_since_s=healthy_since, requeued_at_s=requeued, notified=notified
            ),
        )

    def _bad_gpus(self, situation: Situation) -> np.ndarray:
        """GPUs whose health class says drain (and, if asked, those anomalous for long)."""
        assert situation.health is not None
        bad = situation.health.severity >= HealthSeverity.DRAIN
        if self.settings.drain_on_persistent_anomaly and situation.anomalies is not None:
            persistent = situation.anomalies.persistent
            if persistent is not None:
                bad = bad | (persistent & situation.snapshot.fresh)
        return np.asarray(bad, dtype=bool)

    def _drains(self, situation: Situation, bad: np.ndarray, expires_s: float) -> list[Intent]:
        """Drain each node with a bad GPU; per node, the worst GPU explains why."""
        snap, health, nodes = situation.snapshot, situation.health, situation.nodes
        assert health is not None
        intents: list[Intent] = []
        for k in np.unique(snap.node[bad]):
            node = str(snap.node_names[k])
            if nodes is not None and nodes.known[k] and nodes.drained[k]:
                continue  # already out of service (ours or an admin's): nothing to add
            rows = np.flatnonzero(bad & (snap.node == k))
            worst = rows[np.argmax(health.severity[rows])]
            code = str(health.code[worst]) or "persistent anomaly"
            remedy = str(health.remediation[worst])
            why = f"gpu{int(snap.gpu[worst])} {code}" + (f": {remedy}" if remedy else "")
            intents.append(
                DrainNode(
                    policy=self.name,
                    reason=f"ooda: health: {why}",
                    evidence={
                        "gpus": [f"gpu{int(g)}" for g in snap.gpu[rows]],
                        "codes": [str(c) for c in health.code[rows]],
                        "since_s": [float(x) for x in health.since_s[rows]],
                    },
                    expires_s=expires_s,
                    node=node,
                )
            )
        return intents

    def _requeues(
        self, situation: Situation, requeued: dict[str, float], now_s: float, expires_s: float
    ) -> list[Intent]:
        """Requeue the jobs that hit a restart-class fault, once (noted in `requeued`)."""
        snap, health = situation.snapshot, situation.health
        assert health is not None
        if not self.settings.requeue:
            return []
        # The few GPUs with a job and a restart-class fault first; their remediation's words
        # then (string work over every GPU's text would cost a cycle at 100,000 GPUs).
        rows = np.flatnonzero((health.severity >= HealthSeverity.RESTART_JOB) & (snap.job != ""))
        remedies = np.char.lower(health.remediation[rows].astype(np.str_))
        wants = np.zeros(rows.size, dtype=bool)
        for word in REQUEUE_WORDS:
            wants |= np.char.find(remedies, word) >= 0
        intents: list[Intent] = []
        for row in rows[wants]:
            job = str(snap.job[row])
            if job in requeued:
                continue
            requeued[job] = now_s
            intents.append(
                RequeueJob(
                    policy=self.name,
                    reason=f"ooda: health: {health.code[row]} on {snap.target(int(row))}",
                    evidence={
                        "code": str(health.code[row]),
                        "remediation": str(health.remediation[row]),
                    },
                    expires_s=expires_s,
                    job=job,
                    node=str(snap.node_names[snap.node[row]]),
                )
            )
        return intents

    def _resumes(
        self,
        situation: Situation,
        bad: np.ndarray,
        memory: HealthDrainMemory,
        healthy_since: dict[str, float],
        now_s: float,
        expires_s: float,
    ) -> list[Intent]:
        """Resume our own drains after a healthy hold (each node's since when: `healthy_since`)."""
        snap, health, nodes = situation.snapshot, situation.health, situation.nodes
        assert health is not None
        if nodes is None:
            return []
        unwell = bad | (health.severity > HealthSeverity.OK) | ~snap.fresh
        node_bad = np.bincount(snap.node[unwell], minlength=snap.n_nodes) > 0
        intents: list[Intent] = []
        for k in np.flatnonzero(nodes.known & nodes.drained & nodes.drained_by_us):
            node = str(snap.node_names[k])
            if node_bad[k]:
                continue
            since = memory.healthy_since_s.get(node, now_s)
            healthy_since[node] = since
            if now_s - since >= self.settings.resume_hold_s:
                intents.append(
                    ResumeNode(
                        policy=self.name,
                        reason=f"healthy for {now_s - since:.0f} s since our drain",
                        evidence={"healthy_since_s": since},
                        expires_s=expires_s,
                        node=node,
                    )
                )
        return intents

    def _notifications(
        self, situation: Situation, notified: dict[str, float], now_s: float, expires_s: float
    ) -> list[Intent]:
        """Tell a person once per GPU and watch-class signal; forget conditions that cleared."""
        snap, health = situation.snapshot, situation.health
        assert health is not None
        intents: list[Intent] = []
        if self.settings.notify_watch:
            for row in np.flatnonzero(health.severity == HealthSeverity.WATCH):
                key = f"{snap.uuid[row]}:{health.code[row]}"
                if key in notified:
                    continue
                notified[key] = now_s
                target = snap.target(int(row))
                intents.append(
                    Notify(
                        policy=self.name,
                        reason=f"{health.code[row]}: {health.remediation[row]}",
                        evidence={"code": str(health.code[row])},
                        expires_s=expires_s,
                        target=target,
                        severity=Severity.WARNING,
                        summary=f"{target}: {health.code[row]} ({health.remediation[row]})",
                    )
                )
        if notified:  # only GPUs with a code are looked at
            coded = np.flatnonzero(health.code != "")
            live_keys = {f"{snap.uuid[r]}:{health.code[r]}" for r in coded}
            for key in [k for k in notified if k not in live_keys]:
                del notified[key]
        return intents
