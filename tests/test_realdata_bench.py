"""bench/realdata.py's wiring: `ooda detect`'s rows for a few NAB development files, scored by
the shared NAB scorer in binary mode (skipped where ../shared is absent, as in a CI clone), and
the bench's own message when the data is not there."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
NAB = SHARED / "data" / "nab-dev"
FILES = (
    "artificialWithAnomaly/art_daily_jumpsup.csv",
    "artificialNoAnomaly/art_daily_small_noise.csv",
    "realTraffic/speed_7578.csv",
)


def run_bench(*args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "realdata.py"), "--json", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    out: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.skipif(not (NAB / "data").is_dir(), reason=f"no NAB data under {NAB}")
def test_a_few_nab_files_are_scored_by_the_shared_scorer(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    corpus = shared / "data" / "nab-dev"
    for name in FILES:
        (corpus / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(NAB / "data" / name, corpus / "data" / name)
    windows = json.loads((NAB / "labels" / "combined_windows.json").read_text())
    (corpus / "labels").mkdir()
    subset = {name: windows[name] for name in FILES}
    (corpus / "labels" / "combined_windows.json").write_text(json.dumps(subset))
    shutil.copytree(NAB / "config", corpus / "config")
    (shared / "eval").symlink_to(SHARED / "eval")
    line = run_bench("--shared", str(shared), "--only", "detect")
    assert line["corpus"] == "nab-dev" and line["mode"] == "binary"
    assert line["files"] == len(FILES)
    n_windows = sum(len(w) for w in subset.values())
    assert line["windows"] == n_windows and line["tp"] + line["fn"] == n_windows  # type: ignore[operator]
    # The jump up (a daily peak twice as high) is found; the noise-only file raises nothing.
    assert line["tp"] >= 1 and line["standard"] > 0  # type: ignore[operator]


def test_without_the_data_the_bench_says_so(tmp_path: Path) -> None:
    line = run_bench("--shared", str(tmp_path / "nowhere"), "--only", "detect")
    assert line["corpus"] == "nab-dev" and "no NAB data" in str(line["skipped"])
