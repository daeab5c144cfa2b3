"""deploy/: the systemd units (parsed, hardening asserted, systemd's own checks), the Prometheus
rules (promtool), the Grafana dashboard (every metric it queries is exported), the example
configs, and the container's install step run for real in a clean virtual environment."""

from __future__ import annotations

import configparser
import fnmatch
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client import generate_latest

from agent.config import MAX_STOP_GRACE_S, load_config
from agent.core.clock import FakeClock
from agent.core.errors import ConfigError
from agent.core.situation import PowerForecast
from tests.daemon_helpers import (
    REPO,
    START_UNIX,
    HealthFromXid,
    in_process,
    serve_tokens,
    twin_config,
    write,
)

DEPLOY = REPO / "deploy"
UNITS = DEPLOY / "systemd"
RULES = DEPLOY / "prometheus" / "ooda-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "ooda-agent-dashboard.json"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> every value (systemd keys repeat; configparser's strict
    mode would refuse that, so duplicates are collected by a dict that appends)."""

    class MultiDict(dict):  # type: ignore[type-arg]
        def __setitem__(self, key: str, value: object) -> None:
            if isinstance(value, list) and key in self:
                self[key].extend(value)
            else:
                super().__setitem__(key, value)

    parser = configparser.RawConfigParser(
        dict_type=MultiDict, strict=False, empty_lines_in_values=False, comment_prefixes=("#",)
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    out: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for section in parser.sections():
        for key, value in parser._sections[section].items():  # type: ignore[attr-defined]
            # Repeated keys arrive joined by newlines, like continued lines ("\\" at the end).
            values: list[str] = []
            for line in value.split("\n"):
                if values and values[-1].endswith("\\"):
                    values[-1] = values[-1][:-1].rstrip() + " " + line.strip()
                else:
                    values.append(line.strip())
            out[section][key] = values
    return out


def one(unit: dict[str, dict[str, list[str]]], key: str, section: str = "Service") -> str:
    values = unit[section].get(key, [])
    assert values, f"{key} missing"
    return values[-1]


# What every unprivileged service unit sets to "yes" (the site's adds PrivateUsers).
HARDENED = [
    "NoNewPrivileges",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectControlGroups",
    "RestrictSUIDSGID",
    "LockPersonality",
]


def assert_unprivileged_notify_service(unit: dict[str, dict[str, list[str]]]) -> None:
    """What the agent's and the site's units share: systemd notify with a watchdog, reloaded by
    SIGHUP, run as `ooda` with no capabilities, hardened, stopped by SIGTERM."""
    assert one(unit, "Type") == "notify" and one(unit, "NotifyAccess") == "main"
    assert one(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, "User") == "ooda" and one(unit, "Group") == "ooda"
    assert one(unit, "CapabilityBoundingSet") == "" and one(unit, "AmbientCapabilities") == ""
    for key in HARDENED:
        assert one(unit, key) == "yes", key
    assert one(unit, "ProtectSystem") == "strict"
    assert int(one(unit, "WatchdogSec")) > 0
    assert one(unit, "KillSignal") == "SIGTERM" and one(unit, "Restart") == "on-failure"
    assert one(unit, "UMask") == "0077"


def test_agent_unit_is_unprivileged_and_hardened() -> None:
    unit = parse_unit(UNITS / "ooda-agent.service")
    assert_unprivileged_notify_service(unit)
    assert re.search(r"^/opt/ooda/bin/ooda run --config \S+", one(unit, "ExecStart"))
    assert one(unit, "StateDirectory") == "ooda"
    assert "/var/lib/ooda" in one(unit, "ReadWritePaths").split()
    assert "AF_PACKET" not in one(unit, "RestrictAddressFamilies")
    # prometheus_client's process collector reads the boot time in /proc/stat: ProcSubset=pid
    # hides it, and every ooda_process_* metric the dashboard shows is gone.
    assert one(unit, "ProtectProc") == "invisible"
    assert unit["Service"].get("ProcSubset", ["all"])[-1] == "all"
    # systemd's SIGKILL must not cut the longest stop grace, on_exit or the state save short.
    assert int(one(unit, "TimeoutStopSec")) >= MAX_STOP_GRACE_S + 30


def test_node_unit_keeps_only_cap_sys_admin() -> None:
    unit = parse_unit(UNITS / "ooda-node.service")
    assert one(unit, "CapabilityBoundingSet") == "CAP_SYS_ADMIN"
    assert one(unit, "AmbientCapabilities") == ""
    assert one(unit, "NoNewPrivileges") == "yes"
    assert one(unit, "ProtectSystem") == "strict"
    assert one(unit, "DevicePolicy") == "closed"
    devices = unit["Service"]["DeviceAllow"]
    assert all("nvidia" in d for d in devices) and "/dev/nvidiactl rw" in devices
    # systemd matches char-GROUP against /proc/devices' names by glob. The GPUs' own group:
    # "nvidia" on an H100 with the open kernel module 580.159.04 (its /proc/devices had 195
    # nvidia, 195 nvidiactl, 238 nvidia-uvm, 241 nvidia-caps), "nvidia-frontend" on older drivers.
    groups = [d.split()[0].removeprefix("char-") for d in devices if d.startswith("char-")]
    for gpu_group in ("nvidia", "nvidia-frontend", "nvidia-caps"):
        assert any(fnmatch.fnmatchcase(gpu_group, g) for g in groups), gpu_group
    assert "ooda node serve" in one(unit, "ExecStart")
    assert "--token-file /etc/ooda/node.token" in one(unit, "ExecStart")
    assert one(unit, "Group") == "ooda"


def test_site_unit_is_unprivileged_hardened_and_writes_nowhere() -> None:
    """The site coordinator (`ooda site run`): as unprivileged as the agent, and with no state of
    its own (etcd keeps it), nothing writable at all."""
    unit = parse_unit(UNITS / "ooda-site.service")
    assert_unprivileged_notify_service(unit)  # its SIGHUP re-reads the schedule file
    assert one(unit, "PrivateUsers") == "yes"
    assert one(unit, "ExecStart") == "/opt/ooda/bin/ooda site run --config /etc/ooda/site.toml"
    assert "ReadWritePaths" not in unit["Service"] and "StateDirectory" not in unit["Service"]
    assert one(unit, "ReadOnlyPaths") == "/etc/ooda"
    # The example's rounds come well inside the watchdog (the service feeds it between rounds).
    site = tomllib.loads((DEPLOY / "site" / "site.toml").read_text())
    assert 4 * site["site"]["interval_s"] <= int(one(unit, "WatchdogSec"))
    assert one(unit, "Documentation", "Unit") == "file:///opt/ooda/share/doc/site.md"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize(
    ("name", "most"), [("ooda-agent", 2.0), ("ooda-node", 3.0), ("ooda-site", 2.0)]
)
def test_systemd_rates_and_verifies_the_units(tmp_path: Path, name: str, most: float) -> None:
    unit = UNITS / f"{name}.service"
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) <= most, security.stdout
    # verify wants the binary to exist: point ExecStart at the real `ooda` of this environment.
    ooda = Path(sys.executable).with_name("ooda")
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/ooda/bin/ooda", str(ooda)))
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_nvml_drop_in_opens_the_nvidia_devices_only(tmp_path: Path) -> None:
    """The agent reading NVML ([source] kind = "nvml") needs the NVIDIA devices its unit hides."""
    drop_in = UNITS / "ooda-agent.service.d" / "nvml.conf"
    service = parse_unit(drop_in)["Service"]
    assert service["PrivateDevices"] == ["no"] and service["DevicePolicy"] == ["closed"]
    groups = [d.split()[0].removeprefix("char-") for d in service["DeviceAllow"]]
    assert all("nvidia" in g for g in groups) and "nvidia" in groups
    # systemd reads a unit's drop-ins from NAME.service.d beside it: verify and rate them together.
    ooda = Path(sys.executable).with_name("ooda")
    unit = UNITS / "ooda-agent.service"
    (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/ooda/bin/ooda", str(ooda)))
    (tmp_path / "ooda-agent.service.d").mkdir()
    shutil.copy(drop_in, tmp_path / "ooda-agent.service.d" / "nvml.conf")
    (tmp_path / "ooda-agent.service.d" / "zz-probe.conf").write_text("[Service]\nProbeKey=1\n")
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / unit.name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # The probe's unknown key proves the drop-ins were read; nothing else may be said.
    said = [line for line in verify.stderr.splitlines() if line.strip()]
    assert verify.returncode == 0 and said, verify.stderr
    assert all("zz-probe.conf" in line and "ProbeKey" in line for line in said), verify.stderr
    (tmp_path / "ooda-agent.service.d" / "zz-probe.conf").unlink()
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(tmp_path / unit.name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", security.stdout)
    assert match and float(match.group(1)) <= 2.0, security.stdout + security.stderr
    assert re.search(r"✗ PrivateDevices=", security.stdout), security.stdout  # it was applied


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make system-deps` installs Debian's prometheus"
    check = subprocess.run(
        [promtool, "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", "ooda-rules.test.yml"],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def _alerts() -> dict[str, dict[str, Any]]:
    rules = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}


def test_every_alert_fires_and_stays_quiet_in_promtools_tests() -> None:
    """Each alert is unit-tested both ways: firing with its labels and annotations, and quiet
    before it should fire (promtool itself runs the tests above)."""
    tests = yaml.safe_load((RULES.parent / "ooda-rules.test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    alerts = set(_alerts())
    assert len(alerts) >= 11
    assert alerts - fired == set(), "alerts never seen firing"
    assert alerts - quiet == set(), "alerts never checked quiet"
    for case in cases:  # every expectation gives the annotations in full, runbook included
        for expected in case.get("exp_alerts") or []:
            assert "runbook_url" in expected["exp_annotations"], case["alertname"]


def test_agent_down_also_catches_a_target_that_vanished() -> None:
    expr = _alerts()["OodaAgentDown"]["expr"]
    assert 'up{job="ooda-agent"} == 0' in expr and 'absent(up{job="ooda-agent"})' in expr


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub (and most renderers) give a document's headings."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", markdown, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_every_alert_links_its_runbook_in_the_operator_guide() -> None:
    guide = REPO / "docs" / "operator-guide.md"
    anchors = github_anchors(guide.read_text())
    prefix = "file:///opt/ooda/share/doc/operator-guide.md#"  # where install.sh puts the guide
    for name, alert in _alerts().items():
        url = alert["annotations"].get("runbook_url", "")
        assert url.startswith(prefix), (name, url)
        assert url.removeprefix(prefix) in anchors, f"{name}: no section #{url.split('#')[-1]}"
        assert url.removeprefix(prefix) == name.lower()  # its own section, by name


def query_unit(expr: str) -> str:
    """What a dashboard query measures, from its shape and the metric's name (the units the
    agent's metric names carry)."""
    if "histogram_quantile" in expr or expr.startswith("time() -"):
        return "s"
    name = sorted(metric_names_in(expr))[0]
    if ":" in name:  # a recording rule, level:metric:operations: the metric's unit
        level, metric, operations = name.split(":")
        name = "ratio" if operations == "ratio" else f"{level}_{metric}"
    if name == "ratio":
        return "percentunit"
    ledger = _ledger_unit(expr, name)
    if ledger is not None:
        return ledger
    if "rate(" in expr:
        return "suffix: cores" if name.endswith("_cpu_seconds_total") else "ops"
    if "increase(" in expr:
        return "short"
    for suffix, unit in (("_watts", "watt"), ("_seconds", "s"), ("_bytes", "bytes")):
        if name.endswith(suffix):
            return unit
    if name in ("ooda_dry_run", "ooda_state_restored"):
        return "bool_yes_no"
    if name.endswith("_tokens_per_joule"):
        return "suffix: tokens/J"
    if "nodes" in name:
        return "suffix: nodes"
    if "gpus" in name or name.endswith("_caps"):
        return "suffix: GPUs"
    raise AssertionError(f"no unit known for {expr}")


