"""The site's limits as a tree, and the split of what they allow among the clusters.

Each node is a limit in watts: the site at the root, feeds or PDUs below it (nested as deep as
the site is), each cluster a leaf with an optional limit of its own. A cluster's path is every
limit from its leaf to the root; the sum of what is granted under any node never exceeds the
node's limit.

The split maximizes the sum over clusters of weight x throughput(grant), each throughput a
concave piecewise-linear demand curve (agent.site.curve). The limits nest (a laminar family), so
the feasible grants form a polymatroid and the greedy rule is optimal for a separable concave
objective: hand out curve pieces steepest first, each as far as the tightest limit on its path
allows. Floors come first: a cluster under its floor cannot keep its GPUs at their lowest caps;
where the floors under a limit do not fit, each gets the same share of its floor (and the split
says it is infeasible). Clusters whose power is not the coordinator's to move (no curve: their
agent is gone; or an older, larger grant not yet superseded) count at a fixed draw first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.site.curve import DemandCurve

# Granted watts are rounded down to this (grants travel as JSON; a watt is below any noise).
GRANT_RESOLUTION_W = 1.0
SLACK_W = 1e-6  # float rounding allowed on a limit's sum, far below GRANT_RESOLUTION_W


class TreeError(ValueError):
    """A tree of limits that cannot hold (named in the message)."""


@dataclass(frozen=True)
class LimitNode:
    name: str
    limit_w: float
    parent: str | None  # None: the root (the site)


@dataclass(frozen=True)
class LimitTree:
    """Nodes by name; clusters are leaves, each a node of its own (its limit may be inf)."""

    nodes: Mapping[str, LimitNode]
    clusters: tuple[str, ...]
    root: str
    paths: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # cluster -> leaf..root

    @staticmethod
    def build(
        root: str,
        root_limit_w: float,
        feeds: Mapping[str, tuple[float, str | None]],
        clusters: Mapping[str, tuple[float | None, str | None]],
    ) -> LimitTree:
        """`feeds`: name -> (limit, parent feed or None for the site); `clusters`: name ->
        (own limit or None, feed or None for the site). Raises TreeError naming the problem."""
        nodes: dict[str, LimitNode] = {root: LimitNode(root, root_limit_w, None)}
        for name, (limit, parent) in feeds.items():
            if name in nodes:
                raise TreeError(f"feeds.{name}: the name is taken (the site's or another's)")
            nodes[name] = LimitNode(name, limit, parent or root)
        for name, (own_w, feed) in clusters.items():
            if name in nodes:
                raise TreeError(f"clusters.{name}: the name is taken (a feed's or the site's)")
            own = float("inf") if own_w is None else own_w
            nodes[name] = LimitNode(name, own, feed or root)
        for node in nodes.values():
            if node.parent is not None and node.parent not in feeds and node.parent != root:
                where = "clusters" if node.name in clusters else "feeds"
                raise TreeError(f"{where}.{node.name}: no such feed {node.parent!r}")
            if not node.limit_w > 0:
                raise TreeError(f"{node.name}: a limit must be more than 0 W")
        paths = {c: _path(nodes, c) for c in clusters}
        return LimitTree(nodes=nodes, clusters=tuple(clusters), root=root, paths=paths)

    def under(self, node: str) -> list[str]:
        """The clusters below `node` (itself, if it is one)."""
        return [c for c, path in self.paths.items() if node in path]

    def sums(self, watts: Mapping[str, float]) -> dict[str, float]:
        """Per node: the sum of `watts` of the clusters below it."""
        out = dict.fromkeys(self.nodes, 0.0)
        for cluster, w in watts.items():
            for node in self.paths[cluster]:
                out[node] += w
        return out

    def over(self, watts: Mapping[str, float], slack_w: float = SLACK_W) -> dict[str, float]:
        """Per node whose limit the clusters' `watts` exceed: by how much."""
        return {
            node: total - self.nodes[node].limit_w
            for node, total in self.sums(watts).items()
            if total > self.nodes[node].limit_w + slack_w
        }

    def with_limits(self, limits_w: Mapping[str, float]) -> LimitTree:
        """The same tree with some limits replaced (a demand-response target on the site)."""
        nodes = {
            name: LimitNode(name, limits_w.get(name, n.limit_w), n.parent)
            for name, n in self.nodes.items()
        }
        return LimitTree(nodes=nodes, clusters=self.clusters, root=self.root, paths=self.paths)


def _path(nodes: Mapping[str, LimitNode], leaf: str) -> tuple[str, ...]:
    path: list[str] = []
    node: str | None = leaf
    while node is not None:
        if node in path:
            raise TreeError(f"feeds: {' -> '.join([*path, node])} is a cycle")
        path.append(node)
        node = nodes[node].parent
    return tuple(path)


@dataclass(frozen=True)
class Split:
    grants_w: dict[str, float]  # cluster -> watts (the live clusters only)
    feasible: bool  # every live cluster got at least its floor
    value: float  # the weighted throughput the grants buy, by the curves
    short: dict[str, float] = field(default_factory=dict)  # cluster -> watts short of its floor


