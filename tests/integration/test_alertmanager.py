"""Notify intents into a real Alertmanager (Debian's prometheus-alertmanager)."""

from __future__ import annotations

import time
import uuid
from datetime import datetime

import pytest

from agent.act.notify import AlertmanagerNotifier, NotifySettings
from agent.core.clock import FakeClock
from agent.core.errors import ActuatorError
from agent.core.intents import Notify, Severity
from tests.integration.alertmanager import Alertmanager
from tests.integration.slurm_cluster import wait_until

pytestmark = pytest.mark.integration


def test_alert_arrives_with_labels_annotations_and_expiry(alertmanager: Alertmanager) -> None:
    cluster = f"test-{uuid.uuid4().hex[:6]}"
    clock = FakeClock(1000.0)  # twin seconds: the expiry is relative to this clock
    notifier = AlertmanagerNotifier(
        NotifySettings(kind="alertmanager", url=alertmanager.url), cluster, clock
    )
    intent = Notify(
        policy="health_drain",
        reason="xid 79 on node2/gpu1",
        target="node2",
        severity=Severity.CRITICAL,
        summary="node2 drained: GPU fell off the bus",
        evidence={"xid": 79},
        expires_s=1600.0,  # 10 minutes from now on the agent's clock
    )
    sent_at = time.time()
    notifier.notify(intent)
    wait_until(lambda: bool(alertmanager.alerts(cluster=cluster)), 10, "the alert to show up")
    (alert,) = alertmanager.alerts(cluster=cluster)
    assert alert["labels"] == {
        "alertname": "OodaNotify",
        "severity": "critical",
        "cluster": cluster,
        "target": "node2",
        "policy": "health_drain",
    }
    assert alert["annotations"]["summary"] == "node2 drained: GPU fell off the bus"
    assert alert["annotations"]["reason"] == "xid 79 on node2/gpu1"
    assert alert["status"]["state"] == "active"
    ends = datetime.fromisoformat(alert["endsAt"]).timestamp()
    assert abs(ends - (sent_at + 600.0)) < 5.0

    # The same labels again update the same alert; an intent already expired resolves it.
    clock.advance(600.0)
    notifier.notify(intent)
    wait_until(lambda: not alertmanager.alerts(cluster=cluster), 10, "the alert to resolve")


def test_rejected_alert_is_an_actuator_error(alertmanager: Alertmanager) -> None:
    notifier = AlertmanagerNotifier(
        NotifySettings(kind="alertmanager", url=alertmanager.url), "lab", FakeClock(0.0)
    )
    # An alert with no labels is invalid: Alertmanager's 400 becomes an ActuatorError, no retry.
    with pytest.raises(ActuatorError, match=r"refused \(HTTP 400"):
        notifier._poster.post(notifier.url, [{"labels": {}}])
