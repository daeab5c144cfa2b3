"""The long-running service (`ooda run`): scheduler, signals, its own /metrics and health, state
that survives restarts, one instance per cluster. It builds its agent through agent.assembly."""

from agent.daemon.lock import AlreadyRunningError, InstanceLock
from agent.daemon.service import Daemon, DaemonOptions, parse_listen

__all__ = ["AlreadyRunningError", "Daemon", "DaemonOptions", "InstanceLock", "parse_listen"]
