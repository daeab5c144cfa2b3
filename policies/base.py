"""The Policy protocol: a pure `decide(situation, memory, now_s) -> (intents, memory)`.

A policy holds no hidden state: whatever it must remember between cycles (hysteresis, hold timers)
is its `Memory`, a small typed model the loop keeps and the daemon persists. Its `Settings` model
carries bounds, units and descriptions; the configuration is validated from it and `ooda policies`
documents it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from agent.core.intents import Intent
from agent.core.reads import Reads
from agent.core.settings import STRICT_SETTINGS
from agent.core.situation import Situation


class PolicySettings(BaseModel):
    """Base of every policy's settings: unknown keys are errors, values are validated."""

    model_config = STRICT_SETTINGS

    enabled: bool = Field(True, description="Run this policy.")
    dry_run: bool | None = Field(
        None, description="Advise only for this policy (not set: follow the global dry_run)."
    )


class PolicyMemory(BaseModel):
    """Base of every policy's memory (JSON-serializable, so the daemon can persist it).

    A remembered time is a field named `*_s` (a number, or a dict or list of them, also inside
    nested models): `clock_went_back` relies on that."""

    # Memory, not settings: restored from saved JSON, so lax types (a list back to a tuple).
    model_config = ConfigDict(extra="forbid", frozen=True)

    def clock_went_back(self, now_s: float) -> Self:
        """A copy whose remembered times later than `now_s` are `now_s`: after the clock jumped
        back (NTP, a restored VM, a restart), a hold lasts its length from now, not until the
        clock catches up hours later."""
        out = _times_until(self, now_s, False)
        assert isinstance(out, type(self))
        return out


def _times_until(value: Any, now_s: float, is_time: bool) -> Any:
    """`value` with its times later than `now_s` pulled back: a time is a number held by a field
    named `*_s` (directly, or in a dict, list or tuple there); only field names count, never a
    dict's keys (a node may be called anything)."""
    if isinstance(value, BaseModel):
        return value.model_copy(
            update={
                name: _times_until(getattr(value, name), now_s, name.endswith("_s"))
                for name in type(value).model_fields
            }
        )
    if isinstance(value, dict):
        return {k: _times_until(v, now_s, is_time) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_times_until(v, now_s, is_time) for v in value)
    if is_time and isinstance(value, int | float) and not isinstance(value, bool):
        return min(value, now_s)
    return value


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
    # The telemetry fields it reads of the snapshot itself (beyond what orient made of them),
    # and how fresh: the loop queries what its policies and orient read, and nothing else.
    reads: ClassVar[Reads]

    @property
    def settings(self) -> PolicySettings: ...

    def decide(
        self, situation: Situation, memory: PolicyMemory, now_s: float
    ) -> Decision[PolicyMemory]: ...


class BasePolicy(Generic[S, M]):
    """Convenience base: stores typed settings; subclasses set the class attributes."""

    name: ClassVar[str]
    safety: ClassVar[bool] = False
    # It holds the fleet to its budget, re-planning caps from the draw it sees every cycle
    # (replay's intervals count on such a policy correcting what the model got wrong).
    holds_budget: ClassVar[bool] = False
    description: ClassVar[str] = ""
    Settings: ClassVar[type[PolicySettings]] = PolicySettings
    Memory: ClassVar[type[PolicyMemory]] = PolicyMemory
    reads: ClassVar[Reads] = Reads()  # only what orient made of the telemetry

    def __init__(self, settings: S) -> None:
        self._settings = settings

    @property
    def settings(self) -> S:
        return self._settings
