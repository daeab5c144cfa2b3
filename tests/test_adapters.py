"""The adapter table: source and actuator kinds with their builders and sections, read by both
configuration validation and the assembly; a kind added to the table (in-process, or by an
installed package's entry point) is listed, validated and run like a built-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict, Field

from agent.act.executor import RecordingCapActuator
from agent.adapters import (
    ActuatorKind,
    BuildContext,
    DuplicateAdapterError,
    SourceKind,
    builtin_adapters,
)
from agent.assembly import assemble
from agent.config import parse_config
from agent.core.clock import FakeClock
from agent.core.errors import ConfigError
from agent.core.intents import Outcome, SetPowerCap
from agent.core.snapshot import Snapshot
from tests.conftest import make_snapshot

ROOT = Path(__file__).resolve().parent.parent


class QueueSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpus: int = Field(8, ge=1, le=64, description="GPUs in the fleet it makes up.")


class QueueSource:
    def __init__(self, gpus: int) -> None:
        self.gpus = gpus

    def observe(self, now_s: float) -> Snapshot:
        return make_snapshot([650.0] * self.gpus, time_s=now_s)


def _table():  # type: ignore[no-untyped-def]
    """The built-in kinds and two more: a source of made-up snapshots, and caps recorded."""
    table = builtin_adapters()
    table.add_source(
        SourceKind(
            name="queue",
            description="made-up snapshots",
            build=lambda section, ctx: QueueSource(section.gpus),
            Settings=QueueSettings,
            called="a queue",
        )
    )
    caps = RecordingCapActuator()
    table.add_actuator(
        ActuatorKind(name="recorded", role="caps", description="kept", build=lambda s, c: caps)
    )
    return table, caps


def test_a_new_kind_is_validated_and_built_through_the_same_table() -> None:
    table, caps = _table()
    config = parse_config(
        {
            "dry_run": False,
            "cluster": {"budget_w": 2000.0},
            "source": {"kind": "queue", "queue": {"gpus": 4}},
            "actuators": {"caps": "recorded", "placement": "none"},
            "policies": {"power_budget": {}},
        },
        adapters=table,
    )
    assert config.source.queue.gpus == 4  # type: ignore[attr-defined]
    # Its section is its own model's: errors name the key path.
    with pytest.raises(ConfigError, match=r"source\.queue\.gpus: Input should be less than"):
        parse_config({"source": {"kind": "queue", "queue": {"gpus": 99}}}, adapters=table)
    with pytest.raises(ConfigError, match=r"source\.queue\.gpu: unknown key"):
        parse_config({"source": {"queue": {"gpu": 1}}}, adapters=table)
    # Not the twin: the twin's actuators are refused with it, by name.
    with pytest.raises(ConfigError, match="'twin' acts on an in-process twin, which a queue"):
        parse_config({"source": {"kind": "queue"}, "actuators": {"caps": "twin"}}, adapters=table)
    agent = assemble(config, clock=FakeClock(100.0))
    try:
        assert isinstance(agent.loop.source, QueueSource) and agent.loop.source.gpus == 4
        report = agent.cycle()
        assert [a.outcome for a in report.actions] == [Outcome.APPLIED]
        assert caps.calls and caps.calls[0][0] == "set"
        assert isinstance(report.actions[0].intent, SetPowerCap)
    finally:
        agent.close()
    # A table without the kind refuses the file, naming the kinds it has.
    with pytest.raises(ConfigError, match=r"source\.kind: Input should be 'twin', 'prometheus'"):
        parse_config({"source": {"kind": "queue"}})


def test_a_kind_name_is_taken_once() -> None:
    table = builtin_adapters()
    again = SourceKind(name="prometheus", description="", build=lambda s, c: QueueSource(1))
    with pytest.raises(DuplicateAdapterError, match=r"source kind 'prometheus'.*already taken"):
        table.add_source(again)
    clash = ActuatorKind(
        name="slurm", role="caps", description="", build=lambda s, c: None, Settings=QueueSettings
    )
    with pytest.raises(DuplicateAdapterError, match="caps actuator kind 'slurm'"):
        table.add_actuator(clash)  # its section would be Slurm's
    reserved = ActuatorKind(name="lease_s", role="caps", description="", build=lambda s, c: None)
    with pytest.raises(DuplicateAdapterError, match="a reserved name"):
        table.add_actuator(reserved)


def test_a_builder_that_builds_the_wrong_thing_is_named() -> None:
    table = builtin_adapters()
    table.add_actuator(
        ActuatorKind(name="broken", role="placement", description="", build=lambda s, c: object())
    )
    config = parse_config({"actuators": {"placement": "broken"}}, adapters=table)
    with pytest.raises(
        ConfigError, match=r"kind 'broken' .* built object, not a PlacementActuator"
    ):
        assemble(config)


def test_the_context_builds_one_twin_for_every_twin_kind() -> None:
    config = parse_config({"twin": {"nodes": 1}})
    agent = assemble(config)
    try:
        twin = agent.twin
        assert twin is not None
        for edge in (agent.loop.source, agent.actuators.caps, agent.actuators.placement):
            assert getattr(edge, "twin", None) is twin
    finally:
        agent.close()
    ctx = BuildContext(cluster="c", clock=None)
    with pytest.raises(ConfigError, match="twin kind needs"):
        ctx.get_twin()


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package (examples/ooda-example-policy), installed apart from the agent."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(site),
            str(ROOT / "examples" / "ooda-example-policy"),
        ],
        check=True,
        timeout=180,
        capture_output=True,
    )
    return site


def _ooda(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_a_third_party_actuator_is_listed_validated_and_run(
    plugin_site: Path, tmp_path: Path
) -> None:
    listed = _ooda(plugin_site, "adapters", "--json")
    assert listed.returncode == 0, listed.stderr
    kinds = {
        (a["kind"], a["name"]): a for a in json.loads(listed.stdout.splitlines()[-1])["adapters"]
    }
    log_placement = kinds[("placement", "log_placement")]
    assert log_placement["origin"].startswith("entry point ooda_example_policy.actuators")
    assert log_placement["section"] == "actuators.log_placement"
    assert {s["name"] for s in log_placement["settings"]} == {"path", "reason_prefix"}

    log = tmp_path / "placement.jsonl"
    config = tmp_path / "agent.toml"
    base = (
        'dry_run = false\n[source]\nkind = "twin"\n[twin]\nnodes = 2\n'
        'faults = ["xid=79:node1/gpu0@0"]\n'
        '[policies.health_drain]\n[actuators]\nplacement = "log_placement"\n'
    )
    config.write_text(base)  # its section is needed: where to write
    checked = _ooda(plugin_site, "config", "check", str(config))
    assert checked.returncode == 2
    assert "placement = 'log_placement' needs an [actuators.log_placement] section" in (
        checked.stderr
    )
    config.write_text(base + f'[actuators.log_placement]\npaht = "{log}"\n')
    checked = _ooda(plugin_site, "config", "check", str(config))
    assert checked.returncode == 2 and "actuators.log_placement.paht: unknown key" in checked.stderr
    config.write_text(base + f'[actuators.log_placement]\npath = "{log}"\n')
    checked = _ooda(plugin_site, "config", "check", str(config), "--json")
    assert checked.returncode == 0, checked.stderr

    # It runs: one live cycle drains the node whose GPU fell off the bus, through the plug-in.
    ran = _ooda(plugin_site, "once", "--config", str(config), "--json")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout.splitlines()[-1])["actions"].get("applied", 0) >= 1
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["node"] for r in lines if r["action"] == "drain"] == ["node1"]
    assert all(r["cluster"] == "default" for r in lines)

    # Without the package, the same file names the kinds there are.
    missing = subprocess.run(
        [sys.executable, "-m", "agent.cli", "config", "check", str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert missing.returncode == 2
    assert "actuators.placement: Input should be 'twin', 'slurm', 'trace' or 'none'" in (
        missing.stderr
    )
    assert np.isfinite(lines[0]["time"])
