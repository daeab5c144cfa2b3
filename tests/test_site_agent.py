"""The agent's side of a site and the coordinator's HTTP: the loop's gate (a standby observes and
orients, acts on nothing, and reads what the other replica did when it takes over), the budget
source's problems said every cycle, the rise after a lapse, the `[site]` section, the webhook
(loopback, authenticated) and the status endpoint, and `ooda site check`."""

from __future__ import annotations

import itertools
import json
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.act.audit import AuditLog
from agent.assembly import twin_agent
from agent.cli import main
from agent.config import parse_config
from agent.core.clock import FakeClock
from agent.core.coordination import BudgetReading, Standing
from agent.core.errors import ConfigError
from agent.core.situation import Situation
from agent.core.snapshot import Snapshot
from agent.loop import CycleReport, Loop
from agent.sim.twin import Twin, TwinSpec
from agent.site.grants import Grant, GrantKeeper
from agent.site.service import SiteService
from agent.site.settings import parse_site_config
from agent.site.store import MemoryStore
from policies.registry import builtin_registry


class Election:
    """A hand-written election: this replica may act or not, as the test says."""

    def __init__(self, may_act: bool = False) -> None:
        self.may_act = may_act
        self.asked = 0

    def standing(self) -> Standing:
        self.asked += 1
        return Standing(self.may_act, None if self.may_act else "standby: b leads")


class Budget:
    """A hand-written budget source."""

    def __init__(self, watts: float, problem: str | None = None) -> None:
        self.watts = watts
        self.problem = problem
        self.seen: list[Situation] = []

    def read_budget(self, snapshot: Snapshot) -> BudgetReading:
        return BudgetReading(self.watts, self.problem)

    def oriented(self, situation: Situation) -> None:
        self.seen.append(situation)


def _replica(twin: Twin, audit: Path, election: Election, budget: Budget) -> Loop:
    """One replica of the cluster's agent, through the assembly, on the shared audit log."""
    loop = twin_agent(
        twin, ("power_budget",), registry=builtin_registry(), audit=AuditLog(path=audit)
    ).loop
    loop.budget_w, loop.election = budget, election
    return loop


def _run(twin: Twin, loop: Loop) -> CycleReport:
    twin.run_until(twin.t_s + 15.0)
    return loop.cycle()


def test_a_standby_observes_and_orients_but_never_acts_and_reads_back_on_takeover(
    tmp_path: Path,
) -> None:
    twin = Twin(TwinSpec(nodes=2, gpus_per_node=8, seed=2))
    audit = tmp_path / "audit.jsonl"  # the replicas' shared audit log
    leader = _replica(twin, audit, Election(may_act=True), Budget(5000.0))
    election, budget = Election(), Budget(5000.0, "etcd unreachable for 3 s")
    standby = _replica(twin, audit, election, budget)
    caps_before = twin.cap_w.copy()
    acted = 0
    for _ in range(3):
        twin.run_until(twin.t_s + 15.0)
        acted += len(leader.cycle().actions)
        report = standby.cycle()
        assert not report.actions and not report.intents and not report.settled
        assert "leadership: standby: b leads" in report.errors
        assert "site: etcd unreachable for 3 s" in report.errors
        assert report.situation.budget_w == 5000.0  # oriented under the budget it would have
        assert set(report.stage_s) == {"observe", "orient"}
    assert acted and (twin.cap_w < caps_before).any()  # the leader capped GPUs
    assert len(budget.seen) == 3 and standby.orienter.to_dict()  # its models saw every cycle
    assert not standby.ledger.capped_by_us(twin.uuid).any()
    # The leader dies; the standby leads from its next cycle, and reads back what the leader
    # did (it never acted: the whole record) into its ledger before it decides anything.
    election.may_act = True
    report = _run(twin, standby)
    theirs = leader.ledger.capped_by_us(twin.uuid)
    assert report.settled.get("adopted", 0) == int(theirs.sum()) > 0
    assert (standby.ledger.capped_by_us(twin.uuid) == theirs).all()
    assert standby.read_through_s == report.time_s
    # Only at the takeover: the next cycle reads nothing back.
    assert not _run(twin, standby).settled


def test_a_loop_without_an_election_never_reads_back(tmp_path: Path) -> None:
    """A cluster's only agent knows the record from its own cycles and the daemon's start: a
    cycle after a pause must not read the log again (its node actions would count twice)."""
    twin = Twin(TwinSpec(nodes=2, gpus_per_node=8, seed=2))
    audit = tmp_path / "audit.jsonl"
    other = _replica(twin, audit, Election(may_act=True), Budget(5000.0))
    loop = twin_agent(
        twin, ("power_budget",), registry=builtin_registry(), audit=AuditLog(path=audit)
    ).loop
    loop.budget_w = 5000.0
    _run(twin, other)
    report = _run(twin, loop)
    assert not report.settled and loop.election is None


