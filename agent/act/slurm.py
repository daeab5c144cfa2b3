"""Slurm placement through the Slurm CLIs: `sinfo --json`, `squeue --json` and `scontrol`.

pyslurm has no release for Debian's Slurm 22.05 and `scontrol --json` does not exist there, so every
read is `sinfo --json` / `squeue --json` and every change one `scontrol update` (or `requeue`), run
with a timeout; any failure is an ActuatorError that names the command and quotes Slurm's answer.

What the agent promises here (its ownership rules):
- Its drains carry a reason starting `ooda:` (added when the intent's reason lacks it). It never
  drains, resumes or re-reasons a node that someone else drained or set down, and it resumes only
  its own drains.
- Its node features carry a prefix (`ooda_` by default; added when missing) and it only ever
  removes features with that prefix: the site's own features are left as they are.
- On a node someone else drained or set down, or that carries the opt-out feature (`ooda-ignore`),
  it makes no change except undoing its own (removing its features, giving back the weight it
  found, resuming its own drain).
- `scontrol reconfigure` and a slurmctld restart reset runtime weights and features to slurm.conf
  (drains survive). The actuator remembers the weights and features it set and re-applies them
  when it sees them gone (`reconcile()`, run on every `node_states`). Only what this process set
  is re-applied: a dry-run agent, which sets nothing, never writes to Slurm (after an agent
  restart the policies re-assert what they still want).
- A requeued job goes back to PENDING with a BeginTime about two minutes out (Slurm's requeue
  delay). Once it is PENDING (not while COMPLETING: an update then is overwritten), `reconcile()`
  sets its StartTime to now so it restarts at once, away from the drained node.
- Slurm is reached through the CLIs only; a slurmctld that is down makes the clients retry for
  about 9 s and `sinfo/squeue --json` then print an empty list with an error and exit 0: both
  become an ActuatorError ("slurmctld not answering") within `timeout_s`.
- Between reading a node and updating it another party may change it (Slurm has no
  compare-and-set); the window is one CLI round trip (about 10 ms).

A Kubernetes actuator implements the same two protocols (PlacementActuator, JobInventory):
- drain -> cordon (`spec.unschedulable = true`) plus a `NoSchedule` taint `ooda.io/drain` whose
  value, and an annotation `ooda.io/drain-reason`, carry the `ooda:` reason (ownership: a node
  cordoned without our taint is someone else's), then evict its GPU pods through the Eviction API
  (PodDisruptionBudgets respected); resume -> remove our taint and uncordon, only if the taint is
  ours.
- set_weight -> a `PreferNoSchedule` taint (or a node label a scheduler score plugin reads):
  Kubernetes has no node weight, only preferences.
- set_features -> node labels under the `ooda.io/` prefix (never other labels); opt-out -> the
  label `ooda-ignore`. Labels and taints persist in etcd, so no re-application is needed.
- requeue -> evict or delete the job's pod: its controller (Job, JobSet...) recreates it; with a
  podFailurePolicy that ignores the DisruptionTarget condition it does not count as a failure.
- jobs() -> pods with their node and `nvidia.com/gpu` devices (kubelet's PodResources API, or
  dcgm-exporter's pod labels), priority from the pod's PriorityClass through the same map.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hostlist
import numpy as np
import structlog
from pydantic import BaseModel, Field

from agent.core.errors import ActuatorError
from agent.core.jobs import NO_GPU, JobRecord, JobState, JobTable
from agent.core.settings import STRICT_SETTINGS, file_field
from agent.core.situation import NodeStates

log = structlog.get_logger("ooda.act.slurm")

OWNER_PREFIX = "ooda:"
MAX_REASON_CHARS = 200
MAX_WEIGHT = 2**31 - 1
REQUEUE_FOLLOW_S = 600.0  # stop following a requeued job after this long

_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # one node: no commas, no brackets
_JOB_ID = re.compile(r"^[0-9]+(_[0-9]+)?$")
_FEATURE = re.compile(r"^[A-Za-z0-9_.-]+$")
# One item of a GPU index list: `3` or `0-7` (ASCII digits, a few of them).
_INDEX_ITEM = re.compile(r"([0-9]{1,6})(?:-([0-9]{1,6}))?")
MAX_GPUS_PER_NODE = 1024  # a range wider than this is not a real allocation
SACCT_BATCH = 200  # job ids per sacct call
SACCT_SINCE = "2000-01-01T00:00:00"  # sacct's -S: every job the database holds
_GPU_IDX = re.compile(r"gpu(?::[^:(,]+)?(?::\d+)?\(IDX:([^)]*)\)")

_STATES = {
    "PENDING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.COMPLETING,
    "SUSPENDED": JobState.SUSPENDED,
    "STOPPED": JobState.SUSPENDED,
}


class SlurmSettings(BaseModel):
    """`[actuators.slurm]`: where Slurm is and how the agent maps it."""

    model_config = STRICT_SETTINGS

    slurm_conf: Path | None = Field(
        None,
        strict=False,
        description="slurm.conf for the CLIs (SLURM_CONF); none: the environment's.",
        json_schema_extra=file_field("file"),
    )
    bin_dir: Path | None = Field(
        None,
        strict=False,
        description="Directory holding scontrol, sinfo and squeue; none: PATH.",
        json_schema_extra=file_field("directory"),
    )
    timeout_s: float = Field(
        10.0, gt=0, le=300, description="Limit for one Slurm command (s); then an error."
    )
    feature_prefix: str = Field(
        "ooda_",
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Prefix of the node features the agent owns (the only ones it removes).",
    )
    opt_out_feature: str = Field(
        "ooda-ignore",
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="A node with this feature is never changed by the agent.",
    )
    priority_by_qos: dict[str, int] = Field(
        default_factory=dict, description="QoS name -> priority class (checked first)."
    )
    priority_by_partition: dict[str, int] = Field(
        default_factory=dict, description="Partition name -> priority class."
    )
    default_priority: int = Field(0, description="Priority class of jobs no map matches.")
    reapply: bool = Field(
        True,
        description="Re-apply our weights and features after a reconfigure or restart reset them.",
    )
    restart_requeued: bool = Field(
        True, description="Start jobs we requeued at once (clear Slurm's requeue BeginTime)."
    )
    shares_refresh_s: float = Field(
        300.0, gt=0, description="Read the accounts' fairshare (sshare) at most this often (s)."
    )


class SlurmCli:
    """Runs one Slurm client command with SLURM_CONF set and a timeout."""

    def __init__(
        self, slurm_conf: Path | None = None, bin_dir: Path | None = None, timeout_s: float = 10.0
    ) -> None:
        self.slurm_conf = slurm_conf
        self.bin_dir = bin_dir
        self.timeout_s = timeout_s
        self.env = dict(os.environ)
        if slurm_conf is not None:
            self.env["SLURM_CONF"] = str(slurm_conf)
        self.calls = 0

    def _where(self) -> str:
        conf = self.slurm_conf or self.env.get("SLURM_CONF") or "the default slurm.conf"
        return f"slurmctld of {conf}"

    def run(self, tool: str, *args: str) -> str:
        """stdout of `tool args`; ActuatorError naming the command on any failure."""
        exe = str(self.bin_dir / tool) if self.bin_dir is not None else tool
        command = " ".join([tool, *args])
        self.calls += 1
        try:
            # Its own session, so a timeout kills everything it started (a site's wrapper script
            # around the real client, say), not just the first process.
            proc = subprocess.Popen(
                [exe, *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                env=self.env,
                start_new_session=True,
            )
        except OSError as exc:
            where = f" in {self.bin_dir}" if self.bin_dir is not None else " on PATH"
            raise ActuatorError(f"`{command}`: cannot run {tool}{where}: {exc.strerror}") from None
        try:
            stdout, stderr = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise ActuatorError(
                f"`{command}` timed out after {self.timeout_s:g} s: "
                f"the {self._where()} is not answering (is it running?)"
            ) from None
        if proc.returncode != 0:
            message = " ".join((stderr.strip() or stdout.strip()).split())
            if "Unable to contact slurm controller" in message:
                message += f" (the {self._where()} is not answering: is it running?)"
            raise ActuatorError(f"`{command}` failed (rc {proc.returncode}): {message}")
        return stdout

    def json(self, tool: str, *args: str) -> dict[str, Any]:
        """`tool --json args` parsed; Slurm's `errors` list is an ActuatorError (with slurmctld
        down, 22.05 prints an empty list, one error, and exits 0)."""
        command = " ".join([tool, "--json", *args])
        text = self.run(tool, "--json", *args)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ActuatorError(f"`{command}`: not valid JSON ({exc.msg} at {exc.pos})") from None
        if not isinstance(data, dict):
            raise ActuatorError(f"`{command}`: expected a JSON object")
        errors = data.get("errors") or []
        if errors:
            details = "; ".join(
                " ".join(
                    str(e.get(k))
                    for k in ("source", "description", "error")
                    if isinstance(e, dict) and e.get(k)
                )
                for e in errors
            )
            raise ActuatorError(
                f"`{command}`: Slurm reported: {details if details else repr(errors)} "
                f"(is the {self._where()} running?)"
            )
        return data


@dataclass(frozen=True, slots=True)
class SlurmNode:
    """One node as `sinfo --json` shows it."""

    name: str
    state: str  # base state, lower case: idle, mixed, allocated, down, ...
    flags: frozenset[str]  # DRAIN, NOT_RESPONDING, ...
    reason: str
    weight: int
    features: frozenset[str]  # available features
    active_features: frozenset[str]
    partitions: frozenset[str] = frozenset()

    @property
    def drained(self) -> bool:
        """Out of service on purpose or by failure: drained, draining, down or failing."""
        return "DRAIN" in self.flags or "FAIL" in self.flags or self.state in ("down", "error")

    @property
    def drained_by_us(self) -> bool:
        return self.drained and self.reason.startswith(OWNER_PREFIX)

    @property
    def held_by_others(self) -> bool:
        return self.drained and not self.drained_by_us

    @staticmethod
    def from_json(entry: Mapping[str, Any]) -> SlurmNode:
        return SlurmNode(
            name=str(entry["name"]),
            state=str(entry.get("state") or "unknown").lower(),
            flags=frozenset(str(f).upper() for f in entry.get("state_flags") or ()),
            reason=str(entry.get("reason") or ""),
            weight=int(entry.get("weight") or 0),
            features=_split(entry.get("features")),
            active_features=_split(entry.get("active_features")),
            partitions=_partitions(entry),
        )


def _partitions(entry: Mapping[str, Any]) -> frozenset[str]:
    """A node's partitions: 22.05 lists them per node (`partitions`), older ones one entry per
    partition (`partition`)."""
    raw = entry.get("partitions")
    if isinstance(raw, list | tuple):
        return frozenset(str(p) for p in raw if p)
    return _split(raw or entry.get("partition"))


def _split(value: Any) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(part for part in str(value).split(",") if part)


def expand_hostlist(text: str) -> list[str]:
    """Slurm's hostlist syntax to names: `node[1-3,7],gpu[01-02]-b` -> node1 node2 node3 node7
    gpu01-b gpu02-b (python-hostlist; zero padding kept, order kept)."""
    try:
        names: list[str] = hostlist.expand_hostlist(text.strip())
    except hostlist.BadHostlist as exc:
        raise ActuatorError(f"slurm: cannot read the node list {text!r}: {exc}") from None
    return names


def parse_index_list(text: str) -> list[int]:
    """`0-2,5` -> [0, 1, 2, 5]; `N/A` or empty -> []. An item that is not an index or a range
    of them (`1-x`, `3-1`, a range wider than any node's GPUs) is skipped: Slurm's text is read,
    never trusted to size a list."""
    out: list[int] = []
    for raw in text.split(","):
        match = _INDEX_ITEM.fullmatch(raw.strip())
        if match is None:
            continue
        lo = int(match.group(1))
        hi = lo if match.group(2) is None else int(match.group(2))
        if lo <= hi < lo + MAX_GPUS_PER_NODE:
            out.extend(range(lo, hi + 1))
    return out


def gpus_from_gres_detail(entry: str) -> list[int]:
    """GPU indices from one `gres_detail` entry (`gpu:2(IDX:0-1)`, `gpu:h100:1(IDX:3)`)."""
    out: list[int] = []
    for match in _GPU_IDX.finditer(entry):
        out.extend(parse_index_list(match.group(1)))
    return sorted(set(out))


def _epoch(value: Any) -> float | None:
    """A Slurm time (Unix seconds; 0 or missing: none). 23.02+ wraps numbers in
    {"set": bool, "number": N}."""
    if isinstance(value, Mapping):
        value = value.get("number") if value.get("set", True) else None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 else None


def _squeue_record(job_id: str, job: Mapping[str, Any]) -> JobRecord:
    state = str(job.get("job_state") or "").upper()
    return JobRecord(
        job=job_id,
        user=str(job.get("user_name") or ""),
        account=str(job.get("account") or ""),
        partition=str(job.get("partition") or ""),
        qos=str(job.get("qos") or ""),
        state=str(_STATES.get(state, JobState.FINISHED)),
        start_s=_epoch(job.get("start_time")),
        end_s=_epoch(job.get("end_time")),
        source="squeue",
    )


def _sacct_record(job: Mapping[str, Any]) -> JobRecord | None:
    job_id = str(job.get("job_id") or "")
    if not job_id:
        return None
    state = job.get("state")
    current = state.get("current") if isinstance(state, Mapping) else state
    raw = job.get("time")
    times: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    name = str(current or "").upper()
    return JobRecord(
        job=job_id,
        user=str(job.get("user") or ""),
        account=str(job.get("account") or ""),
        partition=str(job.get("partition") or ""),
        qos=str(job.get("qos") or ""),
        state=str(_STATES.get(name, JobState.FINISHED)) if name else "",
        start_s=_epoch(times.get("start")),
        end_s=_epoch(times.get("end")),
        source="sacct",
    )


def parse_sshare(text: str) -> dict[str, float]:
    """`sshare -a -P -o Account,User,NormShares` -> account -> NormShares (account rows only: no
    user; the root row left out). Lines that do not parse are skipped."""
    shares: dict[str, float] = {}
    for line in text.splitlines()[1:]:
        parts = line.split("|")
        if len(parts) < 3 or parts[1].strip():
            continue
        account = parts[0].strip()
        try:
            share = float(parts[2])
        except ValueError:
            continue
        if account and account != "root" and math.isfinite(share) and share >= 0:
            shares[account] = share
    return shares


def _job_nodes(job: Mapping[str, Any]) -> list[str]:
    resources = job.get("job_resources") or {}
    allocated = resources.get("allocated_nodes") if isinstance(resources, dict) else None
    if allocated:
        return [str(n.get("nodename", "")) for n in allocated]
    return expand_hostlist(str(job.get("nodes") or ""))


class SlurmPlacement:
    """The PlacementActuator and JobInventory protocols on a real Slurm, through its CLIs."""

    def __init__(self, settings: SlurmSettings | None = None, cli: SlurmCli | None = None) -> None:
        self.settings = settings or SlurmSettings()
        s = self.settings
        self.cli = cli or SlurmCli(s.slurm_conf, s.bin_dir, s.timeout_s)
        self._weights: dict[str, int] = {}  # node -> the weight we want while we hold it
        self._found_weights: dict[str, int] = {}  # node -> its weight before our first change
        self._features: dict[str, frozenset[str]] = {}  # node -> our features it should carry
        self._requeued: dict[str, float] = {}  # job -> monotonic time of our requeue
        self._records: dict[str, JobRecord] | None = None  # who runs each job, from squeue
        self._sacct_ok = True  # False once sacct said accounting is disabled
        self._shares: tuple[float, dict[str, float]] | None = None  # (monotonic time, shares)
        self.reapplied: list[str] = []  # what reconcile() re-applied or failed to, newest last

    # -- reading ------------------------------------------------------------------------------

    def nodes(self) -> dict[str, SlurmNode]:
        """Every node Slurm knows, by name."""
        data = self.cli.json("sinfo")
        out: dict[str, SlurmNode] = {}
        for entry in data.get("nodes") or ():
            node = SlurmNode.from_json(entry)
            seen = out.get(node.name)  # a node in several partitions may repeat
            out[node.name] = (
                node
                if seen is None
                else replace(seen, partitions=seen.partitions | node.partitions)
            )
        if not out:
            raise ActuatorError("`sinfo --json`: Slurm reported no nodes")
        return out

    def all_nodes(self) -> list[str]:
        """Every node Slurm manages (rollback checks them all for our drains)."""
        return sorted(self.nodes())

    def _node(self, name: str, nodes: Mapping[str, SlurmNode] | None = None) -> SlurmNode:
        if not _NODE_NAME.match(name):
            raise ActuatorError(f"slurm: {name!r} is not a single node name")
        nodes = self.nodes() if nodes is None else nodes
        if name not in nodes:
            raise ActuatorError(f"slurm: no node named {name!r}")
        return nodes[name]

    def _opted_out(self, node: SlurmNode) -> bool:
        opt = self.settings.opt_out_feature
        return opt in node.features or opt in node.active_features

    def node_states(self, node_names: Sequence[str]) -> NodeStates:
        """Per name (aligned): Slurm's view, after re-applying what a reset took away."""
        nodes = self.nodes()
        if self.reconcile(nodes):
            nodes = self.nodes()
        known = np.array([n in nodes for n in node_names], dtype=bool)
        rows = [nodes.get(n) for n in node_names]
        features = tuple(
            (r.features | r.active_features) if r is not None else frozenset() for r in rows
        )
        return NodeStates(
            drained=np.array([r is not None and r.drained for r in rows], dtype=bool),
            drained_by_us=np.array([r is not None and r.drained_by_us for r in rows], dtype=bool),
            reason=np.array([r.reason if r is not None else "" for r in rows], dtype=np.str_),
            weight=np.array([r.weight if r is not None else 1 for r in rows], dtype=np.int64),
            features=features,
            opted_out=np.array(
                [r is not None and self._opted_out(r) for r in rows], dtype=bool
            ).reshape(-1),
            known=known.reshape(-1),
            partitions=tuple(r.partitions if r is not None else frozenset() for r in rows),
        )

    def _priority(self, job: Mapping[str, Any]) -> int:
        s = self.settings
        qos = str(job.get("qos") or "")
        if qos in s.priority_by_qos:
            return s.priority_by_qos[qos]
        for partition in str(job.get("partition") or "").split(","):
            if partition in s.priority_by_partition:
                return s.priority_by_partition[partition]
        return s.default_priority

    def jobs(self) -> JobTable:
        """Every job slurmctld holds: state, priority class (QoS, else partition, through the
        settings' maps), restarts, account, and for running jobs the GPUs of each node they hold
        (from squeue's gres_detail, one entry per allocated node). Who runs each job is kept for
        `job_records` (the meter asks for jobs it books for the first time)."""
        data = self.cli.json("squeue")
        rows: list[tuple[str, JobState, int, int]] = []
        allocs: list[tuple[int, str, int]] = []
        accounts: list[str] = []
        records: dict[str, JobRecord] = {}
        for job in data.get("jobs") or ():
            state = _STATES.get(str(job.get("job_state", "")).upper(), JobState.FINISHED)
            k = len(rows)
            job_id = str(job["job_id"])
            rows.append((job_id, state, self._priority(job), int(job.get("restart_cnt") or 0)))
            accounts.append(str(job.get("account") or ""))
            records[job_id] = _squeue_record(job_id, job)
            if state is not JobState.RUNNING:
                continue
            details = [str(d) for d in job.get("gres_detail") or ()]
            for i, node in enumerate(_job_nodes(job)):
                gpus = gpus_from_gres_detail(details[i]) if i < len(details) else []
                allocs.extend((k, node, g) for g in gpus or [NO_GPU])
        self._records = records
        return JobTable.build(rows, allocs, accounts)

    # -- accounting (the meter) and shares (power_budget) --------------------------------------

    def job_records(self, job_ids: Sequence[str]) -> dict[str, JobRecord]:
        """Who ran each job: from the last `squeue` read while it runs (read now if none was),
        else from `sacct` once it ended (where slurmdbd keeps accounting). Jobs neither knows are
        left out; ids that are not job ids are never passed to Slurm."""
        if self._records is None:
            self.jobs()
        known = self._records or {}
        out = {j: known[j] for j in job_ids if j in known}
        rest = [j for j in job_ids if j not in out and _JOB_ID.match(j)]
        if rest and self._sacct_ok:
            for start in range(0, len(rest), SACCT_BATCH):
                out.update(self._sacct(rest[start : start + SACCT_BATCH]))
        return out

    def _sacct(self, job_ids: Sequence[str]) -> dict[str, JobRecord]:
        try:
            data = self.cli.json("sacct", "-X", "-S", SACCT_SINCE, "-j", ",".join(job_ids))
        except ActuatorError as exc:
            if "accounting storage is disabled" in str(exc).lower():
                self._sacct_ok = False  # no slurmdbd: ended jobs stay unattributed, said once
                log.warning("slurm_accounting_disabled", error=str(exc))
                return {}
            raise
        out: dict[str, JobRecord] = {}
        for job in data.get("jobs") or ():
            record = _sacct_record(job)
            if record is not None:
                out[record.job] = record
        return out

    def account_shares(self) -> dict[str, float]:
        """Each account's normalized share of the cluster from Slurm's fairshare tree
        (`sshare`'s NormShares, the account's share of the whole tree); empty without
        accounting. Read at most every `shares_refresh_s`."""
        now = time.monotonic()
        if self._shares is not None and now - self._shares[0] < self.settings.shares_refresh_s:
            return dict(self._shares[1])
        # A failure, too, waits a refresh before the next try (and keeps the last shares).
        self._shares = (now, self._shares[1] if self._shares is not None else {})
        try:
            text = self.cli.run("sshare", "-a", "-P", "-o", "Account,User,NormShares")
        except ActuatorError as exc:
            if "accounting storage is disabled" not in str(exc).lower():
                raise
            text = ""
        shares = parse_sshare(text)
        self._shares = (now, shares)
        return dict(shares)

    # -- keeping what we set --------------------------------------------------------------------

    def reconcile(self, nodes: Mapping[str, SlurmNode] | None = None) -> list[str]:
        """Re-apply our weights and features where a reconfigure or a controller restart reset
        them, and restart jobs we requeued once Slurm has them pending. Returns what it did."""
        nodes = self.nodes() if nodes is None else nodes
        done: list[str] = []
        failed: list[str] = []
        if self.settings.reapply:
            for name, weight in list(self._weights.items()):
                node = nodes.get(name)
                if node is None or node.weight == weight or self._blocked(node):
                    continue
                what = f"{name}: weight {node.weight} -> {weight} (re-applied)"
                try:
                    self._update(name, f"weight={weight}")
                    done.append(what)
                except ActuatorError as exc:  # one node failing must not hide the others
                    failed.append(f"{what} failed: {exc}")
            for name, wanted in list(self._features.items()):
                node = nodes.get(name)
                if node is None or self._blocked(node):
                    continue
                missing = wanted - (node.features & node.active_features)
                if missing:
                    what = f"{name}: features +{','.join(sorted(missing))} (re-applied)"
                    try:
                        self._write_features(node, wanted, frozenset())
                        done.append(what)
                    except ActuatorError as exc:
                        failed.append(f"{what} failed: {exc}")
        if self._requeued and self.settings.restart_requeued:
            try:
                done.extend(self._restart_requeued())
            except ActuatorError as exc:
                failed.append(f"restarting requeued jobs failed: {exc}")
        for what in done:
            log.warning("slurm_reapplied", what=what)
        for what in failed:
            log.error("slurm_reapply_failed", what=what)
        self.reapplied.extend(done + failed)
        del self.reapplied[:-100]
        return done

    def _blocked(self, node: SlurmNode) -> bool:
        return node.held_by_others or self._opted_out(node)

    def _restart_requeued(self) -> list[str]:
        now = time.monotonic()
        data = self.cli.json("squeue")
        jobs = {str(j["job_id"]): j for j in data.get("jobs") or ()}
        done: list[str] = []
        for job_id, since in list(self._requeued.items()):
            job = jobs.get(job_id)
            if job is None or now - since > REQUEUE_FOLLOW_S:
                del self._requeued[job_id]
                continue
            state = str(job.get("job_state", "")).upper()
            if state == "PENDING" and job.get("state_reason") == "BeginTime":
                self.cli.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")
                del self._requeued[job_id]
                done.append(f"job {job_id}: requeued, start time set to now")
            elif state not in ("COMPLETING", "PENDING"):  # running again, or gone
                del self._requeued[job_id]
        return done

    # -- changing -------------------------------------------------------------------------------

    def _update(self, node: str, *assignments: str) -> None:
        self.cli.run("scontrol", "update", f"nodename={node}", *assignments)

    def _refuse_if_not_ours(self, node: SlurmNode, what: str) -> None:
        if node.held_by_others:
            reason = f" (reason: {node.reason!r})" if node.reason else ""
            raise ActuatorError(
                f"slurm: {node.name} is {node.state}"
                f"{'+drain' if 'DRAIN' in node.flags else ''} by someone else{reason}: "
                f"not {what} it"
            )
        if self._opted_out(node):
            raise ActuatorError(
                f"slurm: {node.name} carries the opt-out feature "
                f"{self.settings.opt_out_feature!r}: not {what} it"
            )

    def drain(self, node: str, reason: str) -> None:
        """Drain with a reason starting `ooda:`; a no-op when we drained it already."""
        current = self._node(node)
        if current.drained_by_us:
            return
        self._refuse_if_not_ours(current, "draining")
        text = " ".join(reason.split())
        if not text.startswith(OWNER_PREFIX):
            text = f"{OWNER_PREFIX} {text}".rstrip()
        self._update(node, "state=drain", f"reason={text[:MAX_REASON_CHARS]}")
        log.info("slurm_drained", node=node, reason=text)

    def resume(self, node: str) -> None:
        """Resume our own drain; a no-op on a node in service; refused on anyone else's."""
        current = self._node(node)
        if not current.drained:
            return
        if not current.drained_by_us:
            raise ActuatorError(
                f"slurm: {node} was drained by someone else (reason: {current.reason!r}): "
                "only our own drains are resumed"
            )
        self._update(node, "state=resume")
        log.info("slurm_resumed", node=node)

    def set_weight(self, node: str, weight: int) -> None:
        """Scheduling weight (higher: less preferred); kept and re-applied until set back to
        the weight the node had before our first change."""
        if not 0 <= weight <= MAX_WEIGHT:
            raise ActuatorError(f"slurm: weight {weight} for {node} outside [0, {MAX_WEIGHT}]")
        current = self._node(node)
        found = self._found_weights.get(node, current.weight)
        undo = node in self._found_weights and weight == found
        if not undo:
            self._refuse_if_not_ours(current, "re-weighting")
        if current.weight != weight:
            self._update(node, f"weight={weight}")
        if undo:
            self._weights.pop(node, None)
            self._found_weights.pop(node, None)
        else:
            self._found_weights.setdefault(node, current.weight)
            self._weights[node] = weight

    def _owned(self, features: frozenset[str], node: str) -> frozenset[str]:
        prefix = self.settings.feature_prefix
        out = set()
        for feature in features:
            if not _FEATURE.match(feature):
                raise ActuatorError(f"slurm: {feature!r} is not a valid feature name for {node}")
            out.add(feature if feature.startswith(prefix) else prefix + feature)
        return frozenset(out)

    def _write_features(self, node: SlurmNode, add: frozenset[str], remove: frozenset[str]) -> None:
        """Our features added to (removed from) both the node's available and active sets; the
        site's own stay as they are in each (they differ where node_features plugins run, and
        activating an available feature there can reboot the node)."""
        available = (node.features - remove) | add
        active = (node.active_features - remove) | add
        if available == node.features and active == node.active_features:
            return
        self._update(
            node.name,
            f"AvailableFeatures={','.join(sorted(available))}",
            f"ActiveFeatures={','.join(sorted(active))}",
        )

    def set_features(self, node: str, add: frozenset[str], remove: frozenset[str]) -> None:
        """Add and remove the agent's own features (prefixed); others are never touched."""
        add_owned, remove_owned = self._owned(add, node), self._owned(remove, node)
        current = self._node(node)
        if add_owned - current.features:  # removing ours is an undo, allowed anywhere
            self._refuse_if_not_ours(current, "adding features to")
        self._write_features(current, add_owned, remove_owned)
        mine = (self._features.get(node, frozenset()) - remove_owned) | add_owned
        if mine:
            self._features[node] = mine
        else:
            self._features.pop(node, None)

    def requeue(self, job: str) -> None:
        """Requeue a running job (it restarts elsewhere once the scheduler places it)."""
        if not _JOB_ID.match(job):
            raise ActuatorError(f"slurm: {job!r} is not a job id")
        self.cli.run("scontrol", "requeue", job)
        self._requeued[job] = time.monotonic()
        log.info("slurm_requeued", job=job)
