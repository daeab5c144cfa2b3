from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import load_config, parse_config
from agent.core.errors import ConfigError


def write(tmp_path: Path, text: str, *, source: bool = True) -> Path:
    """The file `text` (with `[source] kind = "twin"` appended where it names no source kind,
    as every file must: `source=False` leaves it out)."""
    path = tmp_path / "ooda.toml"
    if source and "[source]" not in text:
        text += '\n[source]\nkind = "twin"\n'
    path.write_text(text)
    return path


def test_defaults_run_every_builtin_policy() -> None:
    config = parse_config({})
    assert config.dry_run is True
    assert "power_budget" in config.policy_settings


def test_full_config_loads(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
dry_run = false
[cluster]
name = "lab"
budget_w = 30000
node_overhead_w = 800
[twin]
nodes = 4
faults = ["xid=79:node2/gpu1@60"]
[policies.power_budget]
margin_frac = 0.05
[guard]
cap_cooldown_s = 30
[daemon]
interval_s = 5
""",
        )
    )
    assert config.cluster.budget_w == 30000 and not config.dry_run
    assert config.policy_settings["power_budget"].margin_frac == 0.05  # type: ignore[attr-defined]
    assert config.guard.cap_cooldown_s == 30 and config.daemon.interval_s == 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[cluster]\nbudget_w = -5", "cluster.budget_w: Input should be greater than 0 (got -5)"),
        ("[cluster]\nbudgit_w = 5", "cluster.budgit_w: unknown key"),
        ("[daemon]\ninterval_s = 'soon'", "daemon.interval_s:"),
        ("[policies.nope]", "policies.nope: unknown policy"),
        (
            "[policies.power_budget]\nmargin_frac = 2.0",
            "policies.power_budget.margin_frac: Input should be less than or equal to 0.5",
        ),
        ("[policies.power_budget]\nmargn = 1", "policies.power_budget.margn: unknown key"),
        ("[twin]\nmodel = 'V200'", "twin.model: unknown GPU model 'V200'"),
        ("[twin]\nfaults = ['melt:node1@5']", "twin.faults: fault 'melt:node1@5': unknown kind"),
        ("[cluster]\nbudget_w = 5\nbudget_query = 'x'", "give budget_w or budget_query, not both"),
        (
            "[source.prometheus]\nparallel_queries = 0",
            "source.prometheus.parallel_queries: Input should be greater than or equal to 1",
        ),
    ],
)
def test_errors_name_the_key_path(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    assert expected in str(exc.value)
    assert str(tmp_path / "ooda.toml") in str(exc.value)


def test_bad_toml_names_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 2"):
        load_config(write(tmp_path, "[cluster]\nbudget_w = = 3\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_config_check_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "[daemon]\ninterval_s = 5\n")
    assert main(["config", "check", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = write(tmp_path, "[cluster]\nbudget_w = -1\n")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cluster.budget_w" in err[0]


def test_config_check_refuses_what_run_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The rule lived only where the twin is built: `config check` said OK, `run` refused.
    dr = "[twin]\ndemand_response = {start_s = 10, duration_s = 60, budget_w = 1000}\n"
    assert main(["config", "check", str(write(tmp_path, dr))]) == 2
    err = capsys.readouterr().err.strip()
    assert "twin.demand_response: needs twin.budget_w" in err and "\n" not in err
    assert main(["config", "check", str(write(tmp_path, dr + "budget_w = 5000\n"))]) == 0


def test_cli_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--duration", "soon"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--duration" in err[0]
    assert main(["demo", "--nodes", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--nodes" in err[0]


def test_groups_and_priorities(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
[cluster.groups.rack1]
nodes = "node[1-4]"
budget_w = 12000
[cluster.groups.row2]
nodes = ["gpu-b*", "node[9-10]"]
budget_w = 20000
[cluster.job_priority]
"10*" = 2
""",
        )
    )
    assert config.cluster.groups["rack1"].budget_w == 12000
    assert config.cluster.job_priority == {"10*": 2}
    with pytest.raises(ConfigError, match=r"cluster.groups.rack1.nodes: bad node list 'node\[1-'"):
        load_config(write(tmp_path, "[cluster.groups.rack1]\nnodes = 'node[1-'\nbudget_w = 5\n"))


