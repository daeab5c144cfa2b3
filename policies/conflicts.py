"""Resolving conflicts between intents of different policies. The rule, in order:

1. Power caps: per GPU the lowest cap wins. A cap beats a release (a release is "no cap").
2. A node being drained needs nothing else: `DrainNode` beats `ResumeNode`, `SetNodeWeight` and
   `SetNodeFeatures` for that node.
3. Otherwise, between intents of one kind on one target, safety policies outrank efficiency
   policies; among equals the more conservative value wins (the higher weight, i.e. the node
   avoided more); then the policy listed first in the config.
4. `RequeueJob` and `Notify` are kept once per target (the first, by the same ranking).

Everything dropped is returned with the reason, so the audit shows what was overridden and by what.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.core.intents import (
    DrainNode,
    Intent,
    Notify,
    ReleasePowerCap,
    RequeueJob,
    ResumeNode,
    SetNodeFeatures,
    SetNodeWeight,
    SetPowerCap,
)
from agent.core.keyed import distinct


@dataclass(frozen=True, slots=True)
class Overridden:
    intent: Intent
    reason: str


@dataclass(frozen=True, slots=True)
class Resolution:
    intents: list[Intent]
    overridden: list[Overridden]


def resolve(
    intents: Sequence[Intent], safety: Mapping[str, bool], order: Sequence[str]
) -> Resolution:
    """`safety`: policy name -> is a safety policy; `order`: policy names as configured."""
    rank_of = {name: i for i, name in enumerate(order)}

    def rank(intent: Intent) -> tuple[int, int]:
        return (
            0 if safety.get(intent.policy, False) else 1,
            rank_of.get(intent.policy, len(rank_of)),
        )

    kept: list[Intent] = []
    overridden: list[Overridden] = []
    caps = [i for i in intents if isinstance(i, SetPowerCap)]
    releases = [i for i in intents if isinstance(i, ReleasePowerCap)]
    kept_caps, lost = _resolve_caps(caps, releases)
    kept.extend(kept_caps)
    overridden.extend(lost)

    drained = {i.node for i in intents if isinstance(i, DrainNode)}
    by_target: dict[tuple[type, str], list[Intent]] = {}
    for intent in intents:
        if isinstance(intent, SetPowerCap | ReleasePowerCap):
            continue
        if (
            isinstance(intent, ResumeNode | SetNodeWeight | SetNodeFeatures)
            and intent.node in drained
        ):
            overridden.append(Overridden(intent, f"node {intent.node} is being drained"))
            continue
        by_target.setdefault((type(intent), intent.target_name()), []).append(intent)
    for (kind, _target), group in by_target.items():
        if kind is SetNodeWeight:
            group.sort(key=lambda i: (rank(i)[0], -_weight(i), rank(i)[1]))
        elif kind is SetNodeFeatures:
            group.sort(key=rank)
        else:
            group.sort(key=rank)
        winner = group[0]
        kept.append(winner)
        for other in group[1:]:
            if kind in (RequeueJob, Notify) or kind is DrainNode:
                reason = f"duplicate of {winner.policy}'s"
            else:
                reason = f"{winner.policy} outranks it"
            overridden.append(Overridden(other, reason))
    return Resolution(kept, overridden)


def _weight(intent: Intent) -> int:
    return intent.weight if isinstance(intent, SetNodeWeight) else 0


def _picked_rows(caps: list[SetPowerCap]) -> npt.NDArray[np.int64] | None:
    """The caps' targets' rows, when all were taken from one read-only array of distinct
    UUIDs (a row then stands for a UUID); else None."""
    picked = [c.targets.picked() for c in caps]
    first = picked[0]
    if first is None or any(p is None or p[0] is not first[0] for p in picked):
        return None
    if not distinct(first[0]):
        return None
    return np.concatenate([p[1] for p in picked if p is not None])


def _resolve_caps(
    caps: list[SetPowerCap], releases: list[ReleasePowerCap]
) -> tuple[list[Intent], list[Overridden]]:
    if not caps and not releases:
        return [], []
    kept: list[Intent] = []
    lost: list[Overridden] = []
    if caps:
        uuid = np.concatenate([c.targets.uuid for c in caps])
        watts = np.concatenate([c.watts for c in caps])
        source = np.concatenate([np.full(len(c), k) for k, c in enumerate(caps)])
        position = np.concatenate([np.arange(len(c)) for c in caps])
        # Per GPU the lowest watts first. GPUs are told apart by their rows in the snapshot
        # where every cap was taken from its (distinct) UUIDs: sorting integers, not strings.
        key = _picked_rows(caps)
        if key is None:
            key = uuid
        order = np.lexsort((source, watts, key))
        first = np.ones(order.size, dtype=bool)
        first[1:] = key[order][1:] != key[order][:-1]
        winners = order[first]
        losers = order[~first]
        capped_uuids = uuid[winners]
        for k, cap in enumerate(caps):
            win_pos = position[winners[source[winners] == k]]
            lose_pos = position[losers[source[losers] == k]]
            if win_pos.size:
                kept.append(cap.subset(np.sort(win_pos)))
            if lose_pos.size:
                lost.append(
                    Overridden(
                        cap.subset(np.sort(lose_pos)), "a lower cap from another policy wins"
                    )
                )
    else:
        capped_uuids = np.zeros(0, dtype=np.str_)
    seen = capped_uuids
    for release in releases:
        conflict = np.isin(release.targets.uuid, seen)
        if conflict.any():
            lost.append(
                Overridden(
                    release.subset(conflict), "a cap from another policy wins over a release"
                )
            )
        if (~conflict).any():
            kept.append(release.subset(~conflict))
            seen = np.concatenate([seen, release.targets.uuid[~conflict]])
    return kept, lost
