"""Leader election on the store, for the coordinator and for each cluster's agent replicas.

Every replica holds a session lease (TTL `ttl_s`) and registers itself under `members/`; the
leader key is created only if absent (a transaction), attached to the leader's session, so it
vanishes when the leader stops renewing. A standby watches the key and campaigns as soon as it
is gone: takeover comes within the TTL plus the time to the standby's next cycle.

A leader acts only while its lease is confirmed: until `ttl_s` after the start of its last
successful renewal, less a margin for the two clocks' rates, by its own monotonic clock. etcd
ends the lease no sooner, so a standby can never hold the key while the old leader still acts.

If etcd cannot be reached once that confirmation runs out, a leader that can still reach every
other replica of its group (the members it last saw in etcd) and gets their word keeps acting:
each one that gives it promises not to campaign for `ttl_s` (Patroni's failsafe mode). With no
other replica, it keeps acting on its own. A replica that cannot be reached, or refuses, ends it:
the leader stops acting and says so every cycle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from agent.core.clock import Clock
from agent.site.store import LeaseLostError, Store, StoreError

CLOCK_RATE_MARGIN = 0.1  # a confirmation lasts this share of the TTL less than etcd's lease


class PeerPinger(Protocol):
    """Asks another replica for its word during an etcd outage (agent.site.http.HttpPinger)."""

    def ping(self, url: str, leader: str, ttl_s: float) -> str | None:
        """None: it promised not to campaign for ttl_s; else why not."""
        ...


# Every role a replica's view may have (a bounded set: metrics label by it).
ROLES = ("leader", "failsafe_leader", "standby", "unconfirmed", "starting")


@dataclass(frozen=True)
class Leadership:
    """One replica's view, for the gate and the status line."""

    role: str  # "leader", "failsafe_leader", "standby", "unconfirmed", "starting"
    may_act: bool
    leader: str | None  # who holds the key, as last seen
    problem: str | None = None  # said every cycle while it holds
    confirmed_for_s: float | None = None  # how long the leader's confirmation still lasts


@dataclass
class _Contact:
    ok_mono: float | None = None  # the last time etcd answered
    lost_since_mono: float | None = None
    error: str | None = None
    peers: dict[str, str] = field(default_factory=dict)  # member -> peer URL, as last seen


