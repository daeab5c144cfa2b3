"""The fleet from Prometheus remote write: a TelemetrySource whose samples are pushed to it.

`RemoteWriteSource(config)` listens at once (`config.listen`); `observe(now)` reads the newest
sample of every series received (see `store`): no query, no database between the exporters and
the agent. The first observe waits for the senders (at most `config.first_wait_s`): for the
first samples, then until a second passes with no new series (a whole scrape's worth).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from agent.core.errors import TelemetryError
from agent.core.snapshot import Snapshot
from agent.observe.remote_write.server import RemoteWriteReceiver, TokenCheck
from agent.observe.remote_write.settings import RemoteWriteConfig
from agent.observe.remote_write.store import SeriesStore, naming_of

SETTLE_S = 1.0  # the first cycle starts once this long passed without a new series


class RemoteWriteSource:
    """A TelemetrySource fed by remote write. `extra_labels`: labels of the power series carried
    into `Snapshot.labels` (the per-group budgets' label)."""

    def __init__(
        self,
        config: RemoteWriteConfig,
        *,
        extra_labels: Sequence[str] = (),
        tokens: TokenCheck | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.store = SeriesStore(
            naming_of(
                config.metrics,
                config.host_labels,
                config.gpu_label,
                config.uuid_label,
                config.model_label,
                config.job_label,
                config.match,
                extra_labels,
            ),
            max_series=config.max_series,
            lookback_s=config.lookback_s,
            staleness_s=config.staleness_limit_s,
            inventory_window_s=config.inventory_window_s,
        )
        self.receiver = RemoteWriteReceiver(config, self.store, tokens)
        self._monotonic = monotonic
        self._sleep = sleep
        self._waited = False
        self.url = self.receiver.start()

    def observe(self, now_s: float) -> Snapshot:
        if not self._waited:
            self._wait_for_senders()
            self._waited = True
        if not self.store.received_any.is_set():
            raise TelemetryError(
                f"remote write {self.url}: nothing received yet (is it the url in the sender's "
                "remote_write section?)"
            )
        return self.store.snapshot(now_s)

    def _wait_for_senders(self) -> None:
        deadline = self._monotonic() + self.config.first_wait_s
        if not self.store.received_any.wait(self.config.first_wait_s):
            return
        series, quiet_since = self.store.series, self._monotonic()
        while self._monotonic() < deadline and self._monotonic() - quiet_since < SETTLE_S:
            self._sleep(0.1)
            if self.store.series != series:
                series, quiet_since = self.store.series, self._monotonic()

    def close(self) -> None:
        self.receiver.stop()