def split(
    tree: LimitTree,
    curves: Mapping[str, DemandCurve],
    fixed_w: Mapping[str, float] | None = None,
    weights: Mapping[str, float] | None = None,
) -> Split:
    """Grants for the clusters with a curve, under every limit, counting `fixed_w` (clusters
    held at a draw, curve or not) first. Pure; O(clusters x curve points x depth)."""
    fixed = dict(fixed_w or {})
    remaining = {n: node.limit_w for n, node in tree.nodes.items()}
    for cluster, watts in fixed.items():
        for node in tree.paths[cluster]:
            remaining[node] -= watts
    live = [c for c in tree.clusters if c in curves and c not in fixed]
    grants = _floors(tree, {c: curves[c].floor_w for c in live}, remaining)
    short = {c: curves[c].floor_w - grants[c] for c in live if grants[c] < curves[c].floor_w}
    pieces = [
        (slope * (weights or {}).get(c, 1.0), order, c, width)
        for order, c in enumerate(live)
        for width, slope in curves[c].segments()
    ]
    # Steepest first; among equal slopes the earlier piece of the same curve first (stable).
    pieces.sort(key=lambda p: -p[0])
    for _slope, _order, cluster, width in pieces:
        path = tree.paths[cluster]
        room = min(remaining[n] for n in path)
        take = min(width, max(room, 0.0))
        if take <= 0:
            continue
        grants[cluster] += take
        for node in path:
            remaining[node] -= take
    grants = {c: _round_down(w) for c, w in grants.items()}
    value = sum((weights or {}).get(c, 1.0) * curves[c].value_at(w) for c, w in grants.items())
    return Split(grants_w=grants, feasible=not short, value=value, short=short)


def _floors(
    tree: LimitTree, floors: Mapping[str, float], remaining: dict[str, float]
) -> dict[str, float]:
    """Each cluster's floor, or where the floors under a limit exceed what is left of it, the
    same share of its floor as the others under that limit (the tightest limit on its path
    sets it). Subtracts what it grants from `remaining`."""
    wanted = tree.sums(floors)
    share = {
        n: 1.0 if wanted[n] <= 0 else min(1.0, max(remaining[n], 0.0) / wanted[n])
        for n in tree.nodes
    }
    grants = {c: f * min(share[n] for n in tree.paths[c]) for c, f in floors.items()}
    for cluster, watts in grants.items():
        for node in tree.paths[cluster]:
            remaining[node] -= watts
    return grants


def _round_down(watts: float) -> float:
    return float(int(max(watts, 0.0) / GRANT_RESOLUTION_W) * GRANT_RESOLUTION_W)


def stage_increases(
    tree: LimitTree,
    target_w: Mapping[str, float],
    held_w: Mapping[str, float],
    fixed_w: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Make before break: the grants to publish now, on the way to `target_w`, while each cluster
    may still draw up to `held_w` (its largest grant it has not yet confirmed planning past).
    Decreases go out at once; an increase only as far as the limits allow with the decreasing
    clusters still counted at what they hold, each limit's room shared in proportion to the
    increases wanted under it. Once the others confirm, the next round completes it."""
    fixed = dict(fixed_w or {})
    now: dict[str, float] = {}
    counted: dict[str, float] = dict(fixed)
    rising: dict[str, float] = {}
    for cluster, target in target_w.items():
        held = held_w.get(cluster, 0.0)
        if target <= held:
            now[cluster] = target
            counted[cluster] = held  # it may still draw what it held until it confirms
        else:
            now[cluster] = held
            counted[cluster] = held
            rising[cluster] = target - held
    if not rising:
        return now
    sums = tree.sums(counted)
    wanted = tree.sums(rising)
    share = {
        n: 1.0
        if wanted[n] <= 0
        else min(1.0, max(tree.nodes[n].limit_w - sums[n], 0.0) / wanted[n])
        for n in tree.nodes
    }
    for cluster, more in rising.items():
        frac = min(share[n] for n in tree.paths[cluster])
        now[cluster] = _round_down(now[cluster] + more * frac)
    return now


def grants_fit(
    tree: LimitTree, grants_w: Mapping[str, float], fixed_w: Mapping[str, float] | None = None
) -> bool:
    """Whether grants plus fixed draws keep every limit."""
    return not tree.over({**dict(fixed_w or {}), **dict(grants_w)})


def proportional_split(tree: LimitTree, sizes: Mapping[str, float]) -> dict[str, float]:
    """The static split a site without a coordinator would use: each limit's watts shared by
    cluster size (GPUs), the tightest limit on each path deciding (a baseline for the bench)."""
    total = tree.sums(sizes)
    shares = {
        c: min(tree.nodes[n].limit_w * sizes[c] / total[n] for n in tree.paths[c])
        for c in sizes
        if sizes[c] > 0
    }
    return {c: _round_down(w) for c, w in shares.items()}
