"""The Policy protocol: a pure `decide(situation, memory, now_s) -> (intents, memory)`.

A policy holds no hidden state: whatever it must remember between cycles (hysteresis, hold timers)
is its `Memory`, a small typed model the loop keeps and the daemon persists. Its `Settings` model
carries bounds, units and descriptions; the configuration is validated from it and `ooda policies`
documents it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from agent.core.intents import Intent
from agent.core.situation import Situation


class PolicySettings(BaseModel):
    """Base of every policy's settings: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Run this policy.")
    dry_run: bool | None = Field(
        None, description="Advise only for this policy (None: follow the global dry_run)."
    )


class PolicyMemory(BaseModel):
    """Base of every policy's memory (JSON-serializable, so the daemon can persist it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


S = TypeVar("S", bound=PolicySettings)
M = TypeVar("M", bound=PolicyMemory)


@dataclass(frozen=True, slots=True)
class Decision(Generic[M]):
    intents: Sequence[Intent]
    memory: M


@runtime_checkable
class Policy(Protocol):
    """What the loop needs from a policy instance."""

    name: ClassVar[str]
    safety: ClassVar[bool]  # safety policies outrank efficiency ones in conflicts
    description: ClassVar[str]
    Settings: ClassVar[type[PolicySettings]]
    Memory: ClassVar[type[PolicyMemory]]

    @property
    def settings(self) -> PolicySettings: ...

    def decide(
        self, situation: Situation, memory: PolicyMemory, now_s: float
    ) -> Decision[PolicyMemory]: ...


class BasePolicy(Generic[S, M]):
    """Convenience base: stores typed settings; subclasses set the class attributes."""

    name: ClassVar[str]
    safety: ClassVar[bool] = False
    description: ClassVar[str] = ""
    Settings: ClassVar[type[PolicySettings]] = PolicySettings
    Memory: ClassVar[type[PolicyMemory]] = PolicyMemory

    def __init__(self, settings: S) -> None:
        self._settings = settings

    @property
    def settings(self) -> S:
        return self._settings
