"""The site as an adapter: an agent's `[site]` section (the site it belongs to, its safe share, its
replicas) and the link it builds (agent.site.link): the cluster's budget, granted by the site
coordinator through etcd, and its replicas' leader election. Like the twin's `[twin]`, the
section is a top-level one, owned here: the configuration validates it with this model and rule,
the assembly builds the link with this builder.
"""

from __future__ import annotations

from agent.core.clock import MonotonicClock, SystemClock
from agent.core.errors import ConfigError
from agent.node.auth import TokenStore
from agent.site.http import HttpPinger
from agent.site.link import LinkSettings, SiteLink
from agent.site.settings import (
    SiteLinkSettings,
    default_replica,
    open_store,
    site_prefix,
    split_listen,
)

__all__ = ["RISE_SKEW_S", "SiteLinkSettings", "open_site_link", "site_budget_problem"]

# The hosts' clocks may differ this much: a budget that would rise at a lapse waits it out (on
# top of one cycle interval), so the clusters coming down are down before any goes up.
RISE_SKEW_S = 2.0


def site_budget_problem(site: SiteLinkSettings | None, budget_query: str | None) -> str | None:
    """Why `cluster.budget_query` cannot be used with this `[site]` (None: it can). Under a site
    the budget is the grant (cluster.budget_w stays as a local limit: the lower one holds); a
    budget from Prometheus would be a second, competing source."""
    if site is None or budget_query is None:
        return None
    return (
        "cluster.budget_query: a cluster in a [site] gets its budget from the site coordinator "
        "(cluster.budget_w may stay, as a local limit)"
    )


def link_settings(
    section: SiteLinkSettings, *, cluster: str, interval_s: float, local_budget_w: float | None
) -> LinkSettings:
    """What the link needs of the agent's configuration: its `[site]`, the cluster's name, the
    cycle interval (the leader TTL's default; a rise after a lapse waits one) and its own
    budget (a local limit under the grant)."""
    peer_url = section.peer_url or (
        f"http://{section.peer_listen}" if section.peer_listen else None
    )
    return LinkSettings(
        site_prefix=site_prefix(section.etcd, section.name),
        cluster=cluster,
        replica=section.replica or default_replica(),
        safe_share_w=section.safe_share_w,
        leader_ttl_s=section.leader_ttl_s or max(2, round(interval_s)),
        local_budget_w=local_budget_w,
        peer_url=peer_url,
        rise_delay_s=interval_s + RISE_SKEW_S,
    )


def open_site_link(
    section: SiteLinkSettings, *, cluster: str, interval_s: float, local_budget_w: float | None
) -> SiteLink:
    """The agent's link to its site (etcd), started: one round with etcd done (the first cycle
    knows its leadership and grant), its thread running, the failsafe endpoint served when
    `peer_listen` is set. A port that cannot be bound is a ConfigError naming the key."""
    settings = link_settings(
        section, cluster=cluster, interval_s=interval_s, local_budget_w=local_budget_w
    )
    token_file = section.peer_token_file
    pinger = HttpPinger(token_file) if token_file is not None else None
    link = SiteLink(
        open_store(section.etcd), settings, wall=SystemClock(), mono=MonotonicClock(), pinger=pinger
    )
    try:
        if section.peer_listen is not None:
            assert token_file is not None  # the section insists
            host, port = split_listen(section.peer_listen)
            server = link.serve_peers(host, port, TokenStore(token_file))
            if section.peer_url is None:  # the port it got (port 0: any free one)
                link.elector.peer_url = server.url
        return link.start()
    except OSError as exc:
        link.stop(resign=False)
        raise ConfigError(f"site.peer_listen: cannot listen ({exc.strerror or exc})") from None
    except BaseException:
        link.stop(resign=False)
        raise
