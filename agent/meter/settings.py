"""`[meter]`: the energy ledger, and `[meter.tariff]`, `[meter.carbon]`: price and carbon.

```toml
[meter]
enabled = true            # book every cycle's energy into the ledger
# ledger = "ledger.sqlite" (default <daemon.state_dir>/<cluster>.ledger.sqlite)

[meter.tariff]            # flat, time_of_use, promql or none
kind = "time_of_use"
price_per_kwh = 0.18      # outside every period (and the flat price)
currency = "EUR"
timezone = "Europe/Berlin"
[[meter.tariff.periods]]
days = ["mon", "tue", "wed", "thu", "fri"]
start = "08:00"
end = "20:00"
price_per_kwh = 0.31

[meter.carbon]            # constant, schedule, promql or none
kind = "constant"
g_per_kwh = 380.0
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, field_validator, model_validator

from agent.core.settings import STRICT_SETTINGS
from agent.meter.booking import EnergySource
from agent.meter.pricing import (
    DAYS,
    MAX_G_PER_KWH,
    Constant,
    Schedule,
    Signal,
    TimeOfUse,
    load_schedule,
    parse_clock,
)

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
EVERY_DAY: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class _Settings(BaseModel):
    model_config = STRICT_SETTINGS


class TouPeriod(_Settings):
    days: list[Day] = Field(
        default_factory=lambda: list(EVERY_DAY), min_length=1, description="Weekdays it applies on."
    )
    start: str = Field(..., description="Local time it starts, HH:MM.")
    end: str = Field(
        ..., description="Local time it ends (not included), HH:MM; 24:00 ends the day."
    )
    price_per_kwh: float = Field(..., ge=0, description="Price of a kWh in it.")

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        parse_clock(value)
        return value

    @model_validator(mode="after")
    def _forward(self) -> TouPeriod:
        if parse_clock(self.end) <= parse_clock(self.start):
            raise ValueError(
                f"end {self.end} must come after start {self.start} (a period over midnight is "
                "two periods)"
            )
        return self


def _zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (e.g. UTC, Europe/Berlin)") from None
    return value


class TariffSettings(_Settings):
    kind: Literal["none", "flat", "time_of_use", "promql"] = Field(
        "none",
        description="How a kWh is priced: none (no cost is booked), flat, a "
        "time-of-use table, or a PromQL price signal.",
    )
    price_per_kwh: float | None = Field(
        None, ge=0, description="flat: the price of a kWh; time_of_use: outside every period."
    )
    currency: str = Field("", max_length=16, description="A label for reports, e.g. EUR.")
    timezone: str = Field("UTC", description="The time zone of the periods' local times.")
    periods: list[TouPeriod] = Field(
        default_factory=list, description="time_of_use: the first period holding a time wins."
    )
    query: str | None = Field(
        None, min_length=1, description="promql: a query giving the price of a kWh."
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        return _zone(value)

    @model_validator(mode="after")
    def _complete(self) -> TariffSettings:
        if self.kind in ("flat", "time_of_use") and self.price_per_kwh is None:
            raise ValueError(f"kind = {self.kind!r} needs price_per_kwh")
        if self.kind == "time_of_use" and not self.periods:
            raise ValueError("kind = 'time_of_use' needs periods")
        if self.kind == "promql" and self.query is None:
            raise ValueError("kind = 'promql' needs query")
        return self

    def signal(self) -> Signal | None:
        """The price signal, or None: a PromQL one, which only the wiring can build."""
        if self.kind == "none":
            return Constant(None)
        if self.kind == "flat":
            return Constant(self.price_per_kwh)
        if self.kind == "time_of_use":
            assert self.price_per_kwh is not None  # checked above
            periods = [
                (
                    frozenset(DAYS.index(d) for d in p.days),
                    parse_clock(p.start),
                    parse_clock(p.end),
                    p.price_per_kwh,
                )
                for p in self.periods
            ]
            return TimeOfUse(periods, self.price_per_kwh, self.timezone)
        return None


class CarbonSettings(_Settings):
    kind: Literal["none", "constant", "schedule", "promql"] = Field(
        "none",
        description="The grid's carbon intensity: none, a constant, a schedule file or "
        "a PromQL signal.",
    )
    g_per_kwh: float | None = Field(
        None, ge=0, le=MAX_G_PER_KWH, description="constant: grams of CO2e per kWh."
    )
    schedule_file: Path | None = Field(
        None,
        strict=False,
        description="schedule: a CSV `time,g_per_kwh` (Unix seconds or ISO 8601 with a zone); "
        "each value holds until the next row's time.",
    )
    query: str | None = Field(
        None, min_length=1, description="promql: a query giving grams of CO2e per kWh."
    )

    @model_validator(mode="after")
    def _complete(self) -> CarbonSettings:
        if self.kind == "constant" and self.g_per_kwh is None:
            raise ValueError("kind = 'constant' needs g_per_kwh")
        if self.kind == "schedule":
            if self.schedule_file is None:
                raise ValueError("kind = 'schedule' needs schedule_file")
            load_schedule(self.schedule_file)  # read now: `ooda config check` says what is wrong
        if self.kind == "promql" and self.query is None:
            raise ValueError("kind = 'promql' needs query")
        return self

    def signal(self) -> Signal | None:
        if self.kind == "none":
            return Constant(None)
        if self.kind == "constant":
            return Constant(self.g_per_kwh)
        if self.kind == "schedule":
            assert self.schedule_file is not None
            schedule: Schedule = load_schedule(self.schedule_file)
            return schedule
        return None


class MeterSettings(_Settings):
    enabled: bool = Field(
        False, description="Book every cycle's energy per job, user, account into the ledger."
    )
    ledger: Path | None = Field(
        None,
        strict=False,
        description="The ledger (SQLite); a relative path is under daemon.state_dir (default "
        "<cluster>.ledger.sqlite there).",
    )
    energy: EnergySource = Field(
        EnergySource.AUTO,
        strict=False,
        description="auto: DCGM's energy counter where exported, else integrated power; counter "
        "or power: only that.",
    )
    bucket_s: int = Field(
        3600,
        ge=60,
        le=86_400,
        description="The ledger's time resolution (s); must divide a day.",
    )
    max_gap_s: float = Field(
        300.0,
        gt=0,
        le=86_400,
        description="An interval longer than this (the agent was down) is not booked from its "
        "two ends: it is left as a gap for `ooda meter backfill` (s).",
    )
    retention_days: float | None = Field(
        400.0, gt=0, description="Bookings older than this are deleted (days; none: kept)."
    )
    top_accounts: int = Field(
        10,
        ge=0,
        le=1000,
        description="Accounts named on /metrics (the first this many seen, by energy); the rest "
        'are summed as account="other".',
    )
    tariff: TariffSettings = Field(default_factory=TariffSettings)
    carbon: CarbonSettings = Field(default_factory=CarbonSettings)

    @field_validator("bucket_s")
    @classmethod
    def _divides_a_day(cls, value: int) -> int:
        if 86_400 % value:
            raise ValueError("must divide a day (86400 s), e.g. 300, 900, 3600")
        return value
