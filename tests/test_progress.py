"""Progress on the commands that take more than a few seconds (issue 22): `ooda demo` and `ooda sim
record` show a bar on a terminal (a pseudo-terminal here), naming the part running, and say
nothing of it with --json or when their output is piped. `ooda replay`'s is in
tests/replay/test_replay.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli._common import Bar
from tests.tty_helpers import on_a_terminal

OODA = [sys.executable, "-m", "agent"]


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["demo", "--duration", "20m", "--seed", "3"], b"ooda demo: "),
        (["sim", "record", "--nodes", "2", "--duration", "20m"], b"ooda sim record: "),
    ],
)
def test_a_bar_on_a_terminal_only(command: list[str], shown: bytes, tmp_path: Path) -> None:
    if command[0] == "sim":
        command = [*command, "-o", str(tmp_path / "t.parquet")]
    code, seen = on_a_terminal([*OODA, *command])
    assert code == 0, seen
    assert shown in seen, seen
    assert b"%" in seen  # the bar's share done
    code, seen = on_a_terminal([*OODA, *command, "--json"])
    assert code == 0 and shown not in seen, seen
    piped = subprocess.run([*OODA, *command], capture_output=True, timeout=120, check=False)
    assert piped.returncode == 0 and shown not in piped.stderr, piped.stderr


class FakeProgress:
    """What a Bar calls of rich's Progress, written down."""

    def __init__(self) -> None:
        self.advanced: list[float] = []
        self.described: list[str] = []

    def advance(self, _task: object, n: float) -> None:
        self.advanced.append(n)

    def update(self, _task: object, description: str) -> None:
        self.described.append(description)


def test_a_bar_batches_its_redraws_and_loses_nothing() -> None:
    fake = FakeProgress()
    bar = Bar(fake, task=0, batch=10.0)
    for _ in range(25):
        bar(1.0)
    bar.stage("the oracle")
    bar.flush()
    assert fake.advanced == [10.0, 10.0, 5.0]
    assert fake.described == ["the oracle"]
    Bar()(5.0)  # not shown: does nothing


def test_a_share_done_advances_the_bar_by_what_is_new() -> None:
    fake = FakeProgress()
    told = Bar(fake, task=0).share(10.0)  # a part worth 10 units, told its share done
    for share in (0.25, 0.5, 0.5, 1.0):
        told(share)
    assert fake.advanced == [2.5, 2.5, 0.0, 5.0]
    Bar().share(10.0)(0.5)  # not shown: does nothing