def _ledger_unit(expr: str, name: str) -> str | None:
    """The ledger's counters (agent/meter/metrics.py): joules a second are watts, joules over a
    day kWh (/ 3.6e6), grams an hour kg (/ 1000), GPU-seconds a second GPUs; a cost is in the
    tariff's own currency. None: not a ledger counter."""
    if name.endswith("_joules_total"):
        return "kwatth" if "increase(" in expr else "watt"
    units = {"_grams_total": "masskg", "_gpu_seconds_total": "suffix: GPUs", "_cost_total": "short"}
    return next((unit for suffix, unit in units.items() if name.endswith(suffix)), None)


def test_every_dashboard_panel_has_one_unit_per_axis() -> None:
    """A panel's queries share its one declared unit: watts with watts, GPUs with GPUs (not
    GPUs and watts, bytes and cores, counts and booleans on one axis)."""
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        declared = panel["fieldConfig"]["defaults"].get("unit")
        assert declared, panel["title"]
        assert panel["fieldConfig"].get("overrides", []) == [], panel["title"]
        units = {query_unit(t["expr"]) for t in panel["targets"]}
        assert units == {declared}, (panel["title"], units, declared)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    spots = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dashboard["panels"]]
    assert len(spots) == len(set(spots))  # no two panels in one place


