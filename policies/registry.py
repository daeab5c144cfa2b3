"""One explicit registry of policies; third parties add theirs through the entry-point group
`ooda.policies` (each entry point names a policy class)."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any

import structlog

from agent.core.errors import ConfigError
from policies.curve_exploration import CurveExploration
from policies.energy_efficiency import EnergyEfficiency
from policies.health_drain import HealthDrain
from policies.idle_powerdown import IdlePowerdown
from policies.placement import Placement
from policies.power_budget import PowerBudget
from policies.thermal_guard import ThermalGuard

ENTRY_POINT_GROUP = "ooda.policies"

log = structlog.get_logger("ooda.policies")


class DuplicatePolicyError(ValueError):
    pass


class PolicyRegistry:
    """Name -> policy class. Refuses a second policy under a name already taken."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Any]] = {}
        self._origin: dict[str, str] = {}

    def register(self, cls: type[Any], origin: str = "built-in") -> type[Any]:
        for attr in ("name", "Settings", "Memory", "decide"):
            if not hasattr(cls, attr):
                raise TypeError(f"{cls!r} is not a policy: it lacks {attr!r}")
        name = cls.name
        if name in self._classes:
            raise DuplicatePolicyError(
                f"policy {name!r} from {origin} is already registered (from {self._origin[name]})"
            )
        self._classes[name] = cls
        self._origin[name] = origin
        return cls

    def get(self, name: str) -> type[Any]:
        try:
            return self._classes[name]
        except KeyError:
            raise ConfigError(
                f"unknown policy {name!r} (known: {', '.join(self.names())})"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._classes)

    def origin(self, name: str) -> str:
        return self._origin[name]

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Register every policy installed under the entry-point group. A broken plug-in is
        logged and skipped: one bad package must not stop the agent."""
        for ep in entry_points(group=group):
            try:
                cls = ep.load()
            except Exception as exc:  # a plug-in's import error is its own
                log.error("policy_plugin_failed", entry_point=ep.name, error=str(exc))
                continue
            self.register(cls, origin=f"entry point {ep.value}")


def builtin_registry() -> PolicyRegistry:
    """A fresh registry with the built-in policies (explicitly listed)."""
    registry = PolicyRegistry()
    for cls in (
        PowerBudget,
        ThermalGuard,
        HealthDrain,
        EnergyEfficiency,
        IdlePowerdown,
        Placement,
        CurveExploration,
    ):
        registry.register(cls)
    return registry


def default_registry() -> PolicyRegistry:
    registry = builtin_registry()
    registry.load_entry_points()
    return registry
