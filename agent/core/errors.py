"""The domain's exception hierarchy: vendor and library errors are mapped to these at the edges."""

from __future__ import annotations


class OodaError(Exception):
    """Base of every error the agent raises on purpose."""


class BadInputError(OodaError):
    """Input from a person or a file is wrong; the message names the input and the problem."""


class ConfigError(BadInputError):
    """A configuration value is invalid: the message names the key path."""


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
