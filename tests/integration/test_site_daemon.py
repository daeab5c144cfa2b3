"""The daemon in a site, in process, on a real etcd: the assembly opens the link from `[site]`,
the daemon's /metrics say the replica's role and the grant it plans under (labels from fixed sets
only), /healthz says the role, a reload with the same `[site]` keeps the link (its etcd session
and leadership) and takes the new local budget, a reload with another `[site]` opens a new link,
and a clean stop gives the leader key up."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.daemon import Daemon
from agent.site.grants import Grant
from agent.site.store import EtcdStore
from tests.daemon_helpers import drive, in_process, sample, twin_config, write
from tests.integration.site_services import Etcd

pytestmark = [pytest.mark.integration]

PREFIX = "/ooda/sites/hall/clusters/lab"


def site_toml(etcd: str, safe_share_w: float = 6000.0, budget_w: float = 9000.0) -> str:
    site = f"""
[site]
name = "hall"
safe_share_w = {safe_share_w}
replica = "lab-a"

[site.etcd]
endpoints = ["{etcd}"]
timeout_s = 1.0
"""
    return twin_config(budget_w=budget_w, dry_run=True, extra=site)


def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("not within the time")


def families(daemon: Daemon, name: str) -> dict[str, float]:
    """The label values of one labelled gauge family and their values."""
    metric = next(m for m in daemon.metrics.registry.collect() if m.name == name)
    return {next(iter(s.labels.values())): s.value for s in metric.samples}


def test_the_daemon_in_a_site_reports_its_role_and_grant_and_keeps_its_link(
    tmp_path: Path,
) -> None:
    if Etcd.binary() is None:
        pytest.skip("etcd not installed (make test installs it)")
    (tmp_path / "etcd").mkdir()
    etcd = Etcd(tmp_path / "etcd").start()
    store = EtcdStore([etcd.url])
    config = write(tmp_path / "agent.toml", site_toml(etcd.url))
    daemon: Daemon | None = None
    try:
        daemon = in_process(config, tmp_path / "state")
        wall = daemon.wall
        link = daemon.runtime.site
        assert link is not None and daemon.runtime.loop.election is link
        # No grant yet: the safe share (under the local 9000 W), said every cycle.
        report = drive(daemon, wall, 2)[-1]  # type: ignore[arg-type]
        assert report.situation.budget_w == 6000.0
        assert any(e.startswith("site: no grant") for e in report.errors)
        roles = families(daemon, "ooda_site_role")
        assert roles == {"leader": 1, "failsafe_leader": 0, "standby": 0, "unconfirmed": 0,
                         "starting": 0}  # fmt: skip
        sources = families(daemon, "ooda_site_budget_source")
        assert sources == {"grant": 0, "grant_kept": 0, "lapsing": 0, "safe_share": 1}
        assert sample(daemon, "ooda_site_may_act") == 1
        assert sample(daemon, "ooda_site_grant_watts") != sample(daemon, "ooda_site_grant_watts")
        assert sample(daemon, "ooda_cycle_errors_total", kind="site") == 2
        assert daemon.health().detail["site"]["role"] == "leader"
        assert store.get(f"{PREFIX}/leader") is not None

        # A grant: planned under, and on /metrics.
        grant = Grant("lab", 7000.0, 1, time.time(), 60.0)
        store.put(f"{PREFIX}/grant", json.dumps(grant.to_json()))
        until(lambda: link.keeper.grant is not None)
        report = drive(daemon, wall, 1)[-1]  # type: ignore[arg-type]
        assert report.situation.budget_w == 7000.0 and not report.errors
        assert sample(daemon, "ooda_site_grant_watts") == 7000.0
        assert families(daemon, "ooda_site_budget_source")["grant"] == 1
        left = sample(daemon, "ooda_site_grant_lease_remaining_seconds")
        assert left is not None and 0 < left <= 60

        # Reload, the same [site], a lower local budget: the same link, session and leadership;
        # the lower of the grant and the local budget holds.
        lease = link.elector.lease_id
        write(config, site_toml(etcd.url, budget_w=6500.0))
        assert daemon.reload()
        assert daemon.runtime.site is link and link.elector.lease_id == lease
        assert link.elector.is_leader
        report = drive(daemon, wall, 1)[-1]  # type: ignore[arg-type]
        assert report.situation.budget_w == 6500.0

        # Reload, another [site]: a link of its own; the old one stops and resigns, and the new
        # one leads.
        write(config, site_toml(etcd.url, safe_share_w=5000.0, budget_w=6500.0))
        assert daemon.reload()
        new = daemon.runtime.site
        assert new is not None and new is not link
        assert link._thread is not None and not link._thread.is_alive()
        until(lambda: new.leadership().may_act)
        drive(daemon, wall, 1)
        assert families(daemon, "ooda_site_role")["leader"] == 1

        # A clean stop gives the leader key up at once (a standby need not wait for its TTL).
        assert daemon.shutdown()
        daemon = None
        assert store.get(f"{PREFIX}/leader") is None
    finally:
        if daemon is not None:
            daemon.shutdown()
        store.close()
        etcd.stop()
