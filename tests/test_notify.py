"""The webhook and Alertmanager notifiers against a tiny real HTTP server on 127.0.0.1 (scripted
answers), and the alert they build. The real Alertmanager is in tests/integration."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from agent.act.notify import AlertmanagerNotifier, NotifySettings, WebhookNotifier, build_notifier
from agent.core.clock import FakeClock
from agent.core.errors import ActuatorError
from agent.core.intents import Notify, Severity
from tests.http_helpers import LoopbackServer


class Hook:
    """Records each POST; answers with the scripted statuses (then 200)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.statuses: list[int] = []
        self.delay_s = 0.0
        self.server = LoopbackServer(self._answer)
        self.url = self.server.url

    def _answer(
        self, _method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str, bytes]:
        self.requests.append((path, headers, json.loads(body)))
        if self.delay_s:
            time.sleep(self.delay_s)
        status = self.statuses.pop(0) if self.statuses else 200
        return status, "application/json", b"nope: bad alert" if status >= 400 else b"{}"

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook()
    yield server
    server.close()


def intent(expires_s: float = float("inf")) -> Notify:
    return Notify(
        policy="health_drain",
        reason="xid 79 on node2/gpu1: fell off the bus",
        target="node2",
        severity=Severity.CRITICAL,
        summary="node2 drained",
        evidence={"xid": 79, "gpus": [1]},
        expires_s=expires_s,
    )


def settings(url: str, **extra: Any) -> NotifySettings:
    return NotifySettings.model_validate({"kind": "webhook", "url": url, **extra})


def test_webhook_posts_one_json_object(hook: Hook) -> None:
    clock = FakeClock(100.0)
    notifier = WebhookNotifier(
        settings(f"{hook.url}/hooks/ooda", headers={"Authorization": "Bearer t0k"}),
        "lab",
        clock,
        wall_time=lambda: 1_800_000_000.0,
    )
    notifier.notify(intent(expires_s=400.0))
    path, headers, body = hook.requests[0]
    assert path == "/hooks/ooda"
    assert headers["Authorization"] == "Bearer t0k"
    assert body["cluster"] == "lab" and body["target"] == "node2"
    assert body["policy"] == "health_drain" and body["severity"] == "critical"
    assert body["evidence"] == {"xid": 79, "gpus": [1]}
    # 300 s left on the agent's clock -> 300 s after the wall time.
    assert datetime.fromisoformat(body["expires"]).timestamp() == 1_800_000_300.0
    assert datetime.fromisoformat(body["time"]).timestamp() == 1_800_000_000.0


def test_evidence_not_known_is_sent_as_null(hook: Hook) -> None:
    """NaN and infinities in the evidence (a reading not known) go out as strict JSON nulls,
    in a webhook's body and in an alert's annotation; httpx's own encoder would raise on them,
    and a `NaN` inside the annotation's text is not JSON."""
    note = intent()
    unknown = Notify(
        policy=note.policy,
        reason=note.reason,
        target=note.target,
        severity=note.severity,
        evidence={"fleet_power_w": float("nan"), "headroom_w": float("-inf"), "xid": 79},
    )
    WebhookNotifier(settings(f"{hook.url}/h"), "lab", FakeClock(0.0)).notify(unknown)
    _path, headers, body = hook.requests[0]
    assert headers["Content-Type"] == "application/json"
    want = {"fleet_power_w": None, "headroom_w": None, "xid": 79}
    assert body["evidence"] == want
    alertmanager = NotifySettings(kind="alertmanager", url=hook.url)
    alert = AlertmanagerNotifier(alertmanager, "lab", FakeClock(0.0)).alert(unknown)
    assert json.loads(alert["annotations"]["evidence"], parse_constant=_no_constant) == want


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def test_retries_server_errors_then_succeeds(hook: Hook) -> None:
    hook.statuses = [503, 502]
    slept: list[float] = []
    notifier = WebhookNotifier(
        settings(hook.url, retries=2, backoff_s=0.25), "lab", sleep=slept.append
    )
    notifier.notify(intent())
    assert len(hook.requests) == 3
    assert slept == [0.25, 0.5]


def test_gives_up_with_the_last_answer(hook: Hook) -> None:
    hook.statuses = [500, 500, 500]
    notifier = WebhookNotifier(settings(hook.url, retries=2), "lab", sleep=lambda s: None)
    with pytest.raises(ActuatorError, match=r"failed after 3 attempts \(HTTP 500: nope"):
        notifier.notify(intent())


def test_client_errors_are_not_retried(hook: Hook) -> None:
    hook.statuses = [400]
    notifier = WebhookNotifier(settings(hook.url, retries=3), "lab", sleep=lambda s: None)
    with pytest.raises(ActuatorError, match=r"refused \(HTTP 400: nope: bad alert\)"):
        notifier.notify(intent())
    assert len(hook.requests) == 1


def test_unreachable_and_slow_endpoints_fail_in_bounded_time(hook: Hook) -> None:
    closed = Hook()
    url = closed.url
    closed.close()
    notifier = WebhookNotifier(settings(url, retries=1), "lab", sleep=lambda s: None)
    with pytest.raises(ActuatorError, match=rf"POST {url} failed after 2 attempts \(Connect"):
        notifier.notify(intent())

    hook.delay_s = 1.0
    slow = WebhookNotifier(
        settings(hook.url, retries=0, timeout_s=0.2), "lab", sleep=lambda s: None
    )
    t0 = time.monotonic()
    with pytest.raises(ActuatorError, match=r"timed out after 0.2 s"):
        slow.notify(intent())
    assert time.monotonic() - t0 < 1.0


def test_alertmanager_alert_shape(hook: Hook) -> None:
    clock = FakeClock(50.0)
    notifier = AlertmanagerNotifier(
        NotifySettings(kind="alertmanager", url=hook.url + "/"),
        "lab",
        clock,
        wall_time=lambda: 1_800_000_000.0,
    )
    notifier.notify(intent(expires_s=170.0))
    path, _, body = hook.requests[0]
    assert path == "/api/v2/alerts"
    (alert,) = body
    assert alert["labels"] == {
        "alertname": "OodaNotify",
        "severity": "critical",
        "cluster": "lab",
        "target": "node2",
        "policy": "health_drain",
    }
    assert alert["annotations"]["summary"] == "node2 drained"
    assert alert["annotations"]["reason"].startswith("xid 79")
    assert json.loads(alert["annotations"]["evidence"]) == {"gpus": [1], "xid": 79}
    starts = datetime.fromisoformat(alert["startsAt"]).timestamp()
    ends = datetime.fromisoformat(alert["endsAt"]).timestamp()
    assert (starts, ends) == (1_800_000_000.0, 1_800_000_120.0)
    assert "endsAt" not in notifier.alert(intent())  # no expiry: Alertmanager's resolve_timeout


def test_settings_need_a_url() -> None:
    with pytest.raises(ValueError, match="url: required when kind is 'webhook'"):
        NotifySettings(kind="webhook")
    assert build_notifier(NotifySettings(), "lab") is None
