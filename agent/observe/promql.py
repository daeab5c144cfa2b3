"""Building PromQL safely. Names are checked against Prometheus's grammar; values taken from data
(host names, job ids) are quoted and, inside regex matchers, escaped, so no label value can change
the shape of a query."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence

METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

# RE2's metacharacters: everything else is a literal inside a regex.
_RE2_META = frozenset("\\.+*?()|[]{}^$")


def check_metric_name(name: str) -> str:
    if not METRIC_NAME.match(name):
        raise ValueError(f"not a Prometheus metric name: {name!r}")
    return name


def check_label_name(name: str) -> str:
    if not LABEL_NAME.match(name) or name.startswith("__"):
        raise ValueError(f"not a Prometheus label name: {name!r}")
    return name


def quote(value: str) -> str:
    """A PromQL double-quoted string literal holding exactly `value`.

    PromQL unquotes strings like Go: JSON's escapes (\\", \\\\, \\n, \\uXXXX for control
    characters) are all valid there; other characters go through as UTF-8 (a surrogate escape, which
    Go rejects, is never produced)."""
    return json.dumps(value, ensure_ascii=False)


def regex_escape(value: str) -> str:
    """`value` as an RE2 regex matching exactly itself."""
    return "".join("\\" + c if c in _RE2_META else c for c in value)


def any_of(values: Iterable[str]) -> str:
    """An RE2 regex matching exactly one of `values` (Prometheus anchors matchers itself)."""
    return "|".join(regex_escape(v) for v in sorted(set(values)))


def matchers(exact: Mapping[str, str], regex: Mapping[str, str] | None = None) -> str:
    """`{a="x",b=~"y|z"}` (empty braces when there is nothing to match)."""
    parts = [f"{check_label_name(k)}={quote(v)}" for k, v in sorted(exact.items())]
    parts += [f"{check_label_name(k)}=~{quote(v)}" for k, v in sorted((regex or {}).items())]
    return "{" + ",".join(parts) + "}"


def selector(metric: str, exact: Mapping[str, str], regex: Mapping[str, str] | None = None) -> str:
    inner = matchers(exact, regex)
    return check_metric_name(metric) + (inner if inner != "{}" else "")


def name_selector(metrics: Sequence[str], exact: Mapping[str, str]) -> str:
    """Several metrics in one selector: `{__name__=~"a|b",...}`."""
    names = [check_metric_name(m) for m in metrics]
    inner = matchers(exact)[1:-1]
    name_matcher = f"__name__=~{quote('|'.join(sorted(set(names))))}"
    return "{" + name_matcher + (f",{inner}" if inner else "") + "}"


def by(labels: Sequence[str]) -> str:
    return "by (" + ", ".join(labels) + ")"


def duration(seconds: float) -> str:
    """A PromQL duration: whole milliseconds."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"
