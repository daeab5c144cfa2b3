"""Typed settings of the orient models (the `[orient]` section of the configuration)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from agent.core.settings import STRICT_SETTINGS


class _Section(BaseModel):
    model_config = STRICT_SETTINGS


class AnomalySettings(_Section):
    z_threshold: float = Field(
        6.0, gt=0, description="Robust z-score at which a single-metric baseline flags."
    )
    baseline_halflife_n: float = Field(
        60.0, gt=0, description="Half-life of the per-GPU baselines (samples)."
    )
    warmup_s: float = Field(
        180.0, ge=0, description="A job's start-up, when its draw says little (s)."
    )
    power_rel_floor: float = Field(
        0.015, gt=0, description="Least relative scale of a GPU's draw (share of its level)."
    )
    over_cap_tol_frac: float = Field(
        0.03, ge=0, description="A draw this far (share) above the enforced limit is flagged."
    )
    over_cap_tol_w: float = Field(5.0, ge=0, description="... plus this many watts (W).")
    temp_rel_floor: float = Field(
        0.03,
        gt=0,
        description="Least scale of a GPU's thermal resistance relative to the fleet's (share).",
    )
    hot_peer_excess: float = Field(
        0.3,
        gt=0,
        description="Thermal resistance this much (share) above the node's or rack's median "
        "flags a GPU as hotter than its neighbours at the same load.",
    )
    straggler_frac: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="A GPU whose SM clock is this share below its job peers' median (at the "
        "same draw, through the job's curve) straggles.",
    )
    straggler_self_frac: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="... or this share below what its own curve expects at its draw.",
    )
    util_drop_pct: float = Field(
        20.0, gt=0, description="Utilization this many points under its baseline is flagged."
    )
    dropout_min_frac: float = Field(
        0.5,
        gt=0,
        description="Telemetry older than its usual age by this share of the cycle interval "
        "(or 4 scales) flags a dropout.",
    )
    multivariate: bool = Field(
        True, description="Run the multivariate model (robust covariance over residuals)."
    )
    refit_cycles: int = Field(
        40, ge=1, description="Refit the pooled thermal and multivariate models this often."
    )
    persistent_cycles: int = Field(
        4, ge=1, description="A flag held this many consecutive cycles is persistent."
    )
    calibrate: bool = Field(
        True,
        description="Judge each GPU's residuals (power, temperature, clock, utilization) "
        "against their own history (agent.orient.stream): a baseline's flag stands only where "
        "the residual is also rare for that GPU, so swings that are its normal life "
        "(checkpoint stalls, bursts) stop alarming once seen. False: the thresholds alone.",
    )
    alarm_p: float = Field(
        1e-3,
        gt=0,
        lt=1,
        description="Sensitivity: the tail probability (per cycle, over the residual's "
        "statistics) under which a GPU's residual counts as rare. Lower: fewer alarms.",
    )
    calibration_warmup_cycles: int = Field(
        20,
        ge=1,
        description="Cycles a GPU's residuals teach before calibration judges them (until "
        "then the baselines' thresholds alone decide).",
    )
    calm_cycles: int = Field(
        8, ge=1, description="An alarm closes after this many calm cycles in a row."
    )
    rhythm: bool = Field(
        False,
        description="Learn each GPU's daily and weekly rhythm of its residuals (48 bins a "
        "day: about 1.2 KB more state per GPU and field).",
    )
    alarms_per_hour: float = Field(
        6.0,
        gt=0,
        description="Per-GPU alarm rate limit: new statistical alarms a GPU may open per hour "
        "(limits, dropouts and health alarms are never held).",
    )
    alarm_burst: float = Field(
        3.0, ge=1, description="... and at once, after a quiet spell (the bucket's size)."
    )


class HealthSettings(_Section):
    watch_hold_s: float = Field(
        3600.0, gt=0, description="A watch condition (e.g. XID 13, 63) is held this long (s)."
    )
    restart_hold_s: float = Field(
        900.0,
        gt=0,
        description="A restart-the-job condition (XID 94) on a GPU without a job label is "
        "held this long (s); with a label, until the job changes.",
    )


class ForecastSettings(_Section):
    enabled: bool = Field(
        True, description="Forecast fleet and node power (false: no forecast, and no cost)."
    )
    # (No "huber": it was accepted once and silently built trees; an unknown name is refused.)
    model: Literal["hgb", "ridge"] = Field(
        "hgb",
        description="The learned model: gradient-boosted trees (hgb) or a linear ridge model.",
    )
    horizons_s: tuple[float, ...] = Field(
        (60.0, 300.0, 900.0), min_length=1, strict=False, description="Forecast horizons (s)."
    )
    coverage: float = Field(0.9, gt=0, lt=1, description="Nominal coverage of the intervals.")
    refit_cycles: int = Field(
        60, ge=1, description="Refit each horizon's model this often (cycles)."
    )
    min_train_rows: int = Field(
        200, ge=10, description="Rows a model needs before it may replace persistence."
    )
    train_rows: int = Field(20000, ge=100, description="Rows kept per horizon for training.")
    nodes_per_cycle: int = Field(
        64, ge=1, description="Nodes sampled into the training set each cycle."
    )


class CurveSettings(_Section):
    apply: bool = Field(
        True,
        description="Give policies the learned curves (false: learn and report them, but "
        "policies keep the conservative prior).",
    )
    workload_label: str = Field(
        "workload",
        description="Telemetry label naming a job's workload class (priors per GPU model and "
        "class); without it the class is inferred from the job's telemetry signature.",
    )
    learned_confidence: float = Field(
        0.5, ge=0, le=1, description="Confidence from which a curve counts as learned."
    )
    forget_per_cycle: float = Field(
        0.998, gt=0, le=1, description="Old observations of a curve fade by this per cycle."
    )
    job_forget_s: float = Field(
        3600.0, gt=0, description="A job not seen for this long is forgotten (s)."
    )


class OrientSettings(_Section):
    slow_models_every_cycles: int = Field(
        1,
        ge=1,
        le=60,
        description="Run the anomaly detectors and the curve learner every Nth cycle, reusing "
        "their last findings in between (1: every cycle; replay uses more to run faster).",
    )
    anomaly: AnomalySettings = Field(default_factory=AnomalySettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    forecast: ForecastSettings = Field(default_factory=ForecastSettings)
    curves: CurveSettings = Field(default_factory=CurveSettings)
