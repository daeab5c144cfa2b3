"""Replay straight from Prometheus: the range is recorded into a temporary trace with the same
range queries `ooda record` makes (agent/observe/record.py), replayed, and removed."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.assembly import prometheus_settings as settings_of
from agent.config import Config, parse_config
from agent.observe.prometheus import PrometheusSource
from agent.observe.record import RecordStats, record_prometheus
from agent.observe.trace import TraceReader, TraceSummary, TraceWriter
from agent.replay.engine import ReplayReport, replay_trace


def prometheus_config(url: str, config: Config | None) -> Config:
    """The configuration with its source pointed at `url` (metric names, matchers and the
    budget query stay the configuration's)."""
    if config is None:
        return parse_config({"source": {"kind": "prometheus", "prometheus": {"url": url}}})
    merged: dict[str, Any] = config.model_dump(exclude={"policy_settings"}, exclude_unset=True)
    merged.setdefault("source", {}).setdefault("prometheus", {})["url"] = url
    merged["source"]["kind"] = "prometheus"
    for name in ("caps", "placement"):  # replay acts on nothing: no actuator is needed
        merged.setdefault("actuators", {})[name] = "none"
    return parse_config(merged, source="--config")


def record_range(
    config: Config,
    path: Path,
    *,
    start_s: float,
    end_s: float,
    step_s: float,
    progress: Callable[[float], None] | None = None,
) -> tuple[RecordStats, TraceSummary]:
    """Record [start_s, end_s] from the configured Prometheus into the trace at `path`, the
    group label with each GPU (per-group budgets in replay): what it queried and what it wrote.
    `ooda record` and `ooda replay --prometheus` both record here. A trace that failed part way
    is removed (a file that could not be opened is left as it was)."""
    settings = settings_of(config)
    source = PrometheusSource(settings)
    opened = False
    try:
        with TraceWriter(
            path,
            time_base="unix",
            step_s=step_s,
            source={
                "kind": "prometheus",
                "url": settings.url,
                "metrics": {str(k): v for k, v in settings.metrics.items()},
                "budget_query": settings.budget_query,
            },
            metrics=list(source.value_metrics.values()),
            labels=settings.extra_labels,
        ) as writer:
            opened = True
            stats = record_prometheus(
                source, writer, start_s=start_s, end_s=end_s, step_s=step_s, progress=progress
            )
            return stats, writer.close()
    except BaseException:  # a failure, a bug, Ctrl-C: no partial trace left
        if opened:
            path.unlink(missing_ok=True)
        raise
    finally:
        source.close()


def replay_prometheus(
    config: Config,
    *,
    start_s: float,
    end_s: float,
    step_s: float,
    record_progress: Callable[[float], None] | None = None,
    **replay_args: Any,
) -> ReplayReport:
    """Record the range to a temporary trace, replay it (see `replay_trace`), remove it."""
    with tempfile.TemporaryDirectory(prefix="ooda-replay-") as tmp:
        path = Path(tmp) / "range.parquet"
        record_range(
            config, path, start_s=start_s, end_s=end_s, step_s=step_s, progress=record_progress
        )
        report = replay_trace(TraceReader(path), config=config, **replay_args)
        report.trace = f"{settings_of(config).url} [{start_s:.0f}, {end_s:.0f}]"
        return report
