"""The twin behind the agent's edge protocols: a TelemetrySource, a CapActuator and a
PlacementActuator, so the loop runs against the twin exactly as against a real cluster."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from agent.core.errors import ActuatorError
from agent.core.intents import GpuTargets
from agent.core.protocols import CapResult
from agent.core.situation import NodeStates
from agent.core.snapshot import Metric, Snapshot
from agent.sim.twin import Twin

FloatArray = npt.NDArray[np.float64]

OWNER_PREFIX = "ooda:"


class TwinSource:
    """The twin's telemetry as a Snapshot, as DCGM reports it (a flat-lined reading frozen, the
    energy counter reset by an exporter restart). A node whose exporter is down goes stale once
    its newest sample is older than `staleness_s`; a node whose exporter is restarting, at once
    (its series are gone, as Prometheus marks a failed target's series stale at once). Stale rows
    carry no values, only their age."""

    def __init__(self, twin: Twin, staleness_s: float = 45.0, expose_limits: bool = True) -> None:
        self.twin = twin
        self.staleness_s = staleness_s
        self.expose_limits = expose_limits
        self._frozen: dict[Metric, FloatArray] | None = None

    def _current(self) -> dict[Metric, FloatArray]:
        tw = self.twin
        values = {
            Metric.POWER_W: tw.reported_power_w,
            Metric.TEMP_C: tw.reported_temp_c,
            Metric.UTIL_PCT: tw.util_pct,
            Metric.MEM_UTIL_PCT: tw.mem_util_pct,
            Metric.SM_CLOCK_MHZ: tw.sm_clock_mhz,
            Metric.XID: tw.xid.astype(np.float64),
            Metric.ECC_DBE_TOTAL: tw.ecc_dbe,
            Metric.REMAPPED_ROWS_UNCORRECTABLE: tw.remapped_uncorrectable,
            Metric.ROW_REMAP_FAILURE: tw.row_remap_failure,
            Metric.ENERGY_J: tw.reported_energy_j,
            Metric.CLOCKS_EVENT_REASONS: tw.clocks_event_reasons.astype(np.float64),
        }
        if self.expose_limits:
            values |= {
                Metric.POWER_LIMIT_W: tw.cap_w,
                Metric.ENFORCED_LIMIT_W: tw.enforced_w,
                Metric.MIN_LIMIT_W: tw.min_w,
                Metric.MAX_LIMIT_W: tw.max_w,
                Metric.DEFAULT_LIMIT_W: tw.default_w,
            }
        return {k: np.array(v, dtype=np.float64) for k, v in values.items()}

    def observe(self, now_s: float) -> Snapshot:
        tw = self.twin
        values = self._current()
        age = tw.t_s - tw.node_last_seen_s[tw.node_of]
        stale = (age > self.staleness_s) | tw.exporter_restarting[tw.node_of]
        valid = {m: ~stale for m in values}
        for column in values.values():
            column[stale] = np.nan
        return Snapshot(
            time_s=tw.t_s,
            node_names=tw.node_names,
            node=tw.node_of,
            gpu=tw.gpu_idx,
            uuid=tw.uuid,
            model=np.full(tw.spec.n_gpus, tw.spec.model.model_name),
            job=np.where(stale, "", tw.job_labels()),
            values=values,
            valid=valid,
            age_s=age,
            stale=stale,
            budget_w=tw.budget_w(),
            labels=tw.labels(),
        )


class TwinCapActuator:
    """Applies caps to the twin's GPUs, validated against each GPU's constraints."""

    def __init__(self, twin: Twin) -> None:
        self.twin = twin

    def _apply(self, targets: GpuTargets, watts: FloatArray) -> CapResult:
        tw = self.twin
        rows = tw.rows_for(list(targets.node), list(targets.gpu))
        before = np.where(rows >= 0, tw.cap_w[np.maximum(rows, 0)], np.nan)
        ok = np.zeros(len(targets), dtype=bool)
        errors: dict[int, str] = {}
        down = ~tw.exporter_up[tw.node_of[np.maximum(rows, 0)]]
        for i, row in enumerate(rows):
            if row < 0:
                errors[i] = "no such GPU"
            elif not (tw.min_w[row] <= watts[i] <= tw.max_w[row]):
                errors[i] = f"{watts[i]:.0f} W outside [{tw.min_w[row]:.0f}, {tw.max_w[row]:.0f}] W"
            elif down[i]:
                errors[i] = "node unreachable"
            else:
                ok[i] = True
        if ok.any():
            tw.set_caps(rows[ok], watts[ok])
        return CapResult(ok=ok, before_w=before, errors=errors)

    def set_caps(self, targets: GpuTargets, watts: FloatArray, lease_s: float) -> CapResult:
        return self._apply(targets, np.asarray(watts, dtype=np.float64))

    def release_caps(self, targets: GpuTargets) -> CapResult:
        tw = self.twin
        rows = tw.rows_for(list(targets.node), list(targets.gpu))
        defaults = np.where(rows >= 0, tw.default_w[np.maximum(rows, 0)], np.nan)
        return self._apply(targets, defaults)


class TwinPlacement:
    """Drains, weights, features and requeues on the twin's scheduler, with Slurm's semantics
    (our drains carry a reason starting `ooda:`)."""

    def __init__(self, twin: Twin) -> None:
        self.twin = twin
        self.reasons: dict[str, str] = {}
        self._index = {str(name): k for k, name in enumerate(twin.node_names)}

    def _node(self, node: str) -> int:
        try:
            return self._index[node]
        except KeyError:
            raise ActuatorError(f"twin: no node named {node!r}") from None

    def all_nodes(self) -> list[str]:
        return [str(n) for n in self.twin.node_names]

    def node_states(self, node_names: Sequence[str]) -> NodeStates:
        tw = self.twin
        names = np.asarray(node_names, dtype=np.str_)
        order = np.argsort(tw.node_names)
        pos = np.clip(np.searchsorted(tw.node_names[order], names), 0, len(order) - 1)
        known = tw.node_names[order][pos] == names
        safe = np.where(known, order[pos], 0).astype(np.int64)
        reasons = np.full(names.shape, "", dtype=object)
        for name, why in self.reasons.items():  # only the drained nodes: few
            reasons[names == name] = why
        reasons = reasons.astype(np.str_)
        empty: frozenset[str] = frozenset()
        features = tuple(
            frozenset(tw.node_features[i]) if ok and tw.node_features[i] else empty
            for i, ok in zip(safe.tolist(), known.tolist(), strict=True)
        )
        return NodeStates(
            drained=tw.node_drained[safe] & known,
            drained_by_us=np.char.startswith(reasons, OWNER_PREFIX) & tw.node_drained[safe] & known,
            reason=reasons,
            weight=tw.node_weight[safe],
            features=features,
            opted_out=np.array(["ooda-ignore" in f for f in features], dtype=bool),
            known=known,
        )

    def drain(self, node: str, reason: str) -> None:
        k = self._node(node)
        self.twin.node_drained[k] = True
        self.reasons[node] = reason

    def resume(self, node: str) -> None:
        k = self._node(node)
        self.twin.node_drained[k] = False
        self.reasons.pop(node, None)

    def set_weight(self, node: str, weight: int) -> None:
        self.twin.node_weight[self._node(node)] = weight

    def set_features(self, node: str, add: frozenset[str], remove: frozenset[str]) -> None:
        k = self._node(node)
        self.twin.node_features[k] = (self.twin.node_features[k] - remove) | add

    def requeue(self, job: str) -> None:
        if not job.isdecimal() or not self.twin.requeue_job(int(job)):
            raise ActuatorError(f"twin: job {job!r} is not running")


class TwinClock:
    """The twin's virtual time as a Clock (sleeping steps the twin)."""

    def __init__(self, twin: Twin) -> None:
        self.twin = twin

    def now(self) -> float:
        return self.twin.t_s

    def sleep(self, seconds: float) -> None:
        self.twin.run_until(self.twin.t_s + seconds)
