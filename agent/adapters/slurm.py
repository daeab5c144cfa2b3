"""Slurm as the placement actuator (kind `slurm`, its section `[actuators.slurm]`): drains,
resumes, weights, features and requeues, and the job table every GPU's job and priority come
from."""

from __future__ import annotations

from typing import Any

from agent.act.slurm import SlurmPlacement, SlurmSettings
from agent.adapters.table import ActuatorKind, BuildContext
from agent.core.errors import ConfigError
from agent.core.protocols import TelemetrySource
from agent.observe.job_labels import JobLabelledSource


def slurm_placement(settings: SlurmSettings, _ctx: BuildContext | None = None) -> SlurmPlacement:
    """The Slurm actuator, after checking that what the config names exists."""
    if settings.slurm_conf is not None and not settings.slurm_conf.is_file():
        raise ConfigError(f"actuators.slurm.slurm_conf: no such file {settings.slurm_conf}")
    if settings.bin_dir is not None:
        missing = [
            tool
            for tool in ("scontrol", "sinfo", "squeue")
            if not (settings.bin_dir / tool).exists()
        ]
        if missing:
            raise ConfigError(
                f"actuators.slurm.bin_dir: {', '.join(missing)} not found in {settings.bin_dir}"
            )
    return SlurmPlacement(settings)


def _label_jobs(
    source: TelemetrySource, slurm: Any, section: SlurmSettings, ctx: BuildContext
) -> TelemetrySource:
    """GPUs labelled with Slurm's jobs and priorities (the twin mirroring Slurm has them)."""
    if ctx.mirrored:
        return source
    shares = slurm if ctx.account_shares else None  # Slurm's fairshare, for power_budget
    return JobLabelledSource(source, slurm, section.default_priority, shares=shares)


SLURM_PLACEMENT = ActuatorKind(
    name="slurm",
    role="placement",
    description="Slurm: drains, weights, features, requeues, and its job table "
    "([actuators.slurm]).",
    build=slurm_placement,
    Settings=SlurmSettings,
    wrap_source=_label_jobs,
)
