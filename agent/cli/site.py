"""`ooda site`: the site coordinator above the clusters' agents (etcd)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from agent.cli._common import emit_json, setup_logging

site_app = typer.Typer(
    help="The site coordinator: one site budget across clusters (etcd).", no_args_is_help=True
)

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object on the last line.")]
ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="The site's TOML (see deploy/site/site.toml).")
]


@site_app.command("run")
def run(
    ctx: typer.Context,
    config: ConfigOption,
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen", help="ADDR:PORT for status and the webhook (overrides site.listen)."
        ),
    ] = None,
) -> None:
    """Run the coordinator until SIGTERM or SIGINT; SIGHUP re-reads the schedule file.

    Under systemd (deploy/systemd/ooda-site.service, Type=notify) it says when it is ready,
    its role and last round as the unit's status, and feeds the watchdog while rounds come.

    Each round (site.interval_s) it reads the clusters' demand curves from etcd, splits the
    site's limits among them by marginal throughput per watt, and publishes each one's grant
    with a lease. Several replicas elect one leader.

    Examples:

      ooda site run --config deploy/site/site.toml

      ooda --log-level debug site run -c /etc/ooda/site.toml --listen 127.0.0.1:9470
    """
    from agent.daemon.notify import SystemdNotify
    from agent.site.service import SiteService
    from agent.site.settings import load_site_config

    root = ctx.find_root()
    if root.params.get("log_level") is None and not os.environ.get("OODA_LOG_LEVEL"):
        setup_logging("info")
    settings = load_site_config(config)
    # Under systemd (Type=notify, deploy/systemd/ooda-site.service): ready, status, watchdog.
    service = SiteService(settings, listen, heartbeat=SystemdNotify())
    raise typer.Exit(service.serve())


@site_app.command("check")
def check(
    config: ConfigOption,
    json_out: JsonOption = False,
) -> None:
    """Validate a site's TOML: the tree of limits, the safe shares under every limit.

    Examples:

      ooda site check --config deploy/site/site.toml
    """
    from agent.site.demand import load_schedule
    from agent.site.settings import load_site_config

    settings = load_site_config(config)
    tree = settings.tree()
    dr = settings.demand_response
    events = [] if dr is None or dr.schedule_file is None else load_schedule(dr.schedule_file)
    summary = {
        "ok": True,
        "file": str(config),
        "site": settings.site.name,
        "limit_w": settings.site.limit_w,
        "feeds": {n: f.limit_w for n, f in settings.feeds.items()},
        "clusters": {n: list(tree.paths[n]) for n in tree.clusters},
        "safe_shares_w": sum(c.safe_share_w for c in settings.clusters.values()),
        "scheduled_events": len(events),
    }
    if json_out:
        emit_json(summary)
    else:
        typer.echo(
            f"{config}: OK (site {settings.site.name}, {settings.site.limit_w:.0f} W, "
            f"{len(settings.feeds)} feeds, {len(settings.clusters)} clusters, "
            f"{len(events)} scheduled demand-response events)"
        )


@site_app.command("status")
def status(
    config: ConfigOption,
    json_out: JsonOption = False,
) -> None:
    """The coordinator's last round, from etcd: limits, grants, demand response, target met.

    Exit 1 when etcd has no status (no coordinator leads) or cannot be reached.

    Examples:

      ooda site status --config deploy/site/site.toml --json
    """
    from agent.site.service import read_status
    from agent.site.settings import load_site_config
    from agent.site.store import StoreError

    settings = load_site_config(config)
    try:
        report = read_status(settings)
    except StoreError as exc:
        typer.echo(f"ooda: site {settings.site.name}: {exc}", err=True)
        raise typer.Exit(1) from None
    if report is None:
        typer.echo(f"ooda: site {settings.site.name}: no status in etcd (no coordinator leads)",
                   err=True)  # fmt: skip
        raise typer.Exit(1)
    if json_out:
        emit_json(report)
        return
    dr = report.get("demand_response")
    typer.echo(
        f"site {settings.site.name}: limit {report['limit_w']:.0f} W, "
        f"drawing {_watts(report['power_w'])}, target met: {report['target_met']}, "
        f"coordinator {report.get('coordinator')}"
        + (f", demand response {dr['event']} ({dr['phase']})" if dr else "")
    )
    for name, cluster in sorted(report["clusters"].items()):
        typer.echo(
            f"  {name}: grant {_watts(cluster['grant_w'], 'none')}, "
            f"drawing {_watts(cluster['power_w'])}, can meet: {cluster['can_meet']}"
            + (f" ({cluster['problem']})" if cluster["problem"] else "")
        )


def _watts(value: float | None, missing: str = "unknown") -> str:
    """A power from the status; one it does not hold (no live curve says it) is said as such,
    never as 0 W."""
    return missing if value is None else f"{value:.0f} W"