def exported_names(tmp_path: Path) -> set[str]:
    """Every series name the agent exports after a few cycles (dry-run and live paths)."""
    names: set[str] = set()
    for dry in (True, False):
        cfg = write(
            tmp_path / f"o{dry}.toml",
            twin_config(
                dry_run=dry,
                faults=("dropout:node2@20+30", "xid=79:node1/gpu0@15+30"),
                # health_drain drains node1, wants it back at once: the node cooldown refuses
                extra="[policies.power_budget]\n[policies.health_drain]\nresume_hold_s = 0\n"
                # The ledger's series: metered, priced and with carbon.
                '[meter]\nenabled = true\n[meter.tariff]\nkind = "flat"\nprice_per_kwh = 0.2\n'
                '[meter.carbon]\nkind = "constant"\ng_per_kwh = 300.0\n',
            ),
        )
        wall = FakeClock(START_UNIX)
        daemon = in_process(cfg, tmp_path / f"state{dry}", wall=wall)
        daemon.runtime.loop.orienter = WithForecast(HealthFromXid(daemon.runtime.loop.orienter))
        serve_tokens(daemon)  # ooda_tokens_per_joule: jobs that report application tokens
        try:
            for _ in range(8):
                wall.advance(daemon.interval_s)
                daemon.run_cycle()
            text = generate_latest(daemon.metrics.registry).decode()
        finally:
            daemon.shutdown()
        names |= {m.group(1) for m in re.finditer(r"^(ooda_[a-z_]+)[{ ]", text, re.MULTILINE)}
    return names