PROMETHEUS = "[source]\nkind = 'prometheus'\n"  # a source that reads a rack label


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "group_label = 'rack'\nlabel_budgets_w = {r1 = -5.0}",
            "cluster.label_budgets_w.r1: Input should be greater than 0",
        ),
        (
            "group_label = 'rack'\nlabel_budgets_w = {r1 = nan}",
            "cluster.label_budgets_w.r1: Input should be a finite number",
        ),
        ("group_label = 'not a label!'", "cluster.group_label: not a Prometheus label name"),
        ("label_budgets_w = {r1 = 5.0}", "cluster.label_budgets_w: needs cluster.group_label"),
    ],
)
def test_label_group_budgets_are_checked(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_config(tomllib.loads(f"{PROMETHEUS}[cluster]\n{text}\n"))


def test_label_group_budgets_parse() -> None:
    text = f"{PROMETHEUS}[cluster]\ngroup_label = 'rack'\nlabel_budgets_w = {{r1 = 5.0}}"
    assert parse_config(tomllib.loads(text)).cluster.label_budgets_w == {"r1": 5.0}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A boolean is not a number: `true` was 1 s, 1 node.
        ("[daemon]\ninterval_s = true", "daemon.interval_s: Input should be a valid number"),
        ("[twin]\nnodes = true", "twin.nodes: Input should be a valid integer"),
        ("[cluster]\njob_priority = {'1*' = true}", 'cluster.job_priority."1*": Input should be'),
        # Nor is a string or a number a boolean: "false" was read as false, 0 too.
        ("dry_run = 'false'", "dry_run: Input should be a valid boolean"),
        ("dry_run = 0", "dry_run: Input should be a valid boolean"),
        # No infinities: a lease or interval that never ends overflows or never expires.
        ("[actuators]\nlease_s = inf", "actuators.lease_s: Input should be a finite number"),
        ("[daemon]\nmisfire_grace_s = inf", "daemon.misfire_grace_s: Input should be a finite"),
        ("[twin]\nspeed = nan", "twin.speed: Input should be a finite number"),
        # The cluster's name is a path component of the state directory.
        ("[cluster]\nname = '/'", "cluster.name: must be a plain name"),
        ("[cluster]\nname = '..'", "cluster.name: must be a plain name"),
        ("[cluster]\nname = 'a/../../etc'", "cluster.name: must be a plain name"),
        ("[cluster]\nname = '<cluster-name>'", "cluster.name: must be a plain name"),
        # The same in the guard's, the policies', orient's and the actuators' own sections.
        ("[guard]\ncap_cooldown_s = true", "guard.cap_cooldown_s: Input should be a valid number"),
        ("[guard]\ncap_cooldown_s = inf", "guard.cap_cooldown_s: Input should be a finite"),
        ("[policies.power_budget]\ndry_run = 'false'", "power_budget.dry_run: Input should be"),
        ("[orient.forecast]\ncoverage = nan", "orient.forecast.coverage: Input should be a finite"),
        ("[actuators.slurm]\ntimeout_s = true", "actuators.slurm.timeout_s: Input should be a"),
        ("[rollout]\nnotify_during_freeze = 1", "rollout.notify_during_freeze: Input should be"),
        # URLs: a template's placeholder left in, no host, a port out of range, another scheme.
        (
            "[source.prometheus]\nurl = 'http://<prometheus>:9090'",
            "source.prometheus.url: must be a URL: '<prometheus>' is not a host",
        ),
        (
            "[source.prometheus]\nurl = 'http://'",
            "source.prometheus.url: must be a URL: no host in",
        ),
        ("[source.prometheus]\nurl = 'http://p:99999'", "the port in 'http://p:99999' is not"),
        ("[source.prometheus]\nurl = 'prom:9090'", "expected an http:// or https:// URL"),
        (
            "[actuators.node]\ntoken_file = '/t'\nendpoint_template = 'https://<{node}>:9440'",
            "is not a host name or an IP address",
        ),
    ],
)
def test_values_that_only_looked_valid_are_refused(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_config(tomllib.loads(text))


def test_plain_values_still_read() -> None:
    config = parse_config(
        tomllib.loads(
            "dry_run = false\n[cluster]\nname = 'gpu-a.prod_2'\n[daemon]\ninterval_s = 15\n"
            "state_dir = '/tmp/x'\n[source.prometheus.metrics]\npower_w = 'gpu_power'\n"
        )
    )
    assert config.daemon.interval_s == 15.0 and isinstance(config.daemon.interval_s, float)
    assert config.cluster.name == "gpu-a.prod_2" and config.dry_run is False
    assert config.daemon.state_dir == Path("/tmp/x")
    # Paths and lists-as-tuples in the other sections still read from TOML's strings and arrays.
    config = parse_config(
        tomllib.loads(
            "[actuators.slurm]\nbin_dir = '/usr/bin'\n[orient.forecast]\nhorizons_s = [60, 300]\n"
        )
    )
    assert config.actuators.slurm.bin_dir == Path("/usr/bin")
    for url in ("http://127.0.0.1:9090", "https://prom.example.com/x", "http://[::1]:9090",
                "http://prom_1:9090"):  # fmt: skip
        parse_config({"source": {"prometheus": {"url": url}}})
    assert config.orient.forecast.horizons_s == (60.0, 300.0)


def test_label_group_budgets_need_a_source_that_has_the_label() -> None:
    # The twin's GPUs carry only their job's priority: a rack label would hold no budget.
    text = "[cluster]\ngroup_label = 'rack'\nlabel_budgets_w = {r1 = 100.0}\n"
    with pytest.raises(ConfigError, match=r"cluster\.group_label: the twin's GPUs carry no 'rack'"):
        parse_config(tomllib.loads(text))
    from agent.assembly import prometheus_settings

    config = parse_config(tomllib.loads(PROMETHEUS + text))
    assert prometheus_settings(config).extra_labels == ("rack",)
    parse_config(tomllib.loads("[cluster]\ngroup_label = 'priority'\n"))  # the twin's label
    parse_config(tomllib.loads("[cluster]\ngroup_label = 'workload'\n"))  # ... and its jobs'
    # NVML's GPUs carry only Slurm's priority, not the twin's workload label.
    nvml = {"source": {"kind": "nvml"}, "cluster": {"group_label": "workload"}}
    with pytest.raises(ConfigError, match=r"NVML's GPUs carry no 'workload' label"):
        parse_config(nvml)


def test_prometheus_section_reaches_the_source(tmp_path: Path) -> None:
    from agent.assembly import prometheus_settings

    config = load_config(
        write(
            tmp_path,
            '[source]\nkind = "prometheus"\n[source.prometheus]\n'
            "static_refresh_s = 60\nparallel_queries = 4\n",
        )
    )
    settings = prometheus_settings(config)
    assert settings.static_refresh_s == 60 and settings.parallel_queries == 4


# -- issue 22: integer keys, every error at once, a source named, files checked, no budget ------


def test_priority_weights_are_set_through_toml(tmp_path: Path) -> None:
    # TOML's keys are text: the README's example failed with `"[key]": Input should be a valid
    # integer (got '0')` and no file could set the weights.
    text = "[policies.power_budget]\npriority_weights = { 0 = 1.0, 1 = 4.0, 2 = 16.0, 5 = 2.5 }\n"
    config = load_config(write(tmp_path, text))
    weights = config.policy_settings["power_budget"].priority_weights  # type: ignore[attr-defined]
    assert weights == {0: 1.0, 1: 4.0, 2: 16.0, 5: 2.5}
    assert all(type(k) is int for k in weights)


def test_a_bad_map_key_is_named_in_the_files_terms(tmp_path: Path) -> None:
    text = "[policies.power_budget]\npriority_weights = { high = 1.0, 1 = 4.0 }\n"
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    message = str(exc.value)
    assert "policies.power_budget.priority_weights.high: key must be a whole number" in message
    assert "[key]" not in message


FIVE_ERRORS = """
dry_runn = true                  # 1. an unknown top-level key
[cluster]
budget_w = -5                    # 2. out of range
[guard]
cap_cooldown_s = "soon"          # 3. the wrong type
[source]
kind = "prometheus"
[source.prometheus]
url = "http://127.0.0.1:9090"
timeoutt_s = 3                   # 4. a typo in an adapter's section
[policies.power_budget]
margin_fracc = 0.01              # 5. a typo in a policy's section
"""


def test_config_check_prints_every_error_of_a_file_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, FIVE_ERRORS)
    assert main(["config", "check", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5, lines
    expected = [
        "dry_runn: unknown key",
        "cluster.budget_w: Input should be greater than 0 (got -5)",
        "guard.cap_cooldown_s: Input should be a valid number (got 'soon')",
        "source.prometheus.timeoutt_s: unknown key",
        "policies.power_budget.margin_fracc: unknown key",
    ]
    for line in lines:
        assert line.startswith(f"ooda: error: config {path}: "), line
    for problem in expected:
        assert any(line.endswith(problem) for line in lines), (problem, lines)


def test_rules_across_sections_hold_while_another_section_is_in_error(tmp_path: Path) -> None:
    # Both budgets given is a rule over [cluster]; a typo in [guard] must not hide it.
    text = "[cluster]\nbudget_w = 5\nbudget_query = 'x'\n[guard]\ncap_cooldwn_s = 1\n"
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    assert exc.value.problems == (
        "guard.cap_cooldwn_s: unknown key",
        "cluster: give budget_w or budget_query, not both",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty: say where telemetry comes from with [source] kind"),
        ("[cluster]\nbudget_w = 5000\n", "source.kind: required key is missing"),
        ('[source.prometheus]\nurl = "http://p:9090"\n', "source.kind: required key is missing"),
    ],
)
def test_a_file_that_names_no_source_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    # An empty file was `OK (twin source, ...)`, and `ooda run` then controlled a simulated
    # cluster: the twin runs only when the file asks for it.
    path = write(tmp_path, text, source=False)
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == err.splitlines()[0] and expected in err and '"twin" for the built-in' in err
    assert main(["run", "--config", str(path), "--metrics-listen", "off"]) == 2
    assert expected in capsys.readouterr().err
    twin = write(tmp_path, text + '\n[source]\nkind = "twin"\n', source=False)
    assert main(["config", "check", str(twin)]) == 0


def test_no_budget_is_a_warning_that_says_what_will_not_happen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[source]\nkind = "prometheus"\n', source=False)
    assert main(["config", "check", str(path)]) == 0
    captured = capsys.readouterr()
    warning = " ".join(captured.err.split())
    assert warning.startswith(f"ooda: warning: {path}: no budget: ")
    assert "power_budget will cap nothing" in warning and "thermal_guard" in warning
    assert "budget:   none" in captured.out
    assert main(["config", "check", str(write(tmp_path, "[cluster]\nbudget_w = 9000\n"))]) == 0
    assert capsys.readouterr().err == ""
    # The twin's own budget is a budget.
    with_twin_budget = write(tmp_path, "[twin]\nbudget_w = 9000\n")
    assert main(["config", "check", str(with_twin_budget), "--json"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and '"warnings":[]' in out.out.replace(" ", "")


def test_once_says_why_it_decided_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[twin]\nnodes = 1\n")
    assert main(["once", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "decided:  nothing (no budget: power_budget needs cluster.budget_w" in out


def _node_section(token: Path, extra: str = "") -> str:
    return (
        '[source]\nkind = "twin"\n[actuators]\ncaps = "node"\n[actuators.node]\n'
        f'endpoint_template = "unix:///run/ooda/{{node}}.sock"\ntoken_file = "{token}"\n{extra}'
    )


def test_files_the_config_names_are_checked(tmp_path: Path) -> None:
    token = tmp_path / "node.token"
    missing = tmp_path / "absent.pem"
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, _node_section(token, f'tls_ca = "{missing}"\n')))
    assert exc.value.problems == (
        f"actuators.node.token_file: {token}: No such file or directory",
        f"actuators.node.tls_ca: {missing}: No such file or directory",
    )
    token.write_text("secret\n")
    token.chmod(0o620)  # its group may write it: anyone there could mint their own
    with pytest.raises(ConfigError, match=r"token_file: .*a secret its group or others may write"):
        load_config(write(tmp_path, _node_section(token)))
    token.chmod(0o640)
    assert load_config(write(tmp_path, _node_section(token))).actuators.caps == "node"
    with pytest.raises(ConfigError, match=r"tls_ca: .*: not a file"):
        load_config(write(tmp_path, _node_section(token, f'tls_ca = "{tmp_path}"\n')))
    slurm = f'[actuators.slurm]\nbin_dir = "{token}"\n'
    with pytest.raises(ConfigError, match=r"actuators.slurm.bin_dir: .*: not a directory"):
        load_config(write(tmp_path, _node_section(token) + slurm))
    # A command that builds no agent (the audit log's readers) does not open them.
    token.unlink()
    path = write(tmp_path, _node_section(token))
    assert load_config(path, check_files=False).actuators.caps == "node"
