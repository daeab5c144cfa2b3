"""Notifications (Alertmanager or a webhook), the one notifier: `[actuators.notify]` says where
Notify intents go (kind "none": nowhere, and they fail as unconfigured)."""

from __future__ import annotations

from agent.act.notify import NotifySettings, build_notifier
from agent.adapters.table import ActuatorKind, BuildContext
from agent.core.protocols import Notifier


def _build(section: NotifySettings, ctx: BuildContext) -> Notifier | None:
    notifier = build_notifier(section, ctx.cluster, ctx.clock)
    if notifier is not None:
        ctx.closers.append(notifier.close)
    return notifier


NOTIFY = ActuatorKind(
    name="notify",
    role="notify",
    description="Where Notify intents go: Alertmanager, a webhook or none ([actuators.notify]).",
    build=_build,
    Settings=NotifySettings,
)
