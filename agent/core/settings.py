"""What every settings model (a config section) is: no unknown keys, immutable, strict types
(TOML has real booleans and numbers: `true` is never 1, `"false"` never a boolean) and no infinity
or NaN (no setting means "never" or "unknown" by one)."""

from __future__ import annotations

from pydantic import ConfigDict

STRICT_SETTINGS = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
