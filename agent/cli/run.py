"""`ooda run`: the agent as a service (systemd, a container, or a terminal)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from agent.cli._common import setup_logging


def run(
    ctx: typer.Context,
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The TOML configuration (see deploy/examples).")
    ],
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Advise only, whatever the file says (also for each policy)."
        ),
    ] = False,
    metrics_listen: Annotated[
        str,
        typer.Option(
            "--metrics-listen",
            help="ADDR:PORT for /metrics, /healthz and /readyz ([::1]:9464 for IPv6; port 0: any "
            "free port, logged; 'off': none).",
        ),
    ] = "127.0.0.1:9464",
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="Overrides daemon.state_dir (state and the lock)."),
    ] = None,
) -> None:
    """Run the agent until SIGTERM or SIGINT; SIGHUP reloads the configuration.

    A cycle every daemon.interval_s; one agent per cluster (a second one refuses to start);
    state survives restarts (daemon.state_dir); systemd notify and watchdog when run under
    systemd (Type=notify). Logs go to stderr (JSON when not a terminal), at info unless
    --log-level or OODA_LOG_LEVEL say otherwise.

    Examples:

      ooda run --config deploy/examples/twin.toml --state-dir /tmp/ooda-state

      ooda run --config /etc/ooda/agent.toml --dry-run

      ooda --log-level debug run -c /etc/ooda/agent.toml --metrics-listen [::]:9464

      systemctl reload ooda-agent     # SIGHUP: reload the configuration
    """
    from agent.daemon import Daemon, DaemonOptions, parse_listen

    root = ctx.find_root()
    if root.params.get("log_level") is None and not os.environ.get("OODA_LOG_LEVEL"):
        setup_logging("info")  # a service says what it does; `--log-level` overrides
    daemon = Daemon(
        DaemonOptions(
            config_path=config,
            force_dry_run=dry_run,
            state_dir=state_dir,
            metrics_listen=parse_listen(metrics_listen),
        )
    )
    raise typer.Exit(daemon.serve())
