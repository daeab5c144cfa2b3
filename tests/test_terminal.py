"""What a person reads at a terminal (issue 22): no Python reprs (`{'kind': ...}`, `None`,
`False`, `['a', 'b']`) and lines that fit the terminal (80 and 100 columns). Replay's tables are
tests/replay/test_compare.py's; the one error style is tests/test_cli_errors.py's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.cli import main
from agent.replay.twin_trace import record_twin
from agent.sim.twin import TwinSpec

ROOT = Path(__file__).resolve().parents[1]
REPR = re.compile(r"\{'|\['|\bNone\b|= False\b|= True\b|object at 0x|<agent\.")


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("terminal") / "t.parquet"
    record_twin(TwinSpec(nodes=2, gpus_per_node=4, seed=3), path, duration_s=300)
    return path


@pytest.mark.parametrize("columns", [80, 100])
@pytest.mark.parametrize(
    "args",
    [
        ["policies"],
        ["adapters"],
        ["config", "check", str(ROOT / "deploy" / "examples" / "twin.toml")],
        ["trace", "info", "TRACE"],
    ],
)
def test_what_a_person_reads(
    args: list[str],
    columns: int,
    trace: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main([str(trace) if a == "TRACE" else a for a in args]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert not REPR.search(text), REPR.search(text)
    if args[0] == "trace":  # its first line names the file (a temporary path's length)
        text = "\n".join(text.splitlines()[1:])
    too_wide = [line for line in text.splitlines() if len(line) > columns]
    assert too_wide == [], too_wide


def test_a_log_a_person_reads_has_no_reprs(capsys: pytest.CaptureFixture[str]) -> None:
    import structlog

    from agent.cli._common import setup_logging

    setup_logging("info", json_logs=False)
    structlog.get_logger("t").error(
        "cycle_summary", errors=None, policies=["a", "b"], actions={"cap": 3}, error_type="XError"
    )
    line = capsys.readouterr().err
    assert "policies=a,b" in line and "actions=cap:3" in line, line
    assert not REPR.search(line) and "errors=" not in line and "XError" not in line, line
    setup_logging("info", json_logs=True)  # a program's log keeps them all
    structlog.get_logger("t").error("cycle_summary", errors=None, error_type="XError")
    said = capsys.readouterr().err
    assert '"errors": null' in said and "XError" in said


def test_every_command_s_help_has_examples() -> None:
    """The README says so: every command has `--help` with examples."""
    from click.testing import CliRunner
    from typer.main import get_command

    from agent.cli import app
    from tests.test_cli_errors import command_paths

    root = get_command(app)
    missing = []
    for path in command_paths():
        said = CliRunner().invoke(root, [*path.split(), "--help"], env={"COLUMNS": "100"})
        if said.exit_code != 0 or "Examples" not in said.output:
            missing.append(path)
    assert missing == []