def test_a_budget_that_would_rise_at_a_lapse_waits_an_interval() -> None:
    wall = FakeClock(1000.0)
    keeper = GrantKeeper("c1", 500.0, wall, wall, rise_delay_s=17.0)
    keeper.offer(Grant("c1", 300.0, 4, 1000.0, 60.0))
    wall.advance(61)
    held = keeper.view()
    assert held.watts == 300.0 and held.source == "lapsing"
    assert held.problem is not None and "rising to the safe share 500 W in 16 s" in held.problem
    wall.advance(17)
    assert keeper.view().watts == 500.0
    # A grant above its safe share comes down at once.
    keeper.offer(Grant("c1", 900.0, 5, wall.now(), 60.0))
    wall.advance(61)
    assert keeper.view().watts == 500.0


def test_the_site_section_of_an_agent_config() -> None:
    config = parse_config(
        {"cluster": {"name": "c1"}, "site": {"name": "hall", "safe_share_w": 9e3}}
    )
    assert config.site is not None and config.site.etcd.endpoints == ["http://127.0.0.1:2379"]
    with pytest.raises(ConfigError, match="site: peer_listen: needs peer_token_file"):
        parse_config({"site": {"name": "hall", "safe_share_w": 1.0, "peer_listen": "127.0.0.1:1"}})
    with pytest.raises(ConfigError, match=r"cluster\.budget_query: a cluster in a"):
        parse_config(
            {
                "source": {"kind": "prometheus"},
                "cluster": {"budget_query": "x"},
                "site": {"name": "hall", "safe_share_w": 1.0},
            }
        )
    with pytest.raises(ConfigError, match=r"site.etcd.endpoints: .*not an etcd client URL"):
        parse_config({"site": {"name": "hall", "safe_share_w": 1.0, "etcd": {"endpoints": ["x"]}}})


# -- the coordinator's HTTP --------------------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path) -> Any:
    token = secrets.token_urlsafe(24)
    token_file = tmp_path / "dr.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    config = parse_site_config(
        {
            "site": {"name": "hall", "limit_w": 3000.0, "listen": "127.0.0.1:0",
                     "token_file": str(token_file), "interval_s": 10.0},
            "clusters": {"c1": {"safe_share_w": 1000.0}, "c2": {"safe_share_w": 1000.0}},
            "demand_response": {"ramp_w_per_s": 10.0},
        }
    )  # fmt: skip
    clock = FakeClock(1_800_000_000.0)
    svc = SiteService(config, store=MemoryStore(clock), wall=clock)
    svc.start_http()
    yield svc, token
    svc.close()


def test_the_webhook_takes_authenticated_events_and_the_status_shows_them(service: Any) -> None:
    svc, token = service
    url = svc.server.url
    event = {"id": "grid-1", "start": "2027-01-15T08:00:00Z", "duration_s": 1800, "target_w": 2e3}
    assert httpx.post(f"{url}/v1/demand-response", json=event, timeout=5).status_code == 401
    wrong = {"Authorization": "Bearer " + "x" * 24}
    assert httpx.post(f"{url}/v1/demand-response", json=event, headers=wrong).status_code == 403
    auth = {"Authorization": f"Bearer {token}"}
    bad = httpx.post(f"{url}/v1/demand-response", json={**event, "target_w": -1}, headers=auth)
    assert bad.status_code == 400 and "body.target_w" in bad.json()["error"]
    ok = httpx.post(f"{url}/v1/demand-response", json=event, headers=auth, timeout=5)
    assert ok.status_code == 202 and ok.json() == {"accepted": "grid-1"}
    stored = svc.store.get_prefix("/ooda/sites/hall/demand/events/")
    assert json.loads(stored["/ooda/sites/hall/demand/events/grid-1"])["target_w"] == 2000.0
    svc.round()
    status = httpx.get(f"{url}/v1/status", timeout=5).json()  # no token needed to read
    # The clock is 2027-01-15T08:00:00Z: the event holds now.
    assert status["role"] == "leader" and status["round"]["limit_w"] == 2000.0
    assert status["round"]["demand_response"]["event"] == "grid-1"
    assert status["round"]["clusters"]["c1"]["problem"] == "no curve (no agent leads it)"


