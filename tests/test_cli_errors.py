"""One error style across every command (issue 22): each command, given a bad input, says so in
one line, `ooda: error: ...`, naming the input; exit 2 for bad input, 1 for a failure; never a
Python class name or a traceback. Every command of the `ooda` app must have a case here."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main

from agent.cli import app, main
from tests.conftest import free_port

CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b")


def command_paths() -> Iterator[str]:
    """Every leaf command of the `ooda` app ("sim record", "demo", ...)."""

    def walk(command: Any, path: tuple[str, ...]) -> Iterator[str]:
        subcommands = getattr(command, "commands", None)
        if subcommands is None:
            yield " ".join(path)
            return
        for name, sub in subcommands.items():
            yield from walk(sub, (*path, name))

    yield from walk(typer.main.get_command(app), ())


def _files(tmp: Path) -> dict[str, Path]:
    empty = tmp / "empty.toml"
    empty.write_text("")
    garbage = tmp / "garbage.parquet"
    garbage.write_text("not a trace\n")
    csv = tmp / "bad.csv"
    csv.write_text("timestamp,value\n1,2\n2,banana\n")
    return {"empty": empty, "garbage": garbage, "csv": csv, "missing": tmp / "missing.toml"}


# command -> (arguments given a dict of the files above, the exit code, words the line must hold)
Case = tuple[Callable[[dict[str, Path]], list[str]], int, tuple[str, ...]]
BAD_INPUTS: dict[str, Case] = {
    "demo": (lambda f: ["demo", "--duration", "soon"], 2, ("--duration",)),
    "once": (lambda f: ["once", "--config", str(f["missing"])], 2, ("missing.toml",)),
    "record": (
        lambda f: ["record", "--prometheus", "ftp://x", "--start", "-1h", "-o", "t.parquet"],
        2,
        ("--prometheus",),
    ),
    "replay": (lambda f: ["replay", str(f["missing"])], 2, ("missing.toml", "no such file")),
    "policies": (lambda f: ["policies", "--jsn"], 2, ("--jsn",)),
    "adapters": (lambda f: ["adapters", "--jsn"], 2, ("--jsn",)),
    "run": (lambda f: ["run", "--config", str(f["empty"])], 2, ("empty.toml", "[source]")),
    "explain": (lambda f: ["explain", "a-1", "--config", str(f["missing"])], 2, ("missing",)),
    "rollback": (lambda f: ["rollback", "--config", str(f["empty"])], 2, ("empty.toml",)),
    "detect": (lambda f: ["detect", str(f["csv"])], 2, ("bad.csv", "line 3", "banana")),
    "forecast": (lambda f: ["forecast", str(f["csv"]), "--horizon-steps", "0"], 2, ("--horizon",)),
    "sim serve": (lambda f: ["sim", "serve", "--model", "V200"], 2, ("--model", "V200")),
    "sim record": (
        lambda f: ["sim", "record", "-o", "t.parquet", "--fault", "melt:node1@5"],
        2,
        ("fault 'melt:node1@5'", "unknown kind"),
    ),
    "trace info": (lambda f: ["trace", "info", str(f["garbage"])], 2, ("garbage.parquet",)),
    "trace export": (
        lambda f: ["trace", "export", "--openmetrics", str(f["garbage"])],
        2,
        ("garbage.parquet",),
    ),
    "config check": (lambda f: ["config", "check", str(f["empty"])], 2, ("empty.toml", "empty")),
    "node serve": (
        lambda f: ["node", "serve", "--backend", "sim", "--token-file", str(f["missing"])],
        2,
        ("missing.toml",),
    ),
    "guard status": (lambda f: ["guard", "status", "--config", str(f["missing"])], 2, ("missing",)),
    "guard reset": (lambda f: ["guard", "reset", "--config", str(f["missing"])], 2, ("missing",)),
    "audit tail": (lambda f: ["audit", "tail", "--config", str(f["missing"])], 2, ("missing",)),
    "meter backfill": (
        lambda f: ["meter", "backfill", "--prometheus", "ftp://x", "--start", "-1h"],
        2,
        ("--prometheus", "ftp://x"),
    ),
    "meter export": (
        lambda f: ["meter", "export", "-o", "x.csv", "--ledger", str(f["missing"])],
        2,
        ("--ledger", "missing.toml"),
    ),
    "meter status": (lambda f: ["meter", "status", "--config", str(f["missing"])], 2, ("missing",)),
    "site check": (lambda f: ["site", "check", "--config", str(f["missing"])], 2, ("missing",)),
    "site run": (lambda f: ["site", "run", "--config", str(f["missing"])], 2, ("missing",)),
    "site status": (lambda f: ["site", "status", "--config", str(f["missing"])], 2, ("missing",)),
    "curves export": (
        lambda f: ["curves", "export", "--trace", str(f["garbage"]), "-o", "x.csv"],
        2,
        ("garbage.parquet",),
    ),
    "sim calibrate": (
        lambda f: ["sim", "calibrate", str(f["garbage"]), "-o", "x.toml"],
        2,
        ("garbage.parquet",),
    ),
    "report energy": (
        lambda f: ["report", "energy", "--by", "colour", "--ledger", str(f["missing"])],
        2,
        ("--by", "colour"),
    ),
}


def _said_in_one_line(err: str, words: tuple[str, ...]) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("ooda: error: "), line
    assert "Traceback" not in err and not CLASS_NAME.search(line), line
    for word in words:
        assert word in line, (word, line)
    return line


def test_every_command_has_a_bad_input_case() -> None:
    missing = sorted(set(command_paths()) - set(BAD_INPUTS))
    assert not missing, f"add a bad input for each of these commands to BAD_INPUTS: {missing}"


@pytest.mark.parametrize("command", sorted(BAD_INPUTS))
def test_a_bad_input_is_one_line_naming_it(
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    args, code, words = BAD_INPUTS[command]
    assert main(args(_files(tmp_path))) == code
    captured = capsys.readouterr()
    _said_in_one_line(captured.err, words)
    # An unknown option too, with the command's help named.
    assert main([*command.split(), "--no-such-option"]) == 2
    line = _said_in_one_line(capsys.readouterr().err, ("--no-such-option",))
    assert line.endswith(f"see ooda {command} --help"), line


def test_version_and_an_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert re.fullmatch(r"ooda \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)
    assert main(["frobnicate"]) == 2
    _said_in_one_line(capsys.readouterr().err, ("frobnicate",))
    assert main(["--log-level", "loud", "policies"]) == 2
    _said_in_one_line(capsys.readouterr().err, ("--log-level", "loud"))


def test_a_failure_is_exit_1_in_the_same_style(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A second agent for the same cluster printed `ooda: AlreadyRunningError: ...`.
    from agent.daemon.lock import InstanceLock

    config = tmp_path / "agent.toml"
    config.write_text('[source]\nkind = "twin"\n[cluster]\nname = "lab"\n')
    holder = InstanceLock(tmp_path, "lab")
    holder.acquire()
    try:
        args = ["run", "--config", str(config), "--state-dir", str(tmp_path)]
        assert main([*args, "--metrics-listen", "off"]) == 1
    finally:
        holder.release()
    _said_in_one_line(capsys.readouterr().err, ("already running", "one agent per cluster"))
    # A Prometheus that does not answer: the outage is printed, and the exit is 1.
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["once", "--prometheus", url, "--budget-w", "1000"]) == 1
    assert "OUTAGE" in capsys.readouterr().out
    # A backfill from a Prometheus that does not answer: one line, exit 1.
    ledger = tmp_path / "ledger.sqlite"
    args = ["meter", "backfill", "--prometheus", url, "--start", "-1h", "--ledger", str(ledger)]
    assert main(args) == 1
    _said_in_one_line(capsys.readouterr().err, ("backfill failed", "127.0.0.1"))
