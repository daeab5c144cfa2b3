"""Live or advisory, and why: the one answer for the loop, the gate, the executor and the audit.

An intent is only recorded (advisory) when the agent runs in dry-run (`dry_run`, unless the
intent's policy says `dry_run = false` for itself), when its policy is in dry-run of its own
(`dry_run = true`), when the rollout keeps its kind advisory, or during a freeze window. The
rollout's scope (the nodes and partitions the agent may touch at all) lives here too: what is
out of scope is refused by the gate, never acted on or advised.

Replay asks with `always`: every intent is advice there, for that reason.
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.act.rollout import Rollout, Scope
from agent.core.intents import Intent


class Authority:
    def __init__(
        self,
        dry_run: bool = False,
        policy_dry_run: Mapping[str, bool | None] | None = None,
        rollout: Rollout | None = None,
        *,
        always: str | None = None,
    ) -> None:
        # The agent's own flag: also whether a cap only recorded counts as ours (an advising
        # agent sees its advice as followed) and whether leases are renewed at all.
        self.dry_run = dry_run or always is not None
        self.policy_dry_run = dict(policy_dry_run or {})
        self.rollout = rollout
        self.always = always
        self._everything = Scope()

    @property
    def scope(self) -> Scope:
        """Which nodes may be touched at all (the rollout's; everything without one)."""
        return self.rollout.scope if self.rollout is not None else self._everything

    def pin(self, now_s: float) -> None:
        """Judge freeze windows at this cycle's time: one answer per cycle, whoever asks."""
        if self.rollout is not None:
            self.rollout.pin(now_s)

    def why(self, intent: Intent) -> str | None:
        """Why this intent is only recorded (None: it is applied). A policy's own `dry_run`
        overrides the agent's; the rollout (advisory kinds, freeze windows) can only add."""
        if self.always is not None:
            return self.always
        own = self.policy_dry_run.get(intent.policy)
        if own is True:
            return f"policy {intent.policy}: dry_run"
        if own is None and self.dry_run:
            return "dry_run"
        return self.rollout.advisory(intent) if self.rollout is not None else None

    def advisory(self, intent: Intent) -> bool:
        return self.why(intent) is not None
