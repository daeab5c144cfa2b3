"""Soak: thousands of live cycles on the twin with random faults, watching for growth.

The twin (4 nodes of 8 GPUs, a budget under its demand) gets random exporter dropouts, XIDs, ECC
errors, power spikes and stragglers over the whole run; the cap actuator in front of it fails at
random (whole calls raising, single GPUs refused). The audit log is small (`--audit-max-bytes`,
`--audit-keep`) so it rotates many times. Every `--every` cycles it samples the process's RSS,
its open file descriptors and the audit files (count and bytes).

Prints JSON lines: one per sample (`"sample": true`), then the summary: cycles, seconds,
cycles_per_s, crashes (cycles that raised), failed_actions, rss_mb (first sample after warm-up
and last), rss_growth_mb, fds (first, last), fd_growth, audit_files_max, audit_bytes_max,
audit_bound_bytes.

    python bench/soak.py --json [--cycles 10000] [--seed 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import re
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.act.audit import AuditLog, audit_files
from agent.assembly import assemble
from agent.config import parse_config
from agent.core.errors import GpuLostError
from agent.core.intents import GpuTargets
from agent.core.protocols import CapActuator, CapResult

FloatArray = np.ndarray[Any, np.dtype[np.float64]]
NODES = 4
INTERVAL_S = 15.0


def random_faults(rng: random.Random, cycles: int, nodes: int) -> list[str]:
    """About one fault per 40 cycles, spread over the run."""
    horizon_s = cycles * INTERVAL_S
    faults = []
    for _ in range(max(4, cycles // 40)):
        kind = rng.choice(["dropout", "dropout", "xid", "ecc", "spike", "straggler", "fan"])
        node = rng.randrange(1, nodes + 1)
        start = rng.uniform(0, horizon_s)
        duration = rng.uniform(30, 900)
        target = f"node{node}" if kind == "dropout" else f"node{node}/gpu{rng.randrange(8)}"
        param = {"xid": f"={rng.choice([13, 31, 48, 63, 79])}"}.get(kind, "")
        faults.append(f"{kind}{param}:{target}@{start:.0f}+{duration:.0f}")
    return faults


class FlakyCaps:
    """The twin's cap actuator behind the same protocol, failing at random: a whole call raises
    (a node daemon gone), or some GPUs are refused (an NVML error on them)."""

    def __init__(self, inner: CapActuator, rng: random.Random, p_call: float, p_gpu: float):
        self.inner, self.rng, self.p_call, self.p_gpu = inner, rng, p_call, p_gpu
        self.failures = 0

    def _maybe(self, n: int, result: CapResult) -> CapResult:
        refused = np.array([self.rng.random() < self.p_gpu for _ in range(n)], dtype=bool)
        if not refused.any():
            return result
        self.failures += int(refused.sum())
        errors = dict(result.errors)
        for i in np.flatnonzero(refused):
            errors[int(i)] = "NVML_ERROR_UNKNOWN (soak)"
        return CapResult(ok=result.ok & ~refused, before_w=result.before_w, errors=errors)

    def set_caps(self, targets: GpuTargets, watts: FloatArray, lease_s: float) -> CapResult:
        if self.rng.random() < self.p_call:
            self.failures += 1
            raise GpuLostError("soak: the node daemon went away")
        return self._maybe(len(targets), self.inner.set_caps(targets, watts, lease_s))

    def release_caps(self, targets: GpuTargets) -> CapResult:
        if self.rng.random() < self.p_call:
            self.failures += 1
            raise GpuLostError("soak: the node daemon went away")
        return self._maybe(len(targets), self.inner.release_caps(targets))


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run_soak(
    cycles: int,
    workdir: Path,
    *,
    seed: int = 1,
    nodes: int = NODES,
    every: int = 250,
    audit_max_bytes: int = 64 * 1024,
    audit_keep: int = 3,
    warmup: int = 200,
    emit: Any = None,
) -> dict[str, Any]:
    rng = random.Random(seed)
    text = f"""
dry_run = false
[cluster]
name = "soak"
budget_w = {nodes * 8 * 450.0}
[twin]
nodes = {nodes}
gpus_per_node = 8
seed = {seed}
faults = {json.dumps(random_faults(rng, cycles, nodes))}
[daemon]
interval_s = {INTERVAL_S}
state_dir = "{workdir / "state"}"
"""
    config = parse_config(tomllib.loads(text))
    audit_path = workdir / "audit.jsonl"
    audit = AuditLog(path=audit_path, max_bytes=audit_max_bytes, keep=audit_keep)
    runtime = assemble(config, audit=audit)
    assert runtime.actuators.caps is not None and runtime.twin is not None
    caps = FlakyCaps(runtime.actuators.caps, rng, p_call=0.02, p_gpu=0.02)
    runtime.actuators.caps = caps
    twin = runtime.twin
    crashes = 0
    samples: list[dict[str, Any]] = []
    files_max = bytes_max = 0
    t0 = time.perf_counter()
    for k in range(1, cycles + 1):
        twin.step(INTERVAL_S)
        try:
            runtime.loop.cycle()
        except Exception as exc:  # counted, never fatal: a crash is what the soak looks for
            crashes += 1
            print(f"cycle {k} raised {type(exc).__name__}: {exc}", file=sys.stderr)
        if k % every == 0 or k == cycles:
            files = audit_files(audit_path)
            n_bytes = sum(f.stat().st_size for f in files)
            files_max, bytes_max = max(files_max, len(files)), max(bytes_max, n_bytes)
            gc.collect()
            sample = {
                "sample": True,
                "cycle": k,
                "rss_mb": round(rss_mb(), 1),
                "fds": open_fds(),
                "audit_files": len(files),
                "audit_bytes": n_bytes,
            }
            samples.append(sample)
            if emit is not None:
                emit(sample)
    seconds = time.perf_counter() - t0
    runtime.close()
    after = [s for s in samples if s["cycle"] >= warmup] or samples
    summary = {
        "cycles": cycles,
        "seconds": round(seconds, 2),
        "cycles_per_s": round(cycles / seconds, 1),
        "crashes": crashes,
        "failed_actuator_calls": caps.failures,
        "rss_mb": [after[0]["rss_mb"], after[-1]["rss_mb"]],
        "rss_growth_mb": round(after[-1]["rss_mb"] - after[0]["rss_mb"], 1),
        "rss_peak_growth_mb": round(max(s["rss_mb"] for s in after) - after[0]["rss_mb"], 1),
        "fds": [after[0]["fds"], after[-1]["fds"]],
        "fd_growth": after[-1]["fds"] - after[0]["fds"],
        "audit_files_max": files_max,
        "audit_bytes_max": bytes_max,
        # Rotation keeps `keep` old files plus the live one, each at most max_bytes (a record
        # larger than that gets a file of its own: allow one record's slack per file).
        "audit_bound_bytes": (audit_keep + 1) * (audit_max_bytes + 64 * 1024),
    }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=NODES)
    parser.add_argument("--json", action="store_true", help="JSON lines (the default output)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    with tempfile.TemporaryDirectory(prefix="ooda-soak-") as tmp:
        summary = run_soak(
            args.cycles,
            Path(tmp),
            seed=args.seed,
            nodes=args.nodes,
            every=args.every,
            emit=lambda s: print(json.dumps(s), flush=True),
        )
    print(json.dumps(summary), flush=True)
    return 1 if summary["crashes"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
