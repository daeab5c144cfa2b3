"""The in-process twin as an adapter: its telemetry (source kind `twin`), its caps and its
scheduler (actuator kinds `twin`). The twin is one for all three, described by the top-level
`[twin]` section (the simulated cluster, not one adapter's)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pydantic import BaseModel, Field, field_validator

from agent.adapters.table import ActuatorKind, BuildContext, SourceKind
from agent.core.errors import BadInputError
from agent.core.gpu_models import BUILTIN_MODELS
from agent.core.protocols import JobInventory, TelemetrySource
from agent.core.settings import STRICT_SECTION
from agent.sim.accounts import TwinAccountLabels
from agent.sim.adapters import TwinCapActuator, TwinClock, TwinPlacement, TwinSource
from agent.sim.faults import parse_fault
from agent.sim.job_mirror import JobMirror, MirroredTwinSource
from agent.sim.twin import TWIN_LABELS, BudgetSchedule, Twin, TwinSpec


class _Section(BaseModel):
    model_config = STRICT_SECTION


class DemandResponse(_Section):
    start_s: float = Field(..., ge=0, description="When the budget drops (twin seconds).")
    duration_s: float = Field(..., gt=0, description="How long the drop lasts (s).")
    budget_w: float = Field(..., gt=0, description="The budget during the drop (W).")


class TwinConfig(_Section):
    nodes: int = Field(8, ge=1, le=20000, description="Nodes in the twin.")
    gpus_per_node: int = Field(8, ge=1, le=16, description="GPUs per node.")
    model: str = Field(
        "H100", description="GPU model (H100, A100, H200, B200, GB200, A100-PCIe or L40S)."
    )
    seed: int = Field(
        0,
        ge=0,
        le=2**63 - 1,
        description="Random seed (0 to 2^63-1): the same seed gives the same run.",
    )
    occupancy: float = Field(0.85, ge=0, le=1, description="Target share of busy GPUs.")
    budget_w: float | None = Field(
        None, gt=0, description="The facility budget (W); none: no budget."
    )
    demand_response: DemandResponse | None = None
    speed: float = Field(
        0.0,
        ge=0,
        description="0: virtual clock, as fast as possible; 1: real time; X: X times real time.",
    )
    cycle_s: float | None = Field(
        None,
        gt=0,
        le=86_400,
        description="With speed 0 under `ooda run`: twin seconds per cycle (default: "
        "daemon.interval_s), e.g. a twin day in minutes.",
    )
    faults: list[str] = Field(
        default_factory=list, description="Faults, e.g. 'xid=79:node2/gpu1@60'."
    )
    node_overhead_w: float = Field(0.0, ge=0, description="Non-GPU power per node (W).")

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in BUILTIN_MODELS:
            raise ValueError(
                f"unknown GPU model {value!r} (known: {', '.join(sorted(BUILTIN_MODELS))})"
            )
        return value

    @field_validator("faults")
    @classmethod
    def _valid_faults(cls, value: list[str]) -> list[str]:
        for spec in value:
            try:
                parse_fault(spec)
            except BadInputError as exc:
                raise ValueError(str(exc)) from None
        return value


def twin_spec(cfg: TwinConfig) -> TwinSpec:
    """The twin a config describes."""
    budget: BudgetSchedule | None = None
    if cfg.budget_w is not None:  # a demand response without it is refused by the config
        budget = BudgetSchedule.constant(cfg.budget_w)
        if cfg.demand_response is not None:
            dr = cfg.demand_response
            budget = BudgetSchedule.demand_response(
                cfg.budget_w, dr.budget_w, dr.start_s, dr.duration_s
            )
    return TwinSpec(
        nodes=cfg.nodes,
        gpus_per_node=cfg.gpus_per_node,
        model=BUILTIN_MODELS[cfg.model],
        seed=cfg.seed,
        occupancy=cfg.occupancy,
        node_overhead_w=cfg.node_overhead_w,
        budget=budget,
        faults=tuple(parse_fault(f) for f in cfg.faults),
    )


def twin_factory(cfg: TwinConfig) -> Any:
    """Builds the twin `cfg` describes; `mirror`: its jobs will be a scheduler's (it starts
    empty, the scheduler's jobs arrive through the mirror)."""

    def build(mirror: bool) -> Twin:
        spec = twin_spec(cfg)
        if mirror:
            spec = replace(spec, occupancy=0.0, initial_jobs=False)
        return Twin(spec)

    return build


def _source(_section: None, ctx: BuildContext) -> TelemetrySource:
    # The twin standing in for the GPUs of a real cluster: its jobs are the scheduler's.
    placement: object = ctx.placement  # a placement system may also keep the job table
    inventory = placement if isinstance(placement, JobInventory) else None
    twin = ctx.get_twin(mirror=inventory is not None)
    source: TelemetrySource = TwinSource(twin)
    if inventory is not None:
        ctx.mirrored = True
        return MirroredTwinSource(source, JobMirror(twin, inventory))
    return TwinAccountLabels(source)  # the twin's jobs have owners too (account shares)


TWIN_SOURCE = SourceKind(
    name="twin",
    description="The in-process twin's telemetry, on its own clock ([twin] describes it).",
    build=_source,
    labels=TWIN_LABELS,
    whose="the twin's",
    called="the twin",
    observes_twin=True,
    clock=lambda _source, ctx, _section: TwinClock(ctx.get_twin()),
    own_budget=lambda _section, config: config.twin.budget_w is not None,
)
TWIN_CAPS = ActuatorKind(
    name="twin",
    role="caps",
    description="Caps on the in-process twin's GPUs.",
    build=lambda _section, ctx: TwinCapActuator(ctx.get_twin()),
    acts_on_twin=True,
)
TWIN_PLACEMENT = ActuatorKind(
    name="twin",
    role="placement",
    description="Drains, weights and features on the in-process twin's scheduler.",
    build=lambda _section, ctx: TwinPlacement(ctx.get_twin()),
    acts_on_twin=True,
)
