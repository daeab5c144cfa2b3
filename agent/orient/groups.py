"""Racks, rows and priority classes: which GPUs belong to which group and how important each job
is, from node lists (Slurm hostlists or globs), a telemetry label, or job-id patterns."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import hostlist
import numpy as np
import numpy.typing as npt

from agent.core.snapshot import Snapshot

BoolArray = npt.NDArray[np.bool_]


def expand_nodes(spec: str | Sequence[str]) -> list[str]:
    """`node[1-4,7]` or a list of such expressions and globs -> the names or patterns."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for part in parts:
        if any(ch in part for ch in "*?") and "[" not in part:
            out.append(part)  # a glob, matched at run time
            continue
        try:
            out.extend(hostlist.expand_hostlist(part))
        except hostlist.BadHostlist as exc:
            raise ValueError(f"bad node list {part!r}: {exc}") from None
    return out


@dataclass(frozen=True)
class GroupSpec:
    name: str
    budget_w: float
    members: tuple[str, ...]  # node names and globs

    def node_mask(self, node_names: npt.NDArray[np.str_]) -> BoolArray:
        exact = {m for m in self.members if not any(ch in m for ch in "*?")}
        globs = [m for m in self.members if m not in exact]
        mask = np.isin(node_names, list(exact))
        for pattern in globs:
            mask |= np.array([fnmatch.fnmatchcase(str(n), pattern) for n in node_names], dtype=bool)
        return np.asarray(mask, dtype=bool)


def group_masks(
    snapshot: Snapshot,
    groups: Sequence[GroupSpec],
    label: str | None = None,
    label_budgets_w: Mapping[str, float] | None = None,
) -> dict[str, tuple[float, BoolArray]]:
    """Per group: its budget and the GPUs in it (per-node work only: no per-GPU Python loop)."""
    out: dict[str, tuple[float, BoolArray]] = {}
    for group in groups:
        per_node = group.node_mask(snapshot.node_names)
        out[group.name] = (group.budget_w, per_node[snapshot.node])
    if label and label_budgets_w and label in snapshot.labels:
        values = snapshot.labels[label]
        for value, budget in label_budgets_w.items():
            out[f"{label}={value}"] = (float(budget), np.asarray(values == value, dtype=bool))
    return out


def job_priorities(
    job: npt.NDArray[np.str_], patterns: Mapping[str, int], base: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Per GPU: the class of the first job-id pattern its job matches (else `base`)."""
    if not patterns or job.size == 0:
        return base
    out = base.copy()
    unique, inverse = np.unique(job, return_inverse=True)
    classes = np.full(unique.size, -1, dtype=np.int64)
    for i, name in enumerate(unique.tolist()):  # per job, not per GPU
        if not name:
            continue
        for pattern, klass in patterns.items():
            if fnmatch.fnmatchcase(name, pattern):
                classes[i] = klass
                break
    per_gpu = classes[inverse]
    return np.where(per_gpu >= 0, per_gpu, out)
