"""Notify intents to people: Alertmanager's v2 alerts API, or a generic JSON webhook.

Alertmanager (`POST {url}/api/v2/alerts`, a JSON list of alerts): labels identify the alert
(alertname, severity, cluster, target, policy: the same labels again update the same alert),
annotations carry the summary, the reason and the evidence. `startsAt` is now; `endsAt` is the
intent's expiry, so an alert resolves by itself when the policy stops renewing it (an intent with
no expiry gets none, and Alertmanager resolves it after its `resolve_timeout`, 5 min by default).
Expiries are in the agent's clock (Unix seconds, or twin seconds on the twin): the time left is
measured on that clock and added to the wall clock.

The webhook gets one JSON object per intent (see `webhook_payload`). Both retry connection
errors, timeouts and 5xx answers with a backoff, never a 4xx (the request itself is wrong); every
failure is an ActuatorError naming the URL and the answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
import structlog
from pydantic import BaseModel, Field, model_validator

from agent.core.clock import Clock, SystemClock
from agent.core.errors import ActuatorError
from agent.core.intents import Notify, jsonable, strict_json
from agent.core.settings import STRICT_SETTINGS

log = structlog.get_logger("ooda.act.notify")

MAX_EVIDENCE_CHARS = 4000


class NotifySettings(BaseModel):
    """`[actuators.notify]`: where Notify intents go."""

    model_config = STRICT_SETTINGS

    kind: Literal["none", "alertmanager", "webhook"] = Field(
        "none", description="Alertmanager's v2 API, a generic JSON webhook, or nowhere."
    )
    url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="Alertmanager base URL (http://host:9093) or the webhook's full URL.",
    )
    timeout_s: float = Field(5.0, gt=0, le=120, description="Per-request timeout (s).")
    retries: int = Field(2, ge=0, le=10, description="Retries on connection errors and 5xx.")
    backoff_s: float = Field(0.5, ge=0, le=60, description="First retry delay, doubled each.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra HTTP headers (e.g. Authorization)."
    )
    alertname: str = Field(
        "OodaNotify", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Alertmanager alertname."
    )
    generator_url: str | None = Field(
        None, description="Link shown with each alert (e.g. the agent's status page)."
    )

    @model_validator(mode="after")
    def _url_needed(self) -> NotifySettings:
        if self.kind != "none" and self.url is None:
            raise ValueError(f"url: required when kind is {self.kind!r}")
        return self


def _iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, tz=UTC).isoformat(timespec="milliseconds")


def _evidence_text(intent: Notify) -> str:
    text = strict_json(intent.evidence)  # NaN and infinities as null: readers parse it
    return text if len(text) <= MAX_EVIDENCE_CHARS else text[: MAX_EVIDENCE_CHARS - 3] + "..."


class _Poster:
    """POST JSON with a timeout and retries; errors as ActuatorError."""

    def __init__(
        self,
        settings: NotifySettings,
        client: httpx.Client | None,
        sleep: Callable[[float], None],
    ) -> None:
        self.settings = settings
        self.client = client or httpx.Client(timeout=settings.timeout_s, headers=settings.headers)
        self.sleep = sleep

    def post(self, url: str, body: Any) -> httpx.Response:
        s = self.settings
        payload = strict_json(body).encode()
        delay = s.backoff_s
        problem = ""
        for attempt in range(s.retries + 1):
            if attempt:
                self.sleep(delay)
                delay *= 2
            try:
                # Strict JSON: evidence may hold NaN or infinities (null here), which httpx's
                # own encoder refuses, and a refusal must not escape as anything but an error.
                response = self.client.post(
                    url,
                    content=payload,
                    headers={"Content-Type": "application/json"},
                    timeout=s.timeout_s,
                )
            except httpx.TimeoutException:
                problem = f"timed out after {s.timeout_s:g} s"
                continue
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.is_success:
                return response
            problem = f"HTTP {response.status_code}: {' '.join(response.text.split())[:300]}"
            if response.status_code < 500:
                raise ActuatorError(f"notify: POST {url} refused ({problem})")
        tries = s.retries + 1
        raise ActuatorError(
            f"notify: POST {url} failed after {tries} attempt{'s' * (tries > 1)} ({problem})"
        )

    def close(self) -> None:
        self.client.close()


class AlertmanagerNotifier:
    """The Notifier protocol on Alertmanager's v2 alerts API."""

    def __init__(
        self,
        settings: NotifySettings,
        cluster: str,
        clock: Clock | None = None,
        *,
        client: httpx.Client | None = None,
        wall_time: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if settings.url is None:
            raise ActuatorError("notify: no Alertmanager URL configured")
        self.settings = settings
        self.cluster = cluster
        self.clock = clock or SystemClock()
        self.wall_time = wall_time
        self.url = settings.url.rstrip("/") + "/api/v2/alerts"
        self._poster = _Poster(settings, client, sleep)

    def alert(self, intent: Notify) -> dict[str, Any]:
        """The alert object for one intent."""
        now_wall = self.wall_time()
        labels = {
            "alertname": self.settings.alertname,
            "severity": str(intent.severity),
            "cluster": self.cluster,
            "target": intent.target,
            "policy": intent.policy,
        }
        annotations = {
            "summary": intent.summary or intent.reason,
            "reason": intent.reason,
            "evidence": _evidence_text(intent),
        }
        alert: dict[str, Any] = {
            "labels": {k: v for k, v in labels.items() if v},
            "annotations": {k: v for k, v in annotations.items() if v},
            "startsAt": _iso(now_wall),
        }
        if math.isfinite(intent.expires_s):
            left_s = max(intent.expires_s - self.clock.now(), 0.0)
            alert["endsAt"] = _iso(now_wall + left_s)
        if self.settings.generator_url:
            alert["generatorURL"] = self.settings.generator_url
        return alert

    def notify(self, intent: Notify) -> None:
        self._poster.post(self.url, [self.alert(intent)])
        log.info("alert_sent", target=intent.target, policy=intent.policy, url=self.url)

    def close(self) -> None:
        self._poster.close()


def webhook_payload(
    intent: Notify, cluster: str, now_wall_s: float, expires_wall_s: float | None
) -> dict[str, Any]:
    return {
        "version": "1",
        "source": "ooda",
        "cluster": cluster,
        "kind": str(intent.kind),
        "severity": str(intent.severity),
        "target": intent.target,
        "policy": intent.policy,
        "summary": intent.summary or intent.reason,
        "reason": intent.reason,
        "evidence": jsonable(intent.evidence),
        "time": _iso(now_wall_s),
        "expires": None if expires_wall_s is None else _iso(expires_wall_s),
    }


class WebhookNotifier:
    """The Notifier protocol as one JSON POST per intent to any URL."""

    def __init__(
        self,
        settings: NotifySettings,
        cluster: str,
        clock: Clock | None = None,
        *,
        client: httpx.Client | None = None,
        wall_time: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if settings.url is None:
            raise ActuatorError("notify: no webhook URL configured")
        self.settings = settings
        self.url = settings.url
        self.cluster = cluster
        self.clock = clock or SystemClock()
        self.wall_time = wall_time
        self._poster = _Poster(settings, client, sleep)

    def notify(self, intent: Notify) -> None:
        now_wall = self.wall_time()
        expires = None
        if math.isfinite(intent.expires_s):
            expires = now_wall + max(intent.expires_s - self.clock.now(), 0.0)
        self._poster.post(self.url, webhook_payload(intent, self.cluster, now_wall, expires))
        log.info("webhook_sent", target=intent.target, policy=intent.policy, url=self.url)

    def close(self) -> None:
        self._poster.close()


def build_notifier(
    settings: NotifySettings, cluster: str, clock: Clock | None = None
) -> AlertmanagerNotifier | WebhookNotifier | None:
    """The notifier the settings name (None for kind "none")."""
    if settings.kind == "alertmanager":
        return AlertmanagerNotifier(settings, cluster, clock)
    if settings.kind == "webhook":
        return WebhookNotifier(settings, cluster, clock)
    return None
