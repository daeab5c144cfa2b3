"""Soak, bounded for CI (issue 9, part 4): 2,000 live cycles on the twin with random faults
(dropouts, XIDs, ECC, spikes, stragglers, a failing fan) and a cap actuator that fails at random;
no cycle raises, memory and open files stay flat, and the small audit log rotates within its
bound. `bench/soak.py` (run by `make bench`) is the same soak, longer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from agent.act.audit import read_records

BENCH = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def _soak_module() -> Any:
    spec = importlib.util.spec_from_file_location("ooda_bench_soak", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_soak_thousands_of_cycles_with_random_faults_no_crash_no_growth(tmp_path: Path) -> None:
    soak = _soak_module()
    summary = soak.run_soak(2000, tmp_path, seed=7, nodes=2, every=100, warmup=300)
    print(json.dumps(summary))
    assert summary["crashes"] == 0
    assert summary["failed_actuator_calls"] > 0  # the faults did happen
    assert summary["fd_growth"] <= 0, summary  # no file descriptor leaks
    assert summary["rss_peak_growth_mb"] < 25, summary
    assert summary["audit_files_max"] <= 3 + 1  # rotation keeps `keep` files and the live one
    assert summary["audit_bytes_max"] <= summary["audit_bound_bytes"]
    # The rotated trail reads back whole, and the agent acted throughout.
    records = list(read_records(tmp_path / "audit.jsonl"))
    assert records and all("event" in r for r in records)
    assert any(r["event"] == "action" and r["outcome"] == "failed" for r in records)
    assert any(r["event"] == "action" and r["outcome"] == "applied" for r in records)
