"""What every settings model (a config section) is: no unknown keys, strict types (TOML has real
booleans and numbers: `true` is never 1, `"false"` never a boolean, an int still reads as a
float) and no infinity or NaN (no setting means "never" or "unknown" by one). Paths and enum keys
are converted where a field says so (`strict=False`)."""

from __future__ import annotations

from pydantic import ConfigDict

# The config file's own sections (agent.config): the root is completed after parsing.
STRICT_SECTION = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
# Every other settings model (guard, policies, orient, actuators...): immutable as well.
STRICT_SETTINGS = ConfigDict(**STRICT_SECTION, frozen=True)