class Elector:
    def __init__(
        self,
        store: Store,
        *,
        prefix: str,
        member: str,
        ttl_s: int,
        mono: Clock,
        peer_url: str | None = None,
        pinger: PeerPinger | None = None,
        campaign: bool = True,
    ) -> None:
        """`prefix`: the group's keys (`{prefix}/leader`, `{prefix}/members/{member}`);
        `campaign = False`: observe only (a replica that must never lead)."""
        self.store = store
        self.key = f"{prefix}/leader"
        self.members_prefix = f"{prefix}/members/"
        self.member = member
        self.ttl_s = max(int(ttl_s), 2)
        self.mono = mono
        self.peer_url = peer_url
        self.pinger = pinger
        self.campaign = campaign
        self.lease_id: int | None = None
        self.is_leader = False
        self.leader: str | None = None
        self.confirmed_until: float = -float("inf")
        self.promised_until: float = -float("inf")  # to a failsafe leader: no campaign till then
        self.contact = _Contact()
        self._failsafe: tuple[float, str | None] | None = None  # (checked at, refusal)

    # -- one round -------------------------------------------------------------------------

    def step(self) -> None:
        """Renew the session, then take, keep or watch the leader key. Never raises. A session
        found lost is replaced and the round run again at once."""
        self._round()
        if self.lease_id is None and self.contact.lost_since_mono is None:
            self._round()

    def _round(self) -> None:
        sent = self.mono.now()
        try:
            self._session()
            holder = self.store.get(self.key)
            if holder is None and self.campaign and sent >= self.promised_until:
                assert self.lease_id is not None
                if self.store.create(self.key, self.member, self.lease_id):
                    holder = self.member
                else:
                    holder = self.store.get(self.key)
            self._held_by(holder, sent)
            self.contact.peers = self._peers()
            self._contact_ok(sent)
        except LeaseLostError as exc:
            # The session ended at etcd: whatever it held is gone, a new one starts next step.
            self.lease_id = None
            self._held_by(None, sent)
            self._contact_ok(sent, f"session lease lost ({exc})")
        except StoreError as exc:
            self._contact_lost(sent, str(exc))
            if self.is_leader:  # ask before the confirmation runs out: no gap
                self._ask_peers(sent)

    def _session(self) -> None:
        if self.lease_id is not None:
            self.store.refresh(self.lease_id)
            return
        self.lease_id = self.store.lease(self.ttl_s)
        info = {"member": self.member, "peer_url": self.peer_url}
        self.store.put(self.members_prefix + self.member, json.dumps(info), self.lease_id)

    def _held_by(self, holder: str | None, sent: float) -> None:
        self.leader = holder
        self.is_leader = holder == self.member
        if self.is_leader:
            # etcd received the renewal after `sent`: the lease lasts at least ttl from there.
            self.confirmed_until = sent + self.ttl_s * (1.0 - CLOCK_RATE_MARGIN)
            self._failsafe = None

    def _contact_ok(self, sent: float, error: str | None = None) -> None:
        self.contact.ok_mono = sent
        self.contact.lost_since_mono = None
        self.contact.error = error

    def _contact_lost(self, sent: float, error: str) -> None:
        if self.contact.lost_since_mono is None:
            self.contact.lost_since_mono = sent
        self.contact.error = error

    def _peers(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for key, value in self.store.get_prefix(self.members_prefix).items():
            member = key[len(self.members_prefix) :]
            if member == self.member:
                continue
            try:
                info = json.loads(value)
            except ValueError:
                continue
            url = info.get("peer_url") if isinstance(info, Mapping) else None
            found[member] = url if isinstance(url, str) else ""
        return found

    def resign(self) -> None:
        """Give the key up now (a clean stop): the standby need not wait for the TTL."""
        lease, self.lease_id = self.lease_id, None
        self.is_leader = False
        self.confirmed_until = -float("inf")
        if lease is not None:
            self.store.revoke(lease)

    # -- failsafe ----------------------------------------------------------------------------

    def promise(self, leader: str) -> bool:
        """A failsafe leader asks for our word: no campaign for one TTL. Refused if we lead."""
        if self.is_leader and self.mono.now() < self.confirmed_until:
            return False
        self.promised_until = self.mono.now() + self.ttl_s
        self.leader = leader
        return True

    def _ask_peers(self, now: float) -> None:
        """Ask every other replica for its word (at most every third of a TTL)."""
        if self._failsafe is not None and now - self._failsafe[0] < self.ttl_s / 3.0:
            return
        refusal: str | None = None
        for member, url in sorted(self.contact.peers.items()):
            if not url or self.pinger is None:
                refusal = f"replica {member} cannot be asked (it has no peer_listen)"
                break
            why = self.pinger.ping(url, self.member, float(self.ttl_s))
            if why is not None:
                refusal = f"replica {member}: {why}"
                break
        self._failsafe = (now, refusal)

    def _failsafe_refusal(self, now: float) -> str | None:
        """None: no other replica, or every one gave its word recently enough to count on (a
        word lasts a TTL from when it was asked for)."""
        if not self.contact.peers:
            return None
        fresh_s = self.ttl_s * (1.0 - CLOCK_RATE_MARGIN)
        if self._failsafe is None or now - self._failsafe[0] > fresh_s:
            return "the other replicas were not asked in time"
        return self._failsafe[1]

    # -- the view ----------------------------------------------------------------------------

    def view(self) -> Leadership:
        now = self.mono.now()
        lost = self.contact.lost_since_mono
        down = f"etcd unreachable for {now - lost:.0f} s ({self.contact.error})" if lost else None
        if self.is_leader and now < self.confirmed_until:
            return Leadership("leader", True, self.member, down, self.confirmed_until - now)
        if self.is_leader and lost is not None:
            refusal = self._failsafe_refusal(now)
            if refusal is None:
                others = len(self.contact.peers)
                word = (
                    f"every other replica ({others}) gave its word"
                    if others
                    else "no other replica"
                )
                return Leadership(
                    "failsafe_leader", True, self.member, f"{down}: leading on ({word})"
                )
            return Leadership(
                "unconfirmed",
                False,
                self.member,
                f"{down}: leadership lapsed and {refusal}: not acting",
            )
        if self.contact.ok_mono is None and lost is None:
            return Leadership("starting", False, None, "leader election: no answer from etcd yet")
        if self.is_leader:  # etcd answers, but our renewals came too late (a stalled host)
            late = now - self.confirmed_until
            why = f"leadership not renewed in time ({late:.1f} s late): not acting"
            return Leadership("unconfirmed", False, self.member, why)
        problem = down or self.contact.error
        return Leadership("standby", False, self.leader, problem)
