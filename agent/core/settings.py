"""What every settings model (a config section) is: no unknown keys, strict types (TOML has real
booleans and numbers: `true` is never 1, `"false"` never a boolean, an int still reads as a
float) and no infinity or NaN (no setting means "never" or "unknown" by one). Paths and enum keys
are converted where a field says so (`strict=False`).

Two things a field may add: `IntKey`, a map's key that is a whole number (TOML's keys are always
text: `priority_weights = { 0 = 1.0 }` has the key "0"), and `file_field`, a path the
configuration names (a token, a TLS key, a trace) that `ooda config check` and every load check
exists, is readable and, for a secret, is not writable by others (agent/config.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, ValidationError

# The config file's own sections (agent.config): the root is completed after parsing.
STRICT_SECTION = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
# Every other settings model (guard, policies, orient, actuators...): immutable as well.
STRICT_SETTINGS = ConfigDict(**STRICT_SECTION, frozen=True)

_WHOLE = re.compile(r"[+-]?[0-9]{1,18}")


def _int_key(value: Any) -> Any:
    """A key of TOML text that spells a whole number, as that number (other values as given,
    for the strict int check to refuse)."""
    if isinstance(value, str):
        if not _WHOLE.fullmatch(value.strip()):
            raise ValueError(f"must be a whole number, like 0 or 2 (got {value!r})")
        return int(value)
    return value


# A map's key that is a whole number: `dict[IntKey, float]`.
IntKey = Annotated[int, BeforeValidator(_int_key)]

# What a path field names (the checks it gets): a file to read, a secret (a token, a private
# key: also not writable by its group or others), or a directory.
FileKind = Literal["file", "secret", "directory"]
FILE_KIND = "ooda_file"  # the key in a field's json_schema_extra


def file_field(kind: FileKind) -> dict[str, Any]:
    """`json_schema_extra` of a path field the configuration's file checks read:
    `Field(None, strict=False, json_schema_extra=file_field("secret"))`."""
    return {FILE_KIND: kind}


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def key_path(loc: tuple[int | str, ...]) -> str:
    """A TOML key path; a key that is not bare is quoted (a newline in a key stays on one line)."""
    return ".".join(
        str(part) if _BARE_KEY.fullmatch(str(part)) else json.dumps(str(part)) for part in loc
    )


def _message(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    value = err.get("input")
    if (
        kind not in ("model_type", "dict_type")
        and not isinstance(value, dict)
        and "(got " not in msg
    ):
        msg += f" (got {value!r})"
    return msg


def error_lines(exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[str]:
    """A settings model's validation errors, one a line: `key.path: problem (got value)`."""
    out = []
    for e in exc.errors():
        loc = prefix + tuple(e["loc"])
        what = _message(e)
        if loc and loc[-1] == "[key]":  # pydantic's mark of a map's key: the key is the fault
            loc, what = loc[:-1], f"key {what}"
        out.append(f"{key_path(loc)}: {what}" if loc else what)
    return out
