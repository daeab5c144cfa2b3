from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from agent.assembly import assemble
from agent.config import parse_config
from agent.core.errors import BadInputError, GpuInvalidArgumentError, GpuLostError
from agent.core.protocols import GpuBackend, GpuDevice
from agent.sim.devices import TwinNodeBackend
from agent.sim.faults import FaultKind, parse_fault
from agent.sim.scenario import load_scenario
from agent.sim.twin import Twin, TwinSpec


def test_scenario_file(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        """
[twin]
nodes = 3
model = "A100"
seed = 9
[budget]
steps = [[0, 9000], [600, 6000]]
[[faults]]
spec = "xid=79:node2/gpu1@60+120"
[[faults]]
kind = "fan"
target = "node1/gpu0"
start_s = 30
param = 1.8
"""
    )
    spec = load_scenario(path)
    assert spec.nodes == 3 and spec.model.name == "A100" and spec.seed == 9
    assert spec.budget is not None and spec.budget.at(700) == 6000
    assert [f.kind for f in spec.faults] == [FaultKind.XID, FaultKind.FAN]
    assert spec.faults[1].param == 1.8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[twin]\nnodez = 3", "twin.nodez: unknown key"),
        ("[weather]\nrain = 1", "unknown section 'weather'"),
        ("[[faults]]\nkind = 'fan'", "faults[0].target: required key is missing"),
        ("[twin]\nnodes = 2\n[[faults]]\nspec = 'xid:node5@1'", "the twin has only 2 nodes"),
        ("[budget]\nsteps = [[5, 100]]", "starts at t=0"),
    ],
)
def test_bad_scenarios_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(BadInputError, match=re.escape(message)) as exc:
        load_scenario(path)
    assert str(path) in str(exc.value)


def test_twin_gpus_behind_the_device_protocol() -> None:
    twin = Twin(
        TwinSpec(nodes=2, gpus_per_node=2, seed=0, faults=(parse_fault("xid=79:node2/gpu1@0"),))
    )
    backend = TwinNodeBackend(twin, 1)
    assert isinstance(backend, GpuBackend)
    gpu = backend.devices()[1]
    assert isinstance(gpu, GpuDevice)
    assert (gpu.index, gpu.uuid) == (1, twin.uuid[1])
    c = gpu.power_constraints()
    assert (c.min_w, c.max_w, c.default_w) == (200.0, 700.0, 700.0)
    gpu.set_power_limit_w(450.0)
    assert gpu.power_limit_w() == 450.0 and twin.cap_w[1] == 450.0
    with pytest.raises(GpuInvalidArgumentError):
        gpu.set_power_limit_w(100.0)
    lost = TwinNodeBackend(twin, 2).devices()[1]
    with pytest.raises(GpuLostError):
        lost.power_usage_w()


def test_runtime_from_default_config_runs_a_cycle() -> None:
    config = parse_config({"twin": {"nodes": 2, "budget_w": 5000}, "dry_run": True})
    runtime = assemble(config)
    try:
        report = runtime.loop.cycle()
        assert report.snapshot.n_gpus == 16
        assert report.situation.budget_w == 5000
        assert runtime.twin is not None and np.all(runtime.twin.cap_w == 700.0)  # dry-run
    finally:
        runtime.close()
