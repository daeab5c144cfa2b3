"""GPU generations: every built-in model plays in the twin, under the oracle, by either name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.core.errors import BadInputError
from agent.core.gpu_models import BUILTIN_MODELS, NVML_POWER_PROFILES
from agent.sim.oracle import Oracle
from agent.sim.scenario import load_scenario
from agent.sim.twin import BudgetSchedule, Twin, TwinSpec


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_each_generation_runs_within_its_limits_under_a_budget(name: str) -> None:
    model = BUILTIN_MODELS[name]
    spec = TwinSpec(nodes=1, gpus_per_node=4, model=model, seed=3)
    budget = 0.8 * spec.expected_demand_w()
    twin = Twin(TwinSpec(**{**spec.__dict__, "budget": BudgetSchedule.constant(budget)}))
    twin.run_until(300.0, control=Oracle())
    assert np.all((twin.cap_w >= model.min_cap_w) & (twin.cap_w <= model.max_cap_w))
    assert np.all(twin.power_w <= model.max_cap_w * 1.05)
    idle = twin.job_row < 0
    if idle.any():
        assert np.all(twin.power_w[idle] < model.min_cap_w)
    assert set(model.power_profiles) <= set(NVML_POWER_PROFILES)


def test_a_scenario_takes_a_model_by_its_nvml_name(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text('[twin]\nmodel = "NVIDIA GB200"\n')
    assert load_scenario(scenario).model.name == "GB200"
    scenario.write_text('[twin]\nmodel = "MI300X"\n')
    with pytest.raises(BadInputError, match="unknown GPU model 'MI300X'"):
        load_scenario(scenario)