class WithForecast:
    """Stands in for orient's forecaster (a hand-written fake): persistence, +-10%."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def orient(self, snapshot: Any, budget_w: Any, nodes: Any = None, priority: Any = None) -> Any:
        s = self.inner.orient(snapshot, budget_w, nodes, priority)
        now = np.full(2, s.fleet_power_w)
        forecast = PowerForecast((300.0, 900.0), now, 0.9 * now, 1.1 * now)
        return replace(s, forecast=forecast)

    def to_dict(self) -> dict[str, Any]:
        return self.inner.to_dict()  # type: ignore[no-any-return]

    def load_dict(self, data: Any) -> None:
        self.inner.load_dict(data)


def rule_names() -> set[str]:
    return set(re.findall(r"^\s+- record: (\S+)$", RULES.read_text(), re.MULTILINE))


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(ooda[_:][a-zA-Z0-9_:]+)", expr))


def test_every_metric_the_dashboard_and_rules_query_is_exported(tmp_path: Path) -> None:
    exported = exported_names(tmp_path)
    assert {"ooda_stage_duration_seconds_bucket", "ooda_cycles_total"} <= exported
    recorded = rule_names()
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "ooda-agent" and dashboard["panels"]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        unknown = metric_names_in(expr) - exported - recorded
        assert not unknown, f"dashboard queries {unknown}, which the agent does not export"
    for expr in re.findall(r"^\s+expr: (.+)$", RULES.read_text(), re.MULTILINE):
        unknown = metric_names_in(expr) - exported - recorded
        assert not unknown, f"rules query {unknown}, which the agent does not export"
    # Every panel's queries: no unit-less garbage, and each panel has an id and a place.
    for panel in dashboard["panels"]:
        assert {"id", "title", "gridPos", "targets"} <= set(panel)


def test_example_configs_are_valid(tmp_path: Path) -> None:
    for example in sorted((DEPLOY / "examples").glob("*.toml")):
        text = example.read_text()
        path = example
        if "<cluster-name>" in text:
            # A template: refused, naming each placeholder, until they are filled in; then valid.
            with pytest.raises(ConfigError) as refused:
                load_config(example)
            assert "cluster.name: must be a plain name" in str(refused.value)
            assert "source.prometheus.url: must be a URL: '<prometheus>' is not a host" in str(
                refused.value
            )
            path = tmp_path / example.name
            filled = text.replace('"<cluster-name>"', '"gpu-a"')
            path.write_text(filled.replace("<prometheus>", "prometheus.example.com"))
        config = load_config(_with_its_files(path, tmp_path))
        assert config.dry_run, f"{example}: examples start in dry-run"
    twin = load_config(DEPLOY / "examples" / "twin.toml")
    assert (twin.source.kind, twin.twin.speed, twin.daemon.interval_s) == ("twin", 1.0, 1.0)
    # One GPU node: the name NVML's readings carry is the one its node daemon is reached by.
    node = load_config(DEPLOY / "examples" / "gpu-node.toml", check_files=False)
    assert node.source.kind == "nvml" and node.actuators.node is not None
    assert list(node.actuators.node.endpoints) == [node.source.nvml.node]


def _with_its_files(example: Path, tmp_path: Path) -> Path:
    """A copy of `example` whose files (tokens, TLS, slurm.conf) exist, under `tmp_path`: the
    config's checks refuse a file that names missing ones (they name each), as here."""
    text = example.read_text()
    named = sorted(set(re.findall(r'^\w+ = "(/etc/[^"]+)"', text, re.MULTILINE)))
    if named:
        with pytest.raises(ConfigError) as refused:
            load_config(example if "<" not in text else _filled(example, tmp_path))
        for name in named:
            assert f"{name}: No such file or directory" in str(refused.value)
    for name in named:
        local = tmp_path / "etc" / name.removeprefix("/etc/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("x\n")
        local.chmod(0o600)
        text = text.replace(f'"{name}"', f'"{local}"')
    copy = tmp_path / f"files-{example.name}"
    copy.write_text(text)
    return copy


def _filled(example: Path, tmp_path: Path) -> Path:
    text = example.read_text().replace('"<cluster-name>"', '"gpu-a"')
    filled = tmp_path / f"filled-{example.name}"
    filled.write_text(text.replace("<prometheus>", "prometheus.example.com"))
    return filled


DOCKERFILE = REPO / "Dockerfile"
LOCK = DEPLOY / "requirements.txt"


def _lock_module() -> Any:
    """deploy/lock.py (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("ooda_lock", DEPLOY / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dockerfile_install_command() -> str:
    text = DOCKERFILE.read_text()
    runs = [r for r in re.findall(r"^RUN (.+)$", text, re.MULTILINE) if "install.sh" in r]
    assert len(runs) == 1, runs
    return str(runs[0])


def test_the_image_is_pinned_slim_unprivileged_and_without_pip() -> None:
    """What can be checked of the image without a Docker engine (none here): the base by the
    digest of a python:3.11 slim index, the Python the lock was resolved for; every stage from
    it; the build stage installs with the lock and --no-pip; the final stage removes the base's
    pip and installs no Python package; a non-root user; nothing ADDed."""
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE=(python:(3\.\d+)-slim-\w+)@sha256:([0-9a-f]{64})$", text, re.M)
    assert base, "the base image is not pinned by digest"
    assert base.group(2) == _lock_module().PYTHON  # the lock's Python is the image's
    froms = re.findall(r"^FROM (.+)$", text, re.MULTILINE)
    assert froms == ["${BASE} AS build", "${BASE}"], froms
    install = dockerfile_install_command()
    assert install.startswith("sh /src/deploy/install.sh ") and "--no-pip" in install.split()
    final = text.split("\nFROM ${BASE}\n", 1)[1]
    assert "pip uninstall --yes --quiet pip setuptools wheel" in final
    assert not re.search(r"pip3? install", text), "the image installs with install.sh only"
    assert "COPY --from=build /opt/ooda /opt/ooda" in final
    assert re.search(r'apt-get install -y --no-install-recommends "slurm-client=\$SLURM_CLIENT"',
                     final)  # fmt: skip
    user = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert "\nADD " not in text
    assert re.search(r'^ENTRYPOINT \["ooda", "run"\]$', text, re.MULTILINE)


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(hadolint).exists(), "hadolint missing: pyproject's test extra installs it"
    linted = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert linted.returncode == 0 and linted.stdout == "", linted.stdout + linted.stderr


def test_the_lock_is_in_step_with_pyproject() -> None:
    """deploy/requirements.txt pins every dependency of pyproject.toml (and the build backend)
    within its bounds, with hashes, made from today's pyproject (`make lock` else)."""
    lock = _lock_module()
    text = LOCK.read_text()
    assert lock.problems(text) == []
    pinned = lock.pins(text)
    assert {"numpy", "plotly", "setuptools", "wheel"} <= set(pinned)
    # The check can fail: a pin out of bounds, a dependency missing, pyproject changed.
    assert any("plotly" in p for p in lock.problems(re.sub(r"plotly==\S+", "plotly==5.0", text)))
    unlisted = re.sub(r"^pyarrow==.*?(?=^\S)", "", text, flags=re.MULTILINE | re.DOTALL)
    assert "pyarrow: not in the lock" in lock.problems(unlisted)
    stale = re.sub(r"inputs-sha256: \w+", "inputs-sha256: " + "0" * 64, text)
    assert any("changed since" in p for p in lock.problems(stale))


def _empty_root(tmp_path: Path) -> Path:
    """An empty system root with only the account files useradd needs (as a base image has)."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow", "login.defs"):
        if Path("/etc", name).exists():
            shutil.copy(Path("/etc", name), root / "etc" / name)
    return root


def _install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(
        ["sh", str(DEPLOY / "install.sh"), "--root", str(root), *args],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip


def _tree(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path outside the environment's site-packages: mode, owner, group, content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if "/lib/python" in f"/{rel}" or "__pycache__" in rel:
            continue
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        out[rel] = (st.st_mode & 0o7777, st.st_uid, st.st_gid, digest)
    return out


def _ids(root: Path, name: str) -> tuple[int, int]:
    line = next(x for x in (root / "etc/passwd").read_text().splitlines() if x.startswith(name))
    fields = line.split(":")
    return int(fields[2]), int(fields[3])


def _doc_links_resolve(doc_dir: Path) -> None:
    """Every relative link of the installed docs reaches an installed doc, and its section."""
    docs = {p.name: p.read_text() for p in doc_dir.glob("*.md")}
    for name, text in docs.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            file, _, anchor = target.partition("#")
            assert not file or file in docs, f"{name} links to {file}, which is not installed"
            if anchor:
                assert anchor in github_anchors(docs[file or name]), f"{name}: #{anchor}"


def _runs_the_twin(ooda: Path, tmp_path: Path) -> None:
    """`ooda run` from the installed environment, outside the source tree: the twin, briefly,
    then SIGTERM."""
    cfg = write(tmp_path / "twin.toml", twin_config(interval_s=0.2, speed=5))
    log = tmp_path / "run.log"
    env = {"PATH": "/usr/bin:/bin", "OODA_LOG_LEVEL": "info", "HOME": str(tmp_path)}
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [str(ooda), "run", "--config", str(cfg), "--state-dir", str(tmp_path / "state"),
             "--metrics-listen", "127.0.0.1:0"],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, env=env,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and '"cycle_summary"' not in log.read_text():
                assert proc.poll() is None, log.read_text()
                time.sleep(0.2)
            assert '"cycle_summary"' in log.read_text(), log.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="installs a system user and root-owned files")
def test_install_sh_into_an_empty_root(tmp_path: Path) -> None:
    """install.sh does what the operator guide's Install section says, into an empty root: the
    locked environment, the `ooda` system user, the units, /etc/ooda with a configuration
    skeleton, the state and log directories with their owners and modes, and every doc the
    installed guide links to. Run again it changes nothing but keeps the operator's edits;
    run as the Dockerfile runs it, it leaves no pip behind, and `ooda run` works from it."""
    root = _empty_root(tmp_path)
    first = _install(root)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    assert f"fill in {root}/etc/ooda/agent.toml" in first.stdout
    uid, gid = _ids(root, "ooda:")
    user = next(x for x in (root / "etc/passwd").read_text().splitlines() if x.startswith("ooda:"))
    assert user.endswith(":/var/lib/ooda:/usr/sbin/nologin") and uid < 1000  # a system user
    tree = _tree(root)
    config = tree["etc/ooda/agent.toml"]
    assert tree["etc/ooda"][:3] == (0o750, 0, gid) and config[:3] == (0o640, 0, gid)
    assert config[3] == hashlib.sha256((DEPLOY / "examples/cluster.toml").read_bytes()).hexdigest()
    assert tree["var/lib/ooda"][:3] == (0o700, uid, gid)
    assert tree["var/log/ooda"][:3] == (0o750, uid, gid)
    units = sorted(p.name for p in UNITS.glob("*.service"))
    assert units == ["ooda-agent.service", "ooda-node.service", "ooda-site.service"]
    for unit in units:
        installed = root / "etc/systemd/system" / unit
        assert (
            installed.read_text() == (UNITS / unit).read_text()
            and tree[f"etc/systemd/system/{unit}"][0] == 0o644
        )
    prefix = root / "opt/ooda"
    assert {p.name for p in (prefix / "share/doc").glob("*.md")} == {
        p.name for p in (REPO / "docs").glob("*.md")
    }
    _doc_links_resolve(prefix / "share/doc")
    # A site's examples, together (site.toml names its schedule file beside it).
    examples = prefix / "share/examples/site"
    assert {p.name for p in examples.glob("*.toml")} == {
        p.name for p in (DEPLOY / "site").glob("*.toml")
    }
    checked = subprocess.run(
        [str(prefix / "bin/ooda"), "site", "check", "--config", str(examples / "site.toml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    frozen = subprocess.run(
        [str(prefix / "bin/python"), "-m", "pip", "freeze", "--all"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    pinned = _lock_module().pins(LOCK.read_text())
    for line in frozen.splitlines():  # exactly the lock's versions, and ooda itself
        if line.startswith(("ooda-agent @ ", "pip==")):  # itself; the venv's own pip
            continue
        name, _, version = line.partition("==")
        assert version in pinned[name.lower().replace("_", "-")], line
    if shutil.which("systemd-analyze"):  # the installed units, their ExecStart in this root
        for name in ("ooda-agent.service", "ooda-site.service"):
            unit = tmp_path / name
            text = (root / "etc/systemd/system" / name).read_text()
            unit.write_text(text.replace("/opt/ooda/", f"{prefix}/"))
            verify = subprocess.run(
                ["systemd-analyze", "verify", "--man=no", str(unit)],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr

    # Again, as an upgrade: nothing changes, and the operator's configuration stays.
    edited = (root / "etc/ooda/agent.toml").read_text() + '\n# "my cluster"\n'
    (root / "etc/ooda/agent.toml").write_text(edited)
    before = _tree(root)
    second = _install(root)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "fill in" not in second.stdout
    assert _tree(root) == before
    assert (root / "etc/ooda/agent.toml").read_text() == edited
    assert (root / "etc/passwd").read_text().count("\nooda:") == 1

    # As the image's build stage runs it: no pip, setuptools or wheel left, and it runs.
    image = dockerfile_install_command().replace("/src/deploy/install.sh", "").split()[1:]
    image = [str(REPO) if arg == "/src" else arg for arg in image]
    third = _install(root, *image)
    assert third.returncode == 0, third.stderr[-4000:]
    assert not (prefix / "bin/pip").exists()
    left = list((prefix / "lib").glob("python3*/site-packages/*"))
    assert not [p.name for p in left if p.name.split("-")[0] in ("pip", "setuptools", "wheel")]
    _runs_the_twin(prefix / "bin/ooda", tmp_path)
