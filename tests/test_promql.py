"""PromQL built from label values must never change shape: quoting and regex escaping, fuzzed."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.observe import promql

# Go's strconv.Unquote (what PromQL uses) accepts what json.dumps(ensure_ascii=False) writes;
# json.loads is the faithful inverse for those strings.
texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)),  # no lone surrogates: not UTF-8
    max_size=40,
)


@given(texts)
@settings(max_examples=300, deadline=None)
def test_quote_round_trips_and_stays_one_token(value: str) -> None:
    quoted = promql.quote(value)
    assert json.loads(quoted) == value
    assert quoted.startswith('"') and quoted.endswith('"')
    inner = quoted[1:-1]
    # No unescaped quote inside: the string cannot end early and let text become PromQL.
    assert re.search(r'(?<!\\)(?:\\\\)*"', inner) is None
    assert "\n" not in quoted


@given(st.lists(texts, min_size=1, max_size=5), texts)
@settings(max_examples=300, deadline=None)
def test_any_of_matches_exactly_the_values(values: list[str], other: str) -> None:
    regex = promql.any_of(values)
    # RE2 and Python agree on these escapes (backslash before a metacharacter).
    pattern = re.compile(f"(?:{regex})", re.DOTALL)
    for value in values:
        assert pattern.fullmatch(value)
    assert bool(pattern.fullmatch(other)) == (other in values)


@pytest.mark.parametrize(
    "host",
    ['node1"}) or vector(1) #', "a|b", ".*", "node\\1", "x{1}", "(node)", "nø/dë 1", "\n\t"],
)
def test_hostile_host_names_stay_inside_one_matcher(host: str) -> None:
    expr = promql.selector("DCGM_FI_DEV_POWER_USAGE", {}, {"Hostname": promql.any_of([host])})
    assert expr.startswith('DCGM_FI_DEV_POWER_USAGE{Hostname=~"')
    assert expr.endswith('"}')
    value = json.loads(expr[len("DCGM_FI_DEV_POWER_USAGE{Hostname=~") : -1])
    assert re.fullmatch(value, host, re.DOTALL)
    assert not re.fullmatch(value, host + "x", re.DOTALL)


def test_names_are_checked() -> None:
    with pytest.raises(ValueError, match="metric name"):
        promql.selector('up{a="b"} or vector(1)', {})
    with pytest.raises(ValueError, match="label name"):
        promql.matchers({'a="b",c': "x"})
    with pytest.raises(ValueError, match="label name"):
        promql.check_label_name("__name__")
    assert promql.selector("up", {}) == "up"
    assert promql.selector("up", {"job": "a"}) == 'up{job="a"}'
    assert promql.name_selector(["b", "a"], {"job": "x"}) == '{__name__=~"a|b",job="x"}'


def test_durations() -> None:
    assert promql.duration(600) == "600s"
    assert promql.duration(1.5) == "1500ms"
    assert promql.duration(0.0001) == "1ms"
