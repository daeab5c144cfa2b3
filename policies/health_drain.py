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
        s = self.settings
        snap = situation.snapshot
        health = situation.health
        if snap.n_gpus == 0 or health is None:
            return Decision([], memory)
        expires = now_s + s.lease_s
        nodes = situation.nodes
        sev = health.severity
        bad = sev >= HealthSeverity.DRAIN
        if s.drain_on_persistent_anomaly and situation.anomalies is not None:
            persistent = situation.anomalies.persistent
            if persistent is not None:
                bad = bad | (persistent & snap.fresh)
        intents: list[Intent] = []

        # Drain: per node, the worst GPU explains why.
        for k in np.unique(snap.node[bad]):
            node = str(snap.node_names[k])
            if nodes is not None and nodes.known[k] and nodes.drained[k]:
                continue  # already out of service (ours or an admin's): nothing to add
            rows = np.flatnonzero(bad & (snap.node == k))
            worst = rows[np.argmax(sev[rows])]
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
                    expires_s=expires,
                    node=node,
                )
            )

        # Requeue the jobs that hit the fault, once.
        requeued = {j: t for j, t in memory.requeued_at_s.items() if now_s - t < s.requeue_memory_s}
        if s.requeue:
            remedies = np.char.lower(health.remediation.astype(np.str_))
            wants = np.zeros(snap.n_gpus, dtype=bool)
            for word in REQUEUE_WORDS:
                wants |= np.char.find(remedies, word) >= 0
            wants &= (sev >= HealthSeverity.RESTART_JOB) & (snap.job != "")
            for row in np.flatnonzero(wants):
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
                        expires_s=expires,
                        job=job,
                        node=str(snap.node_names[snap.node[row]]),
                    )
                )

        # Resume our own drains after a healthy hold.
        healthy_since: dict[str, float] = {}
        if nodes is not None:
            node_bad = (
                np.bincount(
                    snap.node[bad | (sev > HealthSeverity.OK) | ~snap.fresh], minlength=snap.n_nodes
                )
                > 0
            )
            for k in np.flatnonzero(nodes.known & nodes.drained & nodes.drained_by_us):
                node = str(snap.node_names[k])
                if node_bad[k]:
                    continue
                since = memory.healthy_since_s.get(node, now_s)
                healthy_since[node] = since
                if now_s - since >= s.resume_hold_s:
                    intents.append(
                        ResumeNode(
                            policy=self.name,
                            reason=f"healthy for {now_s - since:.0f} s since our drain",
                            evidence={"healthy_since_s": since},
                            expires_s=expires,
                            node=node,
                        )
                    )

        # Watch-class signals: tell a person once.
        notified = dict(memory.notified)
        if s.notify_watch:
            for row in np.flatnonzero(sev == HealthSeverity.WATCH):
                key = f"{snap.uuid[row]}:{health.code[row]}"
                if key in notified:
                    continue
                notified[key] = now_s
                intents.append(
                    Notify(
                        policy=self.name,
                        reason=f"{health.code[row]}: {health.remediation[row]}",
                        evidence={"code": str(health.code[row])},
                        expires_s=expires,
                        target=snap.target(int(row)),
                        severity=Severity.WARNING,
                        summary=f"{snap.target(int(row))}: {health.code[row]}"
                        f" ({health.remediation[row]})",
                    )
                )
        if notified:  # forget conditions that cleared (only GPUs with a code are looked at)
            coded = np.flatnonzero(health.code != "")
            live_keys = {f"{snap.uuid[r]}:{health.code[r]}" for r in coded}
            notified = {k: t for k, t in notified.items() if k in live_keys}
        return Decision(
            intents,
            HealthDrainMemory(
                healthy_since_s=healthy_since, requeued_at_s=requeued, notified=notified
            ),
        )
