"""A TOML file anyone may hand in (a configuration, a schedule), read within bounds: at most
`max_bytes` read (never more), UTF-8 (a byte order mark allowed), nesting deep enough to
exhaust the parser's stack refused. Every problem is one error naming the file."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from agent.core.errors import BadInputError

MAX_TOML_BYTES = 1 << 20


def read_toml(
    path: Path,
    what: str,
    *,
    max_bytes: int = MAX_TOML_BYTES,
    error: type[BadInputError] = BadInputError,
) -> dict[str, Any]:
    """The file's table; `error` (naming `what` and the path, e.g. "config /etc/ooda.toml")
    when it cannot be read, is larger than `max_bytes`, is not UTF-8 or not valid TOML."""
    where = f"{what} {path}"
    try:
        with path.open("rb") as handle:
            raw = handle.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{where}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise error(f"{where}: larger than {max_bytes} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise error(f"{where}: line {line}: not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{where}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise error(f"{where}: not valid TOML: nested too deeply") from None
