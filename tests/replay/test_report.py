"""The replay report opens in headless Chromium (Debian's `chromium`, driven through playwright's
client: no browser download) with no console errors and no network requests: the verdict first,
then its plots (a screenshot that is not blank, every row of the figure rendered on one time
axis). It is small (plotly.js's basic bundle, not the full one), explains an uneventful trace,
and draws a long trace in buckets."""

from __future__ import annotations

import io
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from agent.replay.twin_trace import run_twin
from agent.sim.kpis import uncapped_demand_w
from agent.sim.twin import BudgetSchedule, TwinSpec
from tests.browser import open_page

PLOTS = ("plot-time",)


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
    # The library is in the file, its basic bundle (1.2 MB) rather than the full one (4.8 MB).
    assert "plotly.js (basic - minified) v" in text
    assert len(text.encode()) < 2_000_000, len(text.encode())  # was 5-7 MB with the full bundle
    for plot in PLOTS:
        assert f'id="{plot}"' in text
    assert "as recorded" in text and "thermal_guard" in text


def test_the_vendored_bundle_is_the_plotly_packages_own_version() -> None:
    """`make vendor-plotly` fetched the bundle the installed plotly was built for: with another
    version the report falls back to the full bundle (and this fails, to say refresh it)."""
    from agent.replay.report import BUNDLE, _version, plotly_js, plotly_js_version

    vendored = (Path(__file__).parents[2] / "agent" / "replay" / "assets" / BUNDLE).read_text()
    assert _version(vendored) == plotly_js_version()
    assert plotly_js() == vendored


def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "report.png"
    # A fresh profile per launch; nothing but the file may be loaded.
    with open_page(report) as seen:
        page = seen.page
        for plot in PLOTS:
            page.wait_for_selector(f"#{plot} .main-svg", timeout=30_000)
        boxes = {p: page.locator(f"#{p}").bounding_box() for p in PLOTS}
        traces = page.locator("#plot-time .scatterlayer .trace").count()
        first = page.evaluate("document.querySelector('h1').nextElementSibling.id")
        verdict_box = page.locator("#verdict").bounding_box()
        verdict = page.locator("#verdict").inner_text()
        # Every row's time axis: where it starts on the page and how long it is (pixels).
        axes = page.evaluate(
            "(() => { const l = document.getElementById('plot-time')._fullLayout;"
            " return Object.keys(l).filter(k => /^xaxis\\d*$/.test(k))"
            ".map(k => [l[k]._offset, l[k]._length, l[k].range.map(String)]); })()"
        )
        page.screenshot(path=str(shot), full_page=True)
        power_png = page.locator("#plot-time").screenshot()
    assert seen.problems == []
    assert [u for u in seen.requests if not u.startswith("file://")] == []
    # The verdict opens the page: first after the title, in the first screenful, and it names
    # the winner of each criterion and the budget.
    assert first == "verdict"
    assert verdict_box is not None and verdict_box["y"] < 120 and verdict_box["height"] < 600
    assert re.match(r"Verdict\s+power_budget wins on energy and budget:", verdict), verdict
    for said in ("Energy: power_budget:", "Throughput:", "Budget: power_budget:", " W from 0h00"):
        assert said in verdict, (said, verdict)
    assert re.search(r"better in \d+ of 40 parameter draws", verdict), verdict
    assert len(axes) == 4 and len({(a[0], a[1], tuple(a[2])) for a in axes}) == 1, axes
    for plot, box in boxes.items():
        assert box is not None and box["width"] > 600 and box["height"] > 800, (plot, box)
    assert traces >= 12  # budget, recorded, and per set its lines and bands in every row
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


def test_an_uneventful_trace_says_why_its_plots_are_flat(tmp_path: Path) -> None:
    from agent.replay.engine import PolicySet, replay_trace
    from agent.replay.report import render_html
    from agent.replay.twin_trace import record_twin

    trace = tmp_path / "no-budget.parquet"
    record_twin(TwinSpec(nodes=2, gpus_per_node=4, seed=1), trace, duration_s=1200)
    report = replay_trace(trace, policy_sets=[PolicySet("power_budget", ("power_budget",))])
    page = render_html(report)
    verdict = page[page.index("<section id='verdict'>") : page.index("</section>")]
    assert "Budget: none." in verdict
    assert "The trace holds no budget and none was given" in verdict
    assert "No set changed a cap or a node: every line lies on the recording." in verdict
    assert "No set changes the outcome" in verdict


def test_a_long_trace_is_drawn_in_buckets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A day at 15 s is 5,760 points a line: drawn in buckets of at most MAX_POINTS, the budget
    at each bucket's lowest and the 90% band at its extremes (a bucket hides no excursion)."""
    from agent.replay import report as report_module
    from agent.replay.engine import PolicySet, replay_trace
    from agent.replay.twin_trace import record_twin

    spec = TwinSpec(nodes=2, gpus_per_node=4, seed=1, step_s=15.0)
    budget = 0.8 * uncapped_demand_w(spec, 1800)
    trace = tmp_path / "t.parquet"
    record_twin(replace(spec, budget=BudgetSchedule.constant(budget)), trace, duration_s=1800)
    report = replay_trace(trace, policy_sets=[PolicySet("power_budget", ("power_budget",))])
    monkeypatch.setattr(report_module, "MAX_POINTS", 25)
    fig = report_module.time_figure(report)
    tl = report.sets[0].timeline
    assert len(tl.time_s) == 120
    lines = [t for t in fig.data if t.mode != "markers" and t.fill != "toself"]
    assert lines and all(len(t.x) <= 25 for t in lines)
    (band,) = [t for t in fig.data if t.fill == "toself" and t.yaxis == "y"]
    assert max(band.y) == pytest.approx(max(tl.fleet_cf_hi_w))
    assert min(band.y) == pytest.approx(min(tl.fleet_cf_lo_w))
