"""A trace as OpenMetrics text in dcgm-exporter's names and labels, for
`promtool tsdb create-blocks-from openmetrics FILE DIR` (how tests load a trace into a real
Prometheus). Text is large (about 200 bytes a sample): meant for small traces.

Each metric family is written whole (OpenMetrics forbids interleaving families); within a family,
each series' samples are in time order, as promtool requires. Missing and stale samples are left
out. The file ends with `# EOF`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from agent.core.dcgm import (
    DCGM_FIELDS,
    LABEL_DEVICE,
    LABEL_GPU,
    LABEL_HOST,
    LABEL_JOB,
    LABEL_MODEL,
    LABEL_UUID,
    escape_label_value,
    format_values,
)
from agent.core.snapshot import Metric
from agent.observe.trace import TraceReader


def write_openmetrics(
    path: Path, out: TextIO, *, offset_s: float = 0.0, metrics: Sequence[Metric] | None = None
) -> int:
    """Write the trace at `path` to `out`, times shifted by `offset_s`. Returns the samples."""
    meta = TraceReader(path).meta
    wanted = [f for f in DCGM_FIELDS if f.metric in meta.metrics]
    if metrics is not None:
        wanted = [f for f in wanted if f.metric in metrics]
    samples = 0
    for f in wanted:
        reader = TraceReader(path, metrics=(f.metric,))
        out.write(f"# HELP {f.name} {f.help}\n# TYPE {f.name} {f.kind}\n")
        for block in reader.blocks():
            values = np.asarray(block.values[f.metric], dtype=np.float64) / f.to_metric
            ok = np.isfinite(values) & ~block.stale
            stamps = [f"{t + offset_s:.3f}" for t in block.time_s.tolist()]
            for i in range(block.n_gpus):
                rows = np.flatnonzero(ok[:, i])
                if rows.size == 0:
                    continue
                gpu = int(block.gpu[i])
                base = (
                    f'{f.name}{{{LABEL_HOST}="{escape_label_value(str(block.node[i]))}",'
                    f'{LABEL_GPU}="{gpu}",{LABEL_UUID}="{escape_label_value(str(block.uuid[i]))}",'
                    f'{LABEL_MODEL}="{escape_label_value(str(block.model[i]))}",'
                    f'{LABEL_DEVICE}="nvidia{gpu}"'
                )
                texts = format_values(values[rows, i], f.integer)
                jobs = block.job[rows, i].tolist()
                out.writelines(
                    f'{base},{LABEL_JOB}="{escape_label_value(job)}"}} {text} {stamps[j]}\n'
                    if job
                    else f"{base}}} {text} {stamps[j]}\n"
                    for j, job, text in zip(rows.tolist(), jobs, texts, strict=True)
                )
                samples += rows.size
    out.write("# EOF\n")
    return samples
