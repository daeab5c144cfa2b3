"""The adapter table's types: a source kind, an actuator kind, what a builder gets, the table."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from typing import Any, Literal

import structlog
from pydantic import BaseModel

from agent.core.clock import Clock
from agent.core.errors import ConfigError
from agent.core.protocols import CapActuator, Notifier, PlacementActuator, TelemetrySource
from agent.core.reads import Reads

log = structlog.get_logger("ooda.adapters")

SOURCES_GROUP = "ooda.sources"
ACTUATORS_GROUP = "ooda.actuators"
NONE = "none"  # an actuator role left out: its intents are refused as unconfigured
Role = Literal["caps", "placement", "notify"]
ROLES: tuple[Role, ...] = ("caps", "placement", "notify")
# Keys of [actuators] that are not sections; no kind may take their names.
_RESERVED = frozenset({"caps", "placement", "lease_s", NONE, "kind"})


@dataclass
class BuildContext:
    """What a builder may use besides its own section."""

    cluster: str  # the cluster's name
    clock: Clock | None  # the agent's clock, when it is given (else each adapter's own)
    wall: Clock | None = None  # wall time, for a source whose time follows it (a trace's)
    budget_query: str | None = None  # PromQL giving the budget (`cluster.budget_query`)
    group_label: str | None = None  # the per-group budgets' label (`cluster.group_label`)
    reads: Reads | None = None  # what the loop reads (None: every field, as a recording)
    twin_factory: Callable[[bool], Any] | None = None  # builds the twin (mirroring a scheduler)
    twin: Any = None  # the in-process twin, once built (agent.sim.twin.Twin)
    placement: PlacementActuator | None = None  # built before the source
    caps: CapActuator | None = None
    source_kind: SourceKind | None = None
    source: TelemetrySource | None = None  # as its kind built it (before any join)
    mirrored: bool = False  # the twin's jobs follow the placement system's
    # The scheduler's accounts' shares are read with its jobs (power_budget weighs by them).
    account_shares: bool = False
    closers: list[Callable[[], Any]] = field(default_factory=list)

    def get_twin(self, mirror: bool = False) -> Any:
        """The in-process twin: the one given, else built now (`mirror`: its jobs will be the
        placement system's, so it starts empty)."""
        if self.twin is None:
            if self.twin_factory is None:
                raise ConfigError("a twin kind needs the [twin] section's twin")
            self.twin = self.twin_factory(mirror)
        return self.twin


SourceBuilder = Callable[[Any, BuildContext], TelemetrySource]
ActuatorBuilder = Callable[[Any, BuildContext], "CapActuator | PlacementActuator | Notifier | None"]
SourceWrapper = Callable[[TelemetrySource, Any, Any, BuildContext], TelemetrySource]


@dataclass(frozen=True)
class SourceKind:
    """One kind of telemetry source."""

    name: str
    description: str
    build: SourceBuilder
    # Its section ([source.NAME]); None: it has none of its own.
    Settings: type[BaseModel] | None = None
    # Per-GPU labels its GPUs carry (beyond identity, job and priority); None: any label the
    # source is told to read (a relabelled Prometheus series carries a rack's name).
    labels: tuple[str, ...] | None = ()
    whose: str = ""  # "the twin's": whose GPUs, in messages
    called: str = ""  # "a Prometheus": the source, in messages
    observes_twin: bool = False  # it observes the in-process twin (the twin's actuators act on it)
    # The clock its time runs on (the twin's, a trace's), from the source built and its
    # section; None: it reads the present, in Unix time.
    clock: Callable[[TelemetrySource, BuildContext, Any], Clock] | None = None
    # Gaps in its cap limits may be filled from a cap actuator that knows them (the nodes).
    fills_limits: bool = False
    # Why `cluster.budget_query` (PromQL) cannot be used with it ("": it can).
    no_budget_query: str = ""
    # Whether it brings a budget of its own, from its section and the whole config (the twin's
    # `[twin] budget_w`, a trace's recorded one): True, False, or None if that shows only once
    # it runs. None here: it never does (the budget comes from `[cluster]`).
    own_budget: Callable[[Any, Any], bool | None] | None = None
    # "prometheus at URL": where it reads from, for people (`ooda once`); default: its name.
    describe: Callable[[Any, Sequence[str]], str] | None = None
    origin: str = "built-in"

    def where(self, section: Any, node_names: Sequence[str]) -> str:
        return self.describe(section, node_names) if self.describe is not None else self.name


@dataclass(frozen=True)
class ActuatorKind:
    """One kind of actuator, for one role: caps, placement, or notifications."""

    name: str
    role: Role
    description: str
    build: ActuatorBuilder
    Settings: type[BaseModel] | None = None  # its section ([actuators.NAME]); None: none
    needs_section: bool = False  # the section must be given (where the node daemons are)
    acts_on_twin: bool = False  # it acts on the in-process twin
    # Telemetry joined with what this actuator knows (the scheduler's jobs, the nodes' limits).
    wrap_source: SourceWrapper | None = None
    origin: str = "built-in"


class DuplicateAdapterError(ValueError):
    pass


class Adapters:
    """The table: source kinds by name, actuator kinds by role and name."""

    def __init__(self) -> None:
        self.sources: dict[str, SourceKind] = {}
        self.actuators: dict[Role, dict[str, ActuatorKind]] = {role: {} for role in ROLES}
        self._sections: dict[str, ActuatorKind] = {}
        self.version = 0  # changes with every kind added (what is built from the table follows)

    def add_source(self, kind: SourceKind) -> SourceKind:
        if not isinstance(kind, SourceKind):
            raise TypeError(f"{kind!r} is not a SourceKind")
        if kind.name in self.sources or kind.name in _RESERVED:
            was = self.sources.get(kind.name)
            where = f" (from {was.origin})" if was is not None else " (a reserved name)"
            raise DuplicateAdapterError(
                f"source kind {kind.name!r} from {kind.origin} is already taken{where}"
            )
        self.sources[kind.name] = kind
        self.version += 1
        return kind

    def add_actuator(self, kind: ActuatorKind) -> ActuatorKind:
        if not isinstance(kind, ActuatorKind):
            raise TypeError(f"{kind!r} is not an ActuatorKind")
        if kind.role not in ROLES:
            raise TypeError(f"actuator kind {kind.name!r}: unknown role {kind.role!r}")
        taken = self.actuators[kind.role].get(kind.name)
        section = self._sections.get(kind.name) if kind.Settings is not None else None
        if taken is not None or kind.name in _RESERVED or section is not None:
            was = taken or section
            where = f" (from {was.origin})" if was is not None else " (a reserved name)"
            raise DuplicateAdapterError(
                f"{kind.role} actuator kind {kind.name!r} from {kind.origin} is already "
                f"taken{where}"
            )
        if kind.role == "notify" and self.actuators["notify"]:
            raise DuplicateAdapterError(
                f"notify kind {kind.name!r} from {kind.origin}: the agent has one notifier "
                "([actuators.notify] chooses where it sends)"
            )
        self.actuators[kind.role][kind.name] = kind
        if kind.Settings is not None:
            self._sections[kind.name] = kind
        self.version += 1
        return kind

    def source(self, name: str) -> SourceKind:
        try:
            return self.sources[name]
        except KeyError:
            raise ConfigError(
                f"source.kind: unknown source kind {name!r} (known: {', '.join(self.sources)})"
            ) from None

    def actuator(self, role: Role, name: str) -> ActuatorKind | None:
        """The kind named for `role` (None: 'none', the role left out)."""
        if name == NONE:
            return None
        try:
            return self.actuators[role][name]
        except KeyError:
            known = ", ".join([*self.actuators[role], NONE])
            raise ConfigError(
                f"actuators.{role}: unknown {role} kind {name!r} (known: {known})"
            ) from None

    def sections(self) -> Iterator[ActuatorKind]:
        """The actuator kinds that own a section of [actuators]."""
        return iter(self._sections.values())

    def notifier(self) -> ActuatorKind | None:
        return next(iter(self.actuators["notify"].values()), None)

    def load_entry_points(self) -> None:
        """Add every kind installed under the entry-point groups. A broken plug-in is logged
        and skipped: one bad package must not stop the agent."""
        for group, add in ((SOURCES_GROUP, self.add_source), (ACTUATORS_GROUP, self.add_actuator)):
            for ep in entry_points(group=group):
                try:
                    loaded = ep.load()
                    kind = loaded() if callable(loaded) and not _is_kind(loaded) else loaded
                    add(_with_origin(kind, f"entry point {ep.value}"))
                except DuplicateAdapterError:
                    raise
                except Exception as exc:  # a plug-in's import error is its own
                    log.error("adapter_plugin_failed", entry_point=ep.name, error=str(exc))


def _is_kind(obj: object) -> bool:
    return isinstance(obj, SourceKind | ActuatorKind)


def _with_origin(kind: Any, origin: str) -> Any:
    if not _is_kind(kind):
        return kind  # refused by the table with its own message
    return replace(kind, origin=origin)