def test_ooda_site_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        '[site]\nname = "hall"\nlimit_w = 1000\n[clusters.a]\nsafe_share_w = 600\n'
        "[clusters.b]\nsafe_share_w = 600\n"
    )
    assert main(["site", "check", "--config", str(path)]) == 2
    assert "safe shares under 'hall' exceed its limit by 200 W" in capsys.readouterr().err
    path.write_text(path.read_text().replace("600", "400"))
    assert main(["site", "check", "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ok"] is True


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"x = " + b"[" * 50_000 + b"]" * 50_000 + b"\n", ["nested too deeply"]),
        (b'[site]\nname = "caf\xe9"\n', ["line 2: not UTF-8"]),
        (b"#" * (2 << 20), ["larger than 1048576 bytes"]),
    ],
)
@pytest.mark.parametrize("where", ["site config", "schedule"])
def test_hostile_site_files_are_one_line_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    where: str,
    content: bytes,
    words: list[str],
) -> None:
    """A site config or its schedule nested deep enough to exhaust the TOML parser's stack is
    refused as bad input (before the fix: "unexpected failure ... this is a bug", exit 1); too
    large or not UTF-8 likewise."""
    site, schedule = tmp_path / "site.toml", tmp_path / "events.toml"
    good = (
        '[site]\nname = "hall"\nlimit_w = 1000\n[clusters.a]\nsafe_share_w = 400\n'
        '[demand_response]\nramp_w_per_s = 10\nschedule_file = "events.toml"\n'
    )
    site.write_text(good)
    (site if where == "site config" else schedule).write_bytes(content)
    assert main(["site", "check", "--config", str(site)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{where} {tmp_path}" in err, err
    for word in words:
        assert word in err, err


def test_the_site_examples_are_valid() -> None:
    from agent.config import load_config
    from agent.site.demand import load_schedule
    from agent.site.settings import load_site_config

    deploy = Path(__file__).resolve().parent.parent / "deploy" / "site"
    site = load_site_config(deploy / "site.toml")
    assert site.demand_response is not None and site.demand_response.schedule_file is not None
    assert load_schedule(site.demand_response.schedule_file)  # found beside the site's file
    agent = load_config(deploy / "agent.toml")
    assert agent.site is not None and agent.site.name == site.site.name
    assert agent.cluster.name in site.clusters
    assert agent.site.safe_share_w == site.clusters[agent.cluster.name].safe_share_w
    assert agent.dry_run


def test_openadr_events_map_to_site_targets() -> None:
    from datetime import UTC, datetime, timedelta

    from agent.site.openadr import OpenAdrError, events_from_openadr

    start = datetime(2027, 7, 1, 14, tzinfo=UTC)
    event = {
        "event_descriptor": {"event_id": "ev1"},
        "event_signals": [
            {
                "signal_name": "LOAD_DISPATCH",
                "signal_type": "setpoint",
                "measurement": {"name": "powerReal", "scale": "k"},
                "intervals": [
                    {"dtstart": start, "duration": timedelta(hours=1), "signal_payload": 1500},
                ],
            },
            {
                "signal_name": "SIMPLE",
                "signal_type": "level",
                "intervals": [
                    {"dtstart": start, "duration": timedelta(hours=2), "signal_payload": 3},
                ],
            },
        ],
    }
    a, b = events_from_openadr(event, 2e6)
    assert (a.event_id, a.target_w, a.duration_s, a.source) == ("ev1.0", 1.5e6, 3600.0, "openadr")
    assert a.start_unix == start.timestamp() and b.target_w == 0.5 * 2e6
    event["event_signals"] = [{**event["event_signals"][0], "measurement": None}]
    with pytest.raises(OpenAdrError, match="setpoint: needs a real-power measurement"):
        events_from_openadr(event, 2e6)
    event["event_signals"] = [{"signal_name": "ENERGY_PRICE", "signal_type": "price"}]
    with pytest.raises(OpenAdrError, match="no interval"):
        events_from_openadr(event, 2e6)


class Heartbeat:
    """A hand-written supervisor: records what it is told, stops the service after `rounds`."""

    def __init__(self, service: SiteService | None = None, rounds: int = 3) -> None:
        self.service = service
        self.rounds = rounds
        self.watchdog_s: float | None = 0.04
        self.said: list[str] = []
        self.leader_key: str | None = None

    def ready(self, status: str) -> None:
        self.said.append(f"ready {status}")
        assert self.service is not None
        self.leader_key = self.service.store.get("/ooda/sites/hall/coordinator/leader")

    def status(self, status: str) -> None:
        self.said.append(f"status {status}")
        if sum(s.startswith(("ready", "status")) for s in self.said) >= self.rounds:
            assert self.service is not None
            self.service._stop = True  # as SIGTERM's handler does

    def watchdog(self) -> None:
        self.said.append("watchdog")

    def stopping(self, status: str = "stopping") -> None:
        self.said.append("stopping")


def test_the_service_says_ready_after_a_round_and_feeds_the_watchdog_between_rounds() -> None:
    config = parse_site_config(
        {
            "site": {"name": "hall", "limit_w": 3000.0, "interval_s": 0.2},
            "clusters": {"c1": {"safe_share_w": 1000.0}},
        }
    )
    clock = FakeClock(1_800_000_000.0)
    heartbeat = Heartbeat()
    svc = SiteService(config, store=MemoryStore(clock), wall=clock, heartbeat=heartbeat)
    heartbeat.service = svc
    assert svc.serve() == 0
    said = heartbeat.said
    assert said[0].startswith("ready site hall, leader: round ") and "limits kept" in said[0]
    rounds = [i for i, s in enumerate(said) if s.startswith(("ready", "status"))]
    assert len(rounds) == 3 and said[-1] == "stopping"
    # Between two rounds (0.2 s apart) the watchdog is fed every 0.02 s or so, not once a round.
    assert all(said[i + 1 : j].count("watchdog") >= 3 for i, j in itertools.pairwise(rounds))
    assert heartbeat.leader_key is not None  # it led
    # ... and resigned on the way out.
    assert svc.store.get("/ooda/sites/hall/coordinator/leader") is None
