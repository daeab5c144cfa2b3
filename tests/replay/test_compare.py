"""`ooda replay --compare` answers the question (issue 22): on a fresh `ooda sim record` trace two
policy sets get different rows, each set's change against the recording and against the other set
with its interval, a verdict, in tables that fit the terminal (80 and 100 columns), and `--json`
carries the same deltas. The report's verdict in a browser is tests/replay/test_report.py's."""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main

SMALL = ["--nodes", "2", "--gpus-per-node", "8", "--duration", "45m", "--seed", "4"]
SETS = ["power_budget", "thermal_guard"]
KPIS = ("energy_kwh", "throughput_ratio", "budget_violation_s")


@dataclass(frozen=True)
class Compared:
    trace: Path
    out: dict[str, Any]  # replay --compare --json
    report: Path


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Compared:
    tmp = tmp_path_factory.mktemp("compare")
    trace, report = tmp / "t.parquet", tmp / "whatif.html"
    assert main(["sim", "record", *SMALL, "-o", str(trace), "--json"]) == 0
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        code = main(["replay", str(trace), "--compare", *SETS, "--report", str(report), "--json"])
    assert code == 0
    return Compared(trace, json.loads(said.getvalue().strip().splitlines()[-1]), report)


def test_the_deltas_are_the_sets_less_the_recording_and_each_other(compared: Compared) -> None:
    out = compared.out
    base, (held, unheld) = out["baseline"], out["compare"]
    # Two different answers: the set that holds the budget spends less and is above it less.
    assert held["energy_kwh"] < unheld["energy_kwh"]
    assert held["budget_violation_s"] < unheld["budget_violation_s"]
    found = {(d["set"], d["against"]): d for d in out["deltas"]}
    assert set(found) == {
        ("power_budget", "recording"),
        ("thermal_guard", "recording"),
        ("thermal_guard", "power_budget"),
    }
    for (name, against), d in found.items():
        mine = held if name == "power_budget" else unheld
        theirs = base if against == "recording" else held
        for key in KPIS:
            assert d[key] == pytest.approx(mine[key] - theirs[key], abs=2e-3), (name, key)
            lo, hi = d["interval"][key]
            if lo is not None:
                assert lo - 1e-3 <= d[key] <= hi + 1e-3, (name, against, key, d)
        total = sum(mine["actions"].values()) - sum(theirs["actions"].values())
        assert d["actions"] == total
    # The budget costs energy held back: power_budget's change against thermal_guard's is a
    # saving, and surer than either set's own figure (the draws are paired).
    between = found[("thermal_guard", "power_budget")]
    assert between["energy_kwh"] > 0
    assert between["interval"]["level"] == 0.9


@pytest.mark.parametrize("columns", [80, 100])
def test_the_tables_fit_the_terminal(
    compared: Compared,
    columns: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["replay", str(compared.trace), "--compare", *SETS]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    too_wide = [line for line in lines if len(line.rstrip()) > columns]
    assert too_wide == [], too_wide
    assert re.search(r"^as recorded\s", text, re.M)
    kpi_rows = {name: re.search(rf"^{name}\s+([\d.,]+)\s", text, re.M) for name in SETS}
    assert all(kpi_rows.values()), text
    energies = {name: m.group(1) for name, m in kpi_rows.items() if m}
    assert energies["power_budget"] != energies["thermal_guard"], text
    assert "Changes" in text
    assert re.search(r"^power_budget\s+-[\d.]+\s.*\nvs the recording\s", text, re.M), text
    assert re.search(r"^thermal_guard\s+\+[\d.]+\s.*\nvs power_budget\s", text, re.M), text
    assert re.search(r"^verdict: \S+ wins on ", text, re.M), text
    # Nothing a person reads is a Python repr.
    assert not re.search(r"\{'|=None|<agent\.", text), text


def test_the_report_opens_with_the_verdict(compared: Compared) -> None:
    html = compared.report.read_text(encoding="utf-8")
    after_title = re.search(r"</h1>\s*<(\w+)[^>]*\bid=['\"](\w+)['\"]", html)
    assert after_title is not None and after_title.group(2) == "verdict"
    verdict = html[after_title.start() : html.index("</section>", after_title.start())]
    assert "wins on" in verdict and "Budget:" in verdict and " W" in verdict


def test_the_report_opens_with_the_verdict_in_a_browser(compared: Compared) -> None:
    """The same in headless Chromium (Debian's, through playwright's client): the verdict is the
    first thing after the title, in the first screenful, and names a winner and the budget."""
    from tests.browser import open_page

    with open_page(compared.report) as seen:
        first = seen.page.evaluate("document.querySelector('h1').nextElementSibling.id")
        box = seen.page.locator("#verdict").bounding_box()
        verdict = seen.page.locator("#verdict").inner_text()
    assert first == "verdict"
    assert box is not None and box["y"] < 120
    assert re.search(r"\S+ wins on ", verdict) and "Budget:" in verdict, verdict
