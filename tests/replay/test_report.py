"""The replay report opens in headless Chromium (Debian's `chromium`, driven through playwright's
client: no browser download) with no console errors and no network requests, and shows its plots:
a screenshot that is not blank, and every plot container rendered."""

from __future__ import annotations

import io
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from agent.demo import uncapped_demand_w
from agent.replay.twin_trace import run_twin
from agent.sim.twin import BudgetSchedule, TwinSpec

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PLOTS = ("plot-power", "plot-caps", "plot-timeline")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = TwinSpec(nodes=4, gpus_per_node=8, seed=5, median_job_s=3 * 3600.0, step_s=15.0)
    demand = uncapped_demand_w(base, 3600)
    spec = replace(
        base, budget=BudgetSchedule.demand_response(1.02 * demand, 0.65 * demand, 1200, 1200)
    )
    tmp = tmp_path_factory.mktemp("report")
    trace = tmp / "q.parquet"
    run_twin(spec, duration_s=3600, policies=["power_budget"], record_to=trace)
    out = tmp / "whatif.html"
    code = main(
        ["replay", str(trace), "--compare", "power_budget", "thermal_guard",
         "--report", str(out), "--json"]
    )  # fmt: skip
    assert code == 0
    return out


def test_report_is_self_contained(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # Nothing to fetch: no external scripts or stylesheets (plotly.js is inlined).
    assert not re.search(r"<script[^>]*\ssrc=", text)
    assert not re.search(r"<link[^>]*\shref=", text)
    assert len(text) > 3_000_000  # the library itself is in the file
    for plot in PLOTS:
        assert f'id="{plot}"' in text
    assert "as recorded" in text and "thermal_guard" in text


def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail("chromium is not installed (make system-deps installs Debian's chromium)")
    from PIL import Image
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    requests: list[str] = []
    shot = tmp_path / "report.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, timeout=60_000)
        try:
            # A fresh profile (user data dir) per launch; nothing but the file may be loaded.
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on(
                "console",
                lambda m: (
                    problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning")
                    else None
                ),
            )
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report.as_uri(), wait_until="load", timeout=60_000)
            for plot in PLOTS:
                page.wait_for_selector(f"#{plot} .main-svg", timeout=30_000)
            boxes = {p: page.locator(f"#{p}").bounding_box() for p in PLOTS}
            traces = page.locator("#plot-power .scatterlayer .trace").count()
            page.screenshot(path=str(shot), full_page=True)
            power_png = page.locator("#plot-power").screenshot()
        finally:
            browser.close()
    assert problems == []
    assert [u for u in requests if not u.startswith("file://")] == []
    for plot, box in boxes.items():
        assert box is not None and box["width"] > 600 and box["height"] > 200, (plot, box)
    assert traces >= 5  # budget, recorded, and per set a line and its interval band
    page_pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert page_pixels.shape[0] > 1500  # the whole page: table and three plots
    assert page_pixels.std() > 20  # not blank
    plot_pixels = np.asarray(Image.open(io.BytesIO(power_png)).convert("RGB"), dtype=np.int64)
    # Coloured lines drawn: pixels far from grey (the background and axes are grey or white).
    colour = plot_pixels.max(axis=2) - plot_pixels.min(axis=2)
    assert (colour > 60).mean() > 0.005, "the power plot shows no coloured lines"


def test_report_of_a_recorded_cluster_trace_shows_dates(tmp_path: Path) -> None:
    """A trace in Unix time (as `ooda record` writes) is plotted against dates."""
    from agent.core.gpu_models import H100_SXM
    from agent.core.snapshot import Metric, build_snapshot
    from agent.observe.trace import TraceWriter
    from agent.replay.engine import PolicySet, replay_trace
    from agent.replay.report import render_html

    t0 = 1_714_564_800.0  # 2024-05-01T12:00:00Z
    trace = tmp_path / "cluster.parquet"
    metrics = (Metric.POWER_W, Metric.SM_CLOCK_MHZ, Metric.UTIL_PCT)
    with TraceWriter(trace, time_base="unix", step_s=15, source={}, metrics=metrics) as w:
        for k in range(20):
            w.append(
                build_snapshot(
                    time_s=t0 + 15 * k,
                    node_of_gpu=["a", "b"],
                    gpu=[0, 0],
                    uuid=["GPU-a", "GPU-b"],
                    model=[H100_SXM.model_name] * 2,
                    job=["7", ""],
                    values={
                        Metric.POWER_W: [650.0, 80.0],
                        Metric.SM_CLOCK_MHZ: [1900.0, 345.0],
                        Metric.UTIL_PCT: [99.0, 0.0],
                    },
                    age_s=[0.0, 0.0],
                    stale=[False, False],
                    budget_w=700.0,
                )
            )
    report = replay_trace(trace, policy_sets=[PolicySet("power_budget", ("power_budget",))])
    page = render_html(report)
    assert "2024-05-01T12:00:00" in page  # the axis and the header speak in dates
    assert report.baseline["budget_violation_s"] > 0  # 730 W against 700 W
    assert report.sets[0].kpis["actions"]["set_power_cap"] > 0
    assert report.sets[0].kpis["budget_violation_s"] < report.baseline["budget_violation_s"]
