"""How Slurm's failures become ActuatorErrors, with stand-in Slurm binaries in `bin_dir` (the
real ones answer these ways too, some only after ~9 s: see tests/integration/test_slurm.py for the
real cluster). Plus the config and runtime wiring of the Slurm and notify sections."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agent.act.slurm import SlurmCli, SlurmPlacement, SlurmSettings
from agent.assembly import assemble
from agent.config import parse_config
from agent.core.errors import ActuatorError, ConfigError

# What 22.05's `sinfo --json` prints, exit status 0, when slurmctld is down (seen for real).
CTLD_DOWN_JSON = json.dumps(
    {
        "meta": {"plugin": {"type": "openapi/v0.0.38"}},
        "errors": [{"error": "Unspecified error", "errno": -1}],
        "nodes": [],
    }
)
NODE = {
    "name": "node1",
    "state": "idle",
    "state_flags": [],
    "reason": "",
    "weight": 1,
    "features": "h100,ib",
    "active_features": "h100,ib",
}


def fake_bin(tmp_path: Path, **scripts: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
    return bin_dir


def test_nonzero_exit_names_the_command_and_quotes_slurm(tmp_path: Path) -> None:
    bin_dir = fake_bin(
        tmp_path,
        scontrol="echo 'slurm_update error: Invalid node name specified' >&2; exit 1",
    )
    cli = SlurmCli(bin_dir=bin_dir)
    with pytest.raises(
        ActuatorError,
        match=r"`scontrol update nodename=nodeX state=drain` failed \(rc 1\): "
        r"slurm_update error: Invalid node name specified",
    ):
        cli.run("scontrol", "update", "nodename=nodeX", "state=drain")


def test_controller_unreachable_messages(tmp_path: Path) -> None:
    bin_dir = fake_bin(
        tmp_path,
        scontrol="echo 'slurm_update error: Unable to contact slurm controller (connect failure)'"
        " >&2; exit 1",
        sinfo=f"echo '{CTLD_DOWN_JSON}'",
    )
    conf = tmp_path / "slurm.conf"
    cli = SlurmCli(slurm_conf=conf, bin_dir=bin_dir)
    with pytest.raises(ActuatorError, match=r"is not answering: is it running\?"):
        cli.run("scontrol", "update", "nodename=node1", "state=resume")
    with pytest.raises(
        ActuatorError,
        match=rf"`sinfo --json`: Slurm reported: Unspecified error \(is the slurmctld of {conf}",
    ):
        SlurmPlacement(SlurmSettings(bin_dir=bin_dir), cli=cli).node_states(["node1"])


def test_timeout_kills_the_command_and_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    bin_dir = fake_bin(tmp_path, squeue=f"sleep 30 & echo $! > {pid_file}; wait")
    placement = SlurmPlacement(SlurmSettings(bin_dir=bin_dir, timeout_s=0.3))
    t0 = time.monotonic()
    with pytest.raises(ActuatorError, match=r"`squeue --json` timed out after 0.3 s"):
        placement.jobs()
    assert time.monotonic() - t0 < 2.0
    child = int(pid_file.read_text())
    time.sleep(0.1)
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().rsplit(") ", 1)[1][0] == "Z"  # gone (or a zombie)


def test_missing_binary_and_bad_json(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, sinfo="echo '{not json'")
    placement = SlurmPlacement(SlurmSettings(bin_dir=bin_dir))
    with pytest.raises(ActuatorError, match=r"`sinfo --json`: not valid JSON"):
        placement.nodes()
    with pytest.raises(ActuatorError, match=rf"cannot run squeue in {bin_dir}"):
        placement.jobs()


def test_node_names_are_checked_before_anything_runs(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, sinfo=f"echo '{json.dumps({'nodes': [NODE]})}'")
    placement = SlurmPlacement(SlurmSettings(bin_dir=bin_dir))
    for bad in ("node1,node2", "node[1-2]", "", "-x"):
        with pytest.raises(ActuatorError, match="is not a single node name"):
            placement.drain(bad, "x")
    with pytest.raises(ActuatorError, match="no node named 'node7'"):
        placement.drain("node7", "x")
    with pytest.raises(ActuatorError, match=r"weight -1 for node1 outside"):
        placement.set_weight("node1", -1)
    assert placement.cli.calls == 1  # only the one read of node7's cluster


def test_config_sections_and_runtime_wiring(tmp_path: Path) -> None:
    config = parse_config(
        {
            "actuators": {
                "placement": "slurm",
                "slurm": {
                    "slurm_conf": str(tmp_path / "missing.conf"),
                    "priority_by_qos": {"high": 2},
                },
                "notify": {"kind": "webhook", "url": "http://127.0.0.1:1/hook"},
            }
        }
    )
    assert config.actuators.slurm.priority_by_qos == {"high": 2}
    with pytest.raises(ConfigError, match=r"actuators.slurm.slurm_conf: no such file"):
        assemble(config)
    with pytest.raises(ConfigError, match=r"actuators.notify: url: required when kind"):
        parse_config({"actuators": {"notify": {"kind": "alertmanager"}}})
    with pytest.raises(ConfigError, match=r"actuators.slurm.timeout_s: Input should be greater"):
        parse_config({"actuators": {"slurm": {"timeout_s": 0}}})
    with pytest.raises(ConfigError, match=r"actuators.placement: Input should be"):
        parse_config({"actuators": {"placement": "kubernetes"}})

    bin_dir = fake_bin(tmp_path, scontrol="exit 0", sinfo="exit 0")
    config = parse_config({"actuators": {"placement": "slurm", "slurm": {"bin_dir": str(bin_dir)}}})
    with pytest.raises(ConfigError, match=r"actuators.slurm.bin_dir: squeue not found in"):
        assemble(config)


@pytest.mark.parametrize(
    ("available", "active", "add", "remove", "written"),
    [
        # node_features plugins: knl_snc2 is available, not active; adding ours activates none
        # of the site's.
        (
            "h100,knl_quad,knl_snc2",
            "h100,knl_quad",
            {"hot"},
            set(),
            (
                "AvailableFeatures=h100,knl_quad,knl_snc2,ooda_hot",
                "ActiveFeatures=h100,knl_quad,ooda_hot",
            ),
        ),
        (
            "h100,knl_snc2,ooda_hot",
            "h100,ooda_hot",
            set(),
            {"hot"},
            ("AvailableFeatures=h100,knl_snc2", "ActiveFeatures=h100"),
        ),
        ("h100,ooda_hot", "h100,ooda_hot", {"hot"}, set(), None),  # in place: nothing written
    ],
)
def test_our_features_leave_the_sites_active_set_alone(
    tmp_path: Path,
    available: str,
    active: str,
    add: set[str],
    remove: set[str],
    written: tuple[str, str] | None,
) -> None:
    node = NODE | {"features": available, "active_features": active}
    log = tmp_path / "scontrol.log"
    bin_dir = fake_bin(
        tmp_path,
        sinfo=f"echo '{json.dumps({'nodes': [node]})}'",
        scontrol=f'echo "$@" >> {log}',
    )
    placement = SlurmPlacement(SlurmSettings(bin_dir=bin_dir))
    placement.set_features("node1", frozenset(add), frozenset(remove))
    if written is None:
        assert not log.exists()
    else:
        assert log.read_text().split() == ["update", "nodename=node1", *written]
