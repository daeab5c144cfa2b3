"""The fields the loop queries follow from what orient and the enabled policies declare they
read (agent.core.reads), not from a hand-kept list."""

from __future__ import annotations

from typing import ClassVar

from agent.adapters.prometheus import read_plan
from agent.assembly import assemble, build_policies, loop_reads
from agent.config import parse_config
from agent.core.reads import Reads
from agent.core.situation import Situation
from agent.core.snapshot import Metric
from agent.observe.prometheus import PrometheusSource
from agent.orient.reads import ORIENT_READS
from policies.base import BasePolicy, Decision, PolicyMemory, PolicySettings
from policies.registry import builtin_registry

M = Metric
SLOW = {
    M.MEM_UTIL_PCT: 60.0,
    M.ECC_DBE_TOTAL: 60.0,
    M.REMAPPED_ROWS_UNCORRECTABLE: 60.0,
    M.ROW_REMAP_FAILURE: 60.0,
}


def test_reads_merge_to_the_most_demanding_reader() -> None:
    slow = Reads({M.MEM_UTIL_PCT: 60.0}, stand_ins={M.ENFORCED_LIMIT_W: M.POWER_LIMIT_W})
    fast = Reads({M.MEM_UTIL_PCT: 0.0, M.POWER_W: 0.0})
    both = slow | fast
    assert both.fields == {M.MEM_UTIL_PCT: 0.0, M.POWER_W: 0.0} and both.slow() == {}
    assert both.stand_ins == {M.ENFORCED_LIMIT_W: M.POWER_LIMIT_W}
    # Read for itself by someone, a stand-in is a field like any other.
    own = both | Reads.every_cycle(M.ENFORCED_LIMIT_W)
    assert own.stand_ins == {} and own.fields[M.ENFORCED_LIMIT_W] == 0.0


def test_the_default_policies_read_what_the_hand_kept_tables_said() -> None:
    """What runtime.py's LOOP_UNUSED, LOOP_FALLBACKS and LOOP_SLOW_FIELDS kept by hand (771d867)
    now follows from the declarations; the clocks-event reasons, which no model or policy read,
    are left out too (one query less a cycle)."""
    registry = builtin_registry()
    config = parse_config({}, registry)
    reads = loop_reads(build_policies(config.policy_settings, registry))
    unread, stand_ins, slow = read_plan(reads)
    assert unread == {M.ENERGY_J, M.CLOCKS_EVENT_REASONS}
    assert stand_ins == {M.ENFORCED_LIMIT_W: M.POWER_LIMIT_W}
    assert slow == SLOW
    assert loop_reads([]) == ORIENT_READS  # the policies read nothing orient does not


class Meter(BasePolicy[PolicySettings, PolicyMemory]):
    """A policy that reads the energy counter and memory utilization every cycle."""

    name: ClassVar[str] = "meter"
    reads: ClassVar[Reads] = Reads.every_cycle(M.ENERGY_J, M.MEM_UTIL_PCT)

    def decide(
        self, situation: Situation, memory: PolicyMemory, now_s: float
    ) -> Decision[PolicyMemory]:
        return Decision([], memory)


def test_a_policy_that_reads_more_makes_the_loop_read_it() -> None:
    registry = builtin_registry()
    registry.register(Meter)
    config = parse_config(
        {"source": {"kind": "prometheus"}, "policies": {"power_budget": {}, "meter": {}}},
        registry,
    )
    agent = assemble(config, registry=registry)
    try:
        source = agent.loop.source
        assert isinstance(source, PrometheusSource)
        assert M.ENERGY_J in source.value_metrics.values()
        assert M.CLOCKS_EVENT_REASONS not in source.value_metrics.values()
        assert source.slow_fields == {k: v for k, v in SLOW.items() if k != M.MEM_UTIL_PCT}
    finally:
        agent.close()
