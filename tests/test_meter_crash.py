"""Acceptance: the ledger after 10 random SIGKILLs of `ooda run` equals the ledger of an
uninterrupted run over the same twin day.

The twin is the cluster here and survives restarts (its state file); on a virtual clock with
`twin.cycle_s`, every run reads it at the same twin times, so a run that restarts from an older
saved twin reads again what it had booked (the ledger's spans refuse it) and then books from
where its ledger stopped. A shortened day (2 twin hours, a reading a minute) keeps it quick."""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

from tests.daemon_helpers import DaemonProcess, write

END_S = 2 * 3600.0
KILLS = 10

CONFIG = """
dry_run = true
policies = {}

[source]
kind = "twin"

[cluster]
name = "metered"
node_overhead_w = 300.0

[twin]
nodes = 4
gpus_per_node = 8
seed = 21
cycle_s = 60.0

[daemon]
interval_s = 0.05
state_save_interval_s = 0.3

[meter]
enabled = true

[meter.tariff]
kind = "flat"
price_per_kwh = 0.2

[meter.carbon]
kind = "constant"
g_per_kwh = 300.0
"""


def cursor_s(ledger: Path) -> float:
    if not ledger.exists():
        return -1.0
    try:
        db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5.0)
        try:
            row = db.execute("SELECT time_s FROM cursor").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return -1.0
    return -1.0 if row is None else float(row[0])


def wait_cursor(proc: DaemonProcess, ledger: Path, past_s: float, timeout_s: float = 60.0) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        at = cursor_s(ledger)
        if at > past_s:
            return at
        assert proc.proc.poll() is None, proc.log_path.read_text()[-3000:]
        time.sleep(0.02)
    raise AssertionError(f"the ledger did not pass {past_s} s: {proc.log_path.read_text()[-3000:]}")


def run_to_the_end(config: Path, state: Path, log: Path) -> None:
    proc = DaemonProcess(config, state, log).started()
    try:
        wait_cursor(proc, state / "metered.ledger.sqlite", END_S, timeout_s=120.0)
        code, _ = proc.stop()
    finally:
        proc.kill()
    assert code == 0


def ledger_rows(path: Path) -> tuple[list[tuple[object, ...]], ...]:
    """What was booked up to END_S: usage, jobs and the live span's start."""
    db = sqlite3.connect(path)
    try:
        usage = db.execute(
            "SELECT bucket_s, job, partition, gpu_j, overhead_j, counter_j, power_j, gpu_s, cost, "
            "unpriced_j, co2_g, first_s FROM usage WHERE bucket_s < ? "
            "ORDER BY bucket_s, job, partition",
            (END_S,),
        ).fetchall()
        jobs = db.execute(
            "SELECT job, user, account, qos, start_s FROM jobs WHERE start_s < ? ORDER BY job",
            (END_S,),
        ).fetchall()
        spans = db.execute("SELECT t0_s, origin FROM spans ORDER BY t0_s").fetchall()
    finally:
        db.close()
    return usage, jobs, spans


def test_the_ledger_after_10_sigkills_equals_an_uninterrupted_runs(tmp_path: Path) -> None:
    config = write(tmp_path / "ooda.toml", CONFIG)
    run_to_the_end(config, tmp_path / "whole", tmp_path / "whole.log")

    state = tmp_path / "killed"
    ledger = state / "metered.ledger.sqlite"
    rng = random.Random(25)
    at = -1.0
    for k in range(KILLS):
        proc = DaemonProcess(config, state, tmp_path / f"killed-{k}.log").started()
        try:
            at = wait_cursor(proc, ledger, at)  # it books again before it dies
            time.sleep(rng.uniform(0.0, 0.6))  # a random moment of its cycles
        finally:
            proc.proc.kill()  # SIGKILL
            proc.kill()
        at = cursor_s(ledger)
        assert at < END_S, "the day ended before the tenth kill: make the cycles slower"
    run_to_the_end(config, state, tmp_path / "last.log")

    whole, killed = ledger_rows(tmp_path / "whole" / "metered.ledger.sqlite"), ledger_rows(ledger)
    assert killed[0] and killed[0] == whole[0]  # every bucket, to the last bit
    assert killed[1] == whole[1]
    assert killed[2] == whole[2] == [(60.0, "live")]  # one span, from the first reading: no gap
    restarts = sum(1 for p in tmp_path.glob("killed-*.log") if "state_restored" in p.read_text())
    assert restarts >= KILLS - 1  # each restart went on from the twin it had saved
    assert not list(state.glob("*.ledger.*.sqlite")), "no ledger was moved aside"
