"""`ooda report energy`: `--json` parses (totals, groups, days, top jobs), and `--html` renders in
headless Chromium (Debian's, driven through playwright's client) with no console errors, no
network requests, its plots drawn and its tables filled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from agent.meter.ledger import Ledger
from agent.meter.meter import Meter
from agent.meter.pricing import Constant
from agent.sim.accounts import TwinAccounts
from agent.sim.adapters import TwinSource
from agent.sim.twin import Twin, TwinSpec
from tests.browser import open_page
from tests.conftest import last_json

PLOTS = ("plot-groups", "plot-energy", "plot-cost", "plot-co2")


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two twin days of a small cluster, a reading every 5 minutes, priced and with carbon."""
    twin = Twin(TwinSpec(nodes=2, gpus_per_node=4, seed=9, median_job_s=3600.0, step_s=15.0))
    source = TwinSource(twin)
    path = tmp_path_factory.mktemp("ledger") / "ledger.sqlite"
    meter = Meter(
        Ledger(path, timeline="twin-report"),
        accounting=TwinAccounts(twin),
        node_overhead_w=200.0,
        price=Constant(0.25),
        carbon=Constant(320.0),
    )
    while twin.t_s <= 2 * 86_400:
        meter.book(source.observe(twin.t_s))
        twin.run_until(twin.t_s + 300.0)
    meter.close()
    return path


def test_json_parses_and_adds_up(ledger: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["report", "energy", "--ledger", str(ledger), "--since", "7d", "--json"]
    assert main([*args, "--by", "user"]) == 0
    data = last_json(capsys.readouterr().out)
    total = data["total"]
    assert total["total_kwh"] == pytest.approx(total["gpu_kwh"] + total["overhead_kwh"])
    assert total["cost"] == pytest.approx(0.25 * total["total_kwh"])
    assert total["co2_kg"] == pytest.approx(0.320 * total["total_kwh"])
    assert total["method"] == "counter"
    groups = data["groups"]
    assert sum(g["usage"]["total_kwh"] for g in groups) == pytest.approx(total["total_kwh"])
    assert sum(g["share_pct"] for g in groups) == pytest.approx(100.0)
    assert len(data["days"]) == 2
    assert data["top_jobs"] and data["top_jobs"][0]["account"].startswith("team-")
    for by in ("account", "partition", "job"):
        assert main(["report", "energy", "--ledger", str(ledger), "--by", by, "--json"]) == 0
        again = last_json(capsys.readouterr().out)
        assert again["total"] == total
        assert sum(g["usage"]["total_kwh"] for g in again["groups"]) == pytest.approx(
            total["total_kwh"]
        )


def test_html_renders_in_headless_chromium(
    ledger: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    out = tmp_path / "energy.html"
    assert main(["report", "energy", "--ledger", str(ledger), "--html", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    text = out.read_text(encoding="utf-8")
    # plotly.js's basic bundle, as in the replay report (4.8 MB with the full one).
    assert len(text.encode()) < 2_000_000, len(text.encode())
    embedded = text.split('<script type="application/json" id="energy-data">')[1].split("</script>")
    assert json.loads(embedded[0].replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    shot = tmp_path / "energy.png"
    with open_page(out) as seen:
        page = seen.page
        for plot in PLOTS:
            page.wait_for_selector(f"#{plot} .main-svg", timeout=30_000)
        boxes = {p: page.locator(f"#{p}").bounding_box() for p in PLOTS}
        bars = page.locator("#plot-energy .barlayer .trace").count()
        rows = page.locator("#groups tr").count()
        jobs = page.locator("#top-jobs tr").count()
        page.screenshot(path=str(shot), full_page=True)
    assert seen.problems == []
    assert [u for u in seen.requests if not u.startswith("file://")] == []
    for plot, box in boxes.items():
        assert box is not None and box["width"] > 600 and box["height"] > 200, (plot, box)
    assert bars == 4  # three accounts and the idle GPUs, stacked per day
    assert rows == 5 and jobs == 11  # a header and a row each
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int64)
    assert pixels.shape[0] > 1500 and pixels.std() > 20
    colour = pixels.max(axis=2) - pixels.min(axis=2)
    assert (colour > 60).mean() > 0.005, "no coloured bars drawn"
