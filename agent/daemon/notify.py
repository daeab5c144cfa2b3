"""systemd's notify protocol (READY, STATUS, WATCHDOG, RELOADING, STOPPING) through `sdnotify`.

Only when systemd asked for it (NOTIFY_SOCKET set, i.e. Type=notify): otherwise every call is a
no-op. The watchdog interval comes from WATCHDOG_USEC (WatchdogSec=); the daemon pings at half of
it, and only while its cycles make progress, so a hung agent is restarted by systemd.
"""

from __future__ import annotations

import os
import time

import sdnotify
import structlog

log = structlog.get_logger("ooda.daemon")


class SystemdNotify:
    def __init__(self) -> None:
        env = os.environ  # sdnotify reads NOTIFY_SOCKET from the environment too
        self.socket = env.get("NOTIFY_SOCKET") or None
        self._notifier = sdnotify.SystemdNotifier() if self.socket else None
        self.watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if self.socket and usec.isdecimal() and int(usec) > 0 and pid in ("", str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

    def send(self, *lines: str) -> None:
        if self._notifier is None:
            return
        # STATUS is one line: newlines would start a new assignment.
        self._notifier.notify("\n".join(line.replace("\n", " ") for line in lines))

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload to its request.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")
