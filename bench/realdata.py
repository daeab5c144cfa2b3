"""Orient on real, labelled telemetry nobody on this team wrote: `ooda detect` and `ooda
forecast` on the NAB development corpus, scored by the shared scorers (NAB v1.1's rules, binary
mode: the alarms as a fixed threshold raises them), and a normal twin day's alarm rate.

One JSON line per corpus (`--json`), e.g.

    {"corpus": "nab-dev", "standard": 74.7, "reward_low_FP": 66.0, "reward_low_FN": 79.7,
     "tp": 60, "fp": 109, "fn": 7, "mase_h1": 0.863, "mase_h12": 0.757, ...}
    {"corpus": "twin-normal-day", "alarms_per_1000_gpu_h": ..., "anomaly_actions": 0, ...}

The data and scorers are `../shared/data/nab-dev` and `../shared/eval/` beside the repository
(or `--shared DIR`); without them the line says so and the bench exits 0 (a CI clone may not
carry them). `ooda detect`'s rows are computed as the command computes them, all files at once
(the detector is columnar: a file's rows are the same alone or beside others) and written
with its own writer; the scorers run as their own processes on those files.

The `twin-normal-day` line runs the twin's normal day (normal-but-surprising phases and no
fault: every alarm is a false one, every action an anomaly causes a mistake) through the live
loop (agent.replay.normal_day).

`--robustness` runs the detection again with each setting of agent.orient.stream.StreamParams
at 0.7x and 1.3x its default (one line each): how much the score hangs on each choice.

    python bench/realdata.py --json                  # minutes (the twin's day most of it)
    python bench/realdata.py --json --only detect --robustness
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHARED = ROOT.parent / "shared"
CORPUS = "nab-dev"
TWIN_CORPUS = "twin-normal-day"
HORIZONS = (1, 12)


def emit(obj: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj), flush=True)
    else:
        print("  ".join(f"{k}={v}" for k, v in obj.items()), flush=True)


def corpus_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "data").glob("*/*.csv"))


def last_json(text: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
    return out


def read_all(files: list[Path]) -> list[Any]:
    from agent.cli.detect import read_series

    return [read_series(path, "timestamp", "value") for path in files]


def detect_all(series: list[Any], params: Any) -> list[Any]:
    """Every file's rows through the detector at once (rows past a file's end not valid)."""
    from agent.orient.stream import SeriesResult, detect_series

    rows = max(len(s.values) for s in series)
    t = np.full((rows, len(series)), np.nan)
    x = np.full((rows, len(series)), np.nan)
    for j, s in enumerate(series):
        t[: len(s.times), j] = s.times
        x[: len(s.values), j] = s.values
    result = detect_series(t, x, np.isfinite(x), params=params)
    return [
        SeriesResult(
            **{
                f.name: getattr(result, f.name)[: len(s.values), j]
                for f in dataclasses.fields(result)
            }
        )
        for j, s in enumerate(series)
    ]


def nab_scores(
    data_dir: Path, eval_dir: Path, files: list[Path], series: list[Any], params: Any
) -> dict[str, Any]:
    from agent.cli.detect import write_detections

    results = detect_all(series, params)
    with tempfile.TemporaryDirectory(prefix="ooda-nab-") as tmp:
        for path, s, r in zip(files, series, results, strict=True):
            out = Path(tmp) / path.relative_to(data_dir / "data")
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("w", newline="") as handle:
                write_detections(handle, s, r)
        done = subprocess.run(
            [
                sys.executable,
                str(eval_dir / "nab_score.py"),
                "--data-dir",
                str(data_dir),
                "--detections",
                tmp,
                "--mode",
                "binary",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    scored = last_json(done.stdout)
    return {
        k: scored[k]
        for k in (
            "standard",
            "reward_low_FP",
            "reward_low_FN",
            "tp",
            "fp",
            "fn",
            "files",
            "windows",
        )
    }


def forecast_mase(
    data_dir: Path, eval_dir: Path, files: list[Path], series: list[Any]
) -> dict[str, Any]:
    from agent.cli.detect import write_forecasts
    from agent.orient.forecast import forecast_series

    out: dict[str, Any] = {}
    for h in HORIZONS:
        with tempfile.TemporaryDirectory(prefix="ooda-forecast-") as tmp:
            for path, s in zip(files, series, strict=True):
                predicted = forecast_series(np.asarray(s.values, dtype=np.float64), h)
                target = Path(tmp) / path.relative_to(data_dir / "data")
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("w", newline="") as handle:
                    write_forecasts(handle, s, predicted.tolist())
            done = subprocess.run(
                [
                    sys.executable,
                    str(eval_dir / "forecast_score.py"),
                    "--data-dir",
                    str(data_dir),
                    "--forecasts",
                    tmp,
                    "--horizon",
                    str(h),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
        scored = last_json(done.stdout)
        out[f"mase_h{h}"] = scored["mase_geomean"]
        out[f"mase_h{h}_worse_than_persistence"] = scored["worse_than_naive"]
        out["forecast_series"] = scored["series"]
    return out


def varied(params: Any) -> list[tuple[str, float, Any]]:
    """Each numeric setting at 0.7x and 1.3x (integers rounded, at least 1)."""
    out = []
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if isinstance(value, bool) or not isinstance(value, int | float | tuple):
            continue
        for factor in (0.7, 1.3):
            if isinstance(value, tuple):
                new: Any = tuple(v * factor for v in value)
            elif isinstance(value, int):
                new = max(1, round(value * factor))
            elif math.isfinite(value):
                new = value * factor
            else:
                continue
            out.append((f.name, factor, dataclasses.replace(params, **{f.name: new})))
    return out


def bench_nab(shared: Path, only: set[str], robustness: bool, as_json: bool) -> None:
    from agent.orient.stream import StreamParams

    data_dir = shared / "data" / CORPUS
    eval_dir = shared / "eval"
    if not (data_dir / "data").is_dir() or not (eval_dir / "nab_score.py").is_file():
        emit(
            {"corpus": CORPUS, "skipped": f"no NAB data and scorers under {shared} (--shared DIR)"},
            as_json,
        )
        return
    files = corpus_files(data_dir)
    series = read_all(files)
    params = StreamParams()
    line: dict[str, Any] = {"corpus": CORPUS, "data": str(data_dir), "scorer": str(eval_dir)}
    if "detect" in only:
        t0 = time.perf_counter()
        line.update(nab_scores(data_dir, eval_dir, files, series, params))
        line["mode"] = "binary"
        line["threshold_p"] = params.alarm_p
        line["detect_s"] = round(time.perf_counter() - t0, 1)
    if "forecast" in only:
        line.update(forecast_mase(data_dir, eval_dir, files, series))
    emit(line, as_json)
    if robustness:
        for name, factor, p in varied(params):
            scored = nab_scores(data_dir, eval_dir, files, series, p)
            emit(
                {
                    "corpus": CORPUS,
                    "setting": name,
                    "factor": factor,
                    "value": getattr(p, name),
                    **scored,
                },
                as_json,
            )


def bench_twin(hours: float, nodes: int, as_json: bool) -> None:
    """The twin's normal day (agent.replay.normal_day: normal-but-surprising phases, no fault)
    through the live loop: alarms and actions per 1,000 GPU-hours."""
    from agent.replay.normal_day import NormalDayOptions, run_normal_day

    out = run_normal_day(NormalDayOptions(hours=hours, nodes=nodes))
    keys = (
        "corpus",
        "gpus",
        "hours",
        "gpu_hours",
        "alarms",
        "alarms_per_1000_gpu_h",
        "alarm_kinds",
        "actions_per_1000_gpu_h",
        "anomaly_actions",
        "anomaly_actions_per_1000_gpu_h",
    )
    line = {k: out[k] for k in keys if k in out}
    line["alarms_by_phase"] = {p: v.get("alarms") for p, v in out.get("by_phase", {}).items()}
    emit(line, as_json)


def main() -> None:
    # Logs (the twin's day logs the guard's alarms, say) go to stderr: stdout is JSON lines.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=lambda *_args: structlog.PrintLogger(sys.stderr),
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--only", choices=["detect", "forecast", "twin"], action="append")
    parser.add_argument("--twin-hours", type=float, default=24.0, help="the twin's normal day")
    parser.add_argument("--twin-nodes", type=int, default=8, help="... of 8 GPUs each")
    parser.add_argument(
        "--shared", type=Path, default=DEFAULT_SHARED, help="the shared folder (data/, eval/)"
    )
    parser.add_argument(
        "--robustness", action="store_true", help="each detector setting at 0.7x and 1.3x"
    )
    args = parser.parse_args()
    only = set(args.only or ["detect", "forecast", "twin"])
    if only & {"detect", "forecast"}:
        bench_nab(args.shared.resolve(), only, args.robustness, args.json)
    if "twin" in only:
        bench_twin(args.twin_hours, args.twin_nodes, args.json)


if __name__ == "__main__":
    main()
