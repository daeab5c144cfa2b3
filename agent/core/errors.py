"""The domain's exception hierarchy: vendor and library errors are mapped to these at the edges."""

from __future__ import annotations

from collections.abc import Sequence


class OodaError(Exception):
    """Base of every error the agent raises on purpose."""

    def lines(self) -> list[str]:
        """What a person reads, one problem a line (the `ooda` command prints each)."""
        return [" ".join(str(self).split())]


class BadInputError(OodaError):
    """Input from a person or a file is wrong; the message names the input and the problem."""


class ConfigError(BadInputError):
    """A configuration value is invalid: the message names the key path.

    `ConfigError.listing(where, problems)` holds every problem of a file at once: its message
    joins them (for a log line), `lines()` gives one a line, each naming `where` (the file)."""

    def __init__(self, message: str, problems: Sequence[str] = (), where: str = "") -> None:
        super().__init__(message)
        self.problems = tuple(problems)
        self.where = where

    @classmethod
    def listing(cls, where: str, problems: Sequence[str]) -> ConfigError:
        return cls(f"{where}: " + "; ".join(problems), problems, where)

    def lines(self) -> list[str]:
        if not self.problems:
            return super().lines()
        return [" ".join(f"{self.where}: {p}".split()) for p in self.problems]


class TraceError(BadInputError):
    """A trace file is unreadable, truncated or corrupted: the message names the place."""


class TelemetryError(OodaError):
    """A telemetry source could not be read (unreachable, timed out, malformed answer)."""


class ActuatorError(OodaError):
    """An actuator could not apply an action."""


class GpuError(OodaError):
    """A GPU operation failed (mapped from NVML or the node daemon)."""


class GpuLostError(GpuError):
    """The GPU is gone (fell off the bus, driver reset)."""


class GpuNotSupportedError(GpuError):
    """The GPU or driver does not support the operation."""


class GpuNoPermissionError(GpuError):
    """The caller lacks the privilege (root or CAP_SYS_ADMIN) for the operation."""


class GpuInvalidArgumentError(GpuError):
    """The request is outside what the GPU accepts (e.g. a cap outside its constraints)."""
