"""A real Slurm 22.05 cluster on 127.0.0.1 for tests: one slurmctld and N slurmd (one process per
node, `slurmd -N nodeK`), fake GPUs as character devices, auth/none (no munge needed).

Built from the recipe in shared/recipes/services.md, with everything that must not collide with a
cluster another test run starts at the same time made unique: the ClusterName, every port (picked
free at start), the state, spool, log and pid files (all under `base`). Daemons are Popen'd here,
so teardown waits on them; it cancels the jobs first and waits for an empty queue (killing the
daemons under running jobs leaves slurmstepd and the job behind), then stops the daemons
(SIGTERM, then SIGKILL after a grace period: a slurmd whose node was set down ignores SIGTERM),
then kills, by pid, any process left that carries this cluster's SLURM_CONF in its environment.

Usable outside pytest too (e.g. `python -m tests.integration.slurm_cluster /tmp/x` keeps one up).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.act.slurm import SlurmSettings

DAEMONS = ("slurmctld", "slurmd", "scontrol", "sinfo", "squeue", "sbatch", "scancel")
CLIENT_TIMEOUT_S = 15.0


class SlurmClusterError(RuntimeError):
    pass


def missing_tools() -> list[str]:
    return [tool for tool in DAEMONS if shutil.which(tool) is None]


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise SlurmClusterError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


class SlurmCluster:
    """`start()`, use, `stop()`. Nodes are node1..nodeN with `gpus_per_node` GPUs each
    (`Gres=gpu:G`, devices under base/dev), features `h100,ib`, weight 1, one partition `gpu`."""

    def __init__(self, base: Path, nodes: int = 4, gpus_per_node: int = 4) -> None:
        self.base = Path(base)
        self.n_nodes = nodes
        self.gpus_per_node = gpus_per_node
        self.name = f"ooda-{uuid.uuid4().hex[:8]}"
        self.host = socket.gethostname().split(".")[0]
        self.node_names = [f"node{k}" for k in range(1, nodes + 1)]
        self.slurm_conf = self.base / "etc" / "slurm.conf"
        ports = _free_ports(2 + nodes)
        self.ctld_port, self.default_slurmd_port = ports[0], ports[1]
        self.node_ports = dict(zip(self.node_names, ports[2:], strict=True))
        self.ctld: subprocess.Popen[bytes] | None = None
        self.slurmds: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.slurm_conf)}
        # Client commands must never pick up another cluster's settings from the environment.
        for key in list(self.env):
            prefixes = ("SLURM_", "SBATCH_", "SQUEUE_", "SINFO_", "SCONTROL_")
            if key.startswith(prefixes) and key != "SLURM_CONF":
                del self.env[key]

    # -- configuration ----------------------------------------------------------------------

    def _write_config(self) -> None:
        b = self.base
        for sub in ("etc", "state", "log", "dev", "jobs"):
            (b / sub).mkdir(parents=True, exist_ok=True)
        for node in self.node_names:
            (b / "spool" / node).mkdir(parents=True, exist_ok=True)
        for i in range(self.gpus_per_node):
            dev = b / "dev" / f"nvidia{i}"
            if not dev.exists():
                # gres File= must be a character device; same numbers as /dev/null.
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
        gpus = f"[0-{self.gpus_per_node - 1}]" if self.gpus_per_node > 1 else "0"
        node_lines = "\n".join(
            f"NodeName={node} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={port} CPUs=4 "
            f"RealMemory=4000 Gres=gpu:{self.gpus_per_node} Features=h100,ib State=UNKNOWN"
            for node, port in self.node_ports.items()
        )
        self.slurm_conf.write_text(
            f"""\
ClusterName={self.name}
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.default_slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd-%n.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=1
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=2
{node_lines}
PartitionName=gpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )
        (b / "etc" / "gres.conf").write_text(
            f"AutoDetect=off\nNodeName={','.join(self.node_names)} Name=gpu "
            f"File={b}/dev/nvidia{gpus}\n"
        )

    # -- daemons ----------------------------------------------------------------------------

    def start(self, timeout_s: float = 20.0) -> None:
        self._write_config()
        self.start_controller(ignore_state=True, timeout_s=timeout_s)
        for node in self.node_names:
            self.slurmds[node] = self._popen(
                ["slurmd", "-D", "-N", node, "-f", str(self.slurm_conf)], f"slurmd-{node}.out"
            )
        try:
            self.wait_nodes_idle(timeout_s)
        except SlurmClusterError as exc:
            raise SlurmClusterError(f"{exc}\n{self.log_tail()}") from None

    def _popen(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with open(self.base / "log" / log_name, "ab") as out:
            return subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.base,
                start_new_session=True,
            )

    def start_controller(self, ignore_state: bool = False, timeout_s: float = 20.0) -> None:
        if self.ctld is not None and self.ctld.poll() is None:
            raise SlurmClusterError("slurmctld is already running")
        argv = ["slurmctld", "-D", "-f", str(self.slurm_conf)]
        if ignore_state:  # a fresh StateSaveLocation has no state files yet
            argv.insert(2, "-i")
        self.ctld = self._popen(argv, "slurmctld.out")

        def up() -> bool:
            if self.ctld is not None and self.ctld.poll() is not None:
                raise SlurmClusterError(f"slurmctld exited ({self.ctld.returncode})")
            # Probe the port first: a client call to a closed port retries for about 9 s.
            return _port_open(self.ctld_port) and "UP" in self.run("scontrol", "ping").stdout

        try:
            wait_until(up, timeout_s, "slurmctld to answer")
        except SlurmClusterError as exc:
            raise SlurmClusterError(f"{exc}\n{self.log_tail()}") from None

    def stop_controller(self, timeout_s: float = 10.0) -> None:
        if self.ctld is not None:
            _terminate(self.ctld, timeout_s)
            self.ctld = None

    def restart_controller(self) -> None:
        self.stop_controller()
        self.start_controller()

    def controller_running(self) -> bool:
        return self.ctld is not None and self.ctld.poll() is None

    def stop(self) -> None:
        """Cancel every job, wait for an empty queue, stop the daemons, reap strays."""
        try:
            if self.controller_running():
                self.run("scancel", "--user", "root", check=False)
                with contextlib.suppress(SlurmClusterError):
                    wait_until(lambda: not self.queue(), 20.0, "an empty queue")
        finally:
            for proc in self.slurmds.values():
                _terminate(proc, 3.0)
            self.slurmds.clear()
            self.stop_controller()
            self._reap_strays()

    def _reap_strays(self) -> None:
        """Kill, by pid, processes this cluster left (slurmstepd, job scripts): found by our
        SLURM_CONF in their environment. Never anything else."""
        marker = f"SLURM_CONF={self.slurm_conf}".encode()
        me = os.getpid()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(entry.name), signal.SIGKILL)

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for log in sorted((self.base / "log").glob("*")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    # -- client side ------------------------------------------------------------------------

    def run(
        self, tool: str, *args: str, check: bool = True, timeout_s: float = CLIENT_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [tool, *args],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.base / "jobs",
            timeout=timeout_s,
            check=False,
        )
        if check and proc.returncode != 0:
            raise SlurmClusterError(
                f"{tool} {' '.join(args)}: rc {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc

    def sbatch(self, *args: str, gpus: int = 1, nodes: int = 1, seconds: int = 600) -> str:
        """Submit `sleep seconds` holding `gpus` GPUs per node on `nodes` nodes; the job id."""
        out = self.run(
            "sbatch",
            "--parsable",
            f"--nodes={nodes}",
            f"--gres=gpu:{gpus}",
            "--output=/dev/null",
            *args,
            "--wrap",
            # exec: one process in the job, so a cancel or requeue completes in ~0.1 s (with a
            # shell waiting on its child, proctrack/pgid polls for about 3.7 s).
            f"exec sleep {seconds}",
        ).stdout.strip()
        return out.split(";")[0]

    def jobs(self) -> list[dict[str, Any]]:
        data = json.loads(self.run("squeue", "--json").stdout)
        jobs: list[dict[str, Any]] = data["jobs"]
        return jobs

    def job(self, job_id: str) -> dict[str, Any]:
        for job in self.jobs():
            if str(job["job_id"]) == job_id:
                return job
        raise SlurmClusterError(f"no job {job_id}")

    def queue(self) -> list[str]:
        """Ids of jobs still in the queue (pending, running, completing...)."""
        out = self.run("squeue", "-h", "-o", "%i").stdout
        return out.split()

    def wait_job(self, job_id: str, states: Sequence[str], timeout_s: float = 20.0) -> None:
        wait_until(
            lambda: self.job(job_id)["job_state"] in states,
            timeout_s,
            f"job {job_id} to be {'/'.join(states)}",
        )

    def nodes(self) -> dict[str, dict[str, Any]]:
        data = json.loads(self.run("sinfo", "--json").stdout)
        return {n["name"]: n for n in data["nodes"]}

    def node(self, name: str) -> dict[str, Any]:
        return self.nodes()[name]

    def scontrol(self, *args: str) -> None:
        self.run("scontrol", *args)

    def wait_nodes_idle(self, timeout_s: float = 20.0) -> None:
        def idle() -> bool:
            nodes = self.nodes()
            return len(nodes) == self.n_nodes and all(
                n["state"] == "idle" and not n["state_flags"] for n in nodes.values()
            )

        wait_until(idle, timeout_s, f"{self.n_nodes} idle nodes")

    def reset(self, timeout_s: float = 30.0) -> None:
        """Back to the start: no jobs, every node in service, weights and features as configured
        (a reconfigure restores them from slurm.conf)."""
        if not self.controller_running():
            self.start_controller()
        # After a controller restart (a test stopping slurmctld) a node is UNKNOWN until its
        # slurmd registers again, and Slurm refuses to resume it ("Invalid node state
        # specified"): a reconfigure has every slurmd register at once.
        if any(n["state"] == "unknown" for n in self.nodes().values()):
            self.scontrol("reconfigure")
            wait_until(
                lambda: all(n["state"] != "unknown" for n in self.nodes().values()),
                timeout_s,
                "every node registered",
            )
        for name, node in self.nodes().items():
            if node["state"] == "down" or "DRAIN" in node["state_flags"]:
                self.scontrol("update", f"nodename={name}", "state=resume")
        self.run("scancel", "--user", "root")
        wait_until(lambda: not self.queue(), timeout_s, "an empty queue")
        self.scontrol("reconfigure")
        self.wait_nodes_idle(timeout_s)


def settings_for(cluster: SlurmCluster, **overrides: object) -> SlurmSettings:
    """The agent's Slurm settings for this cluster."""
    return SlurmSettings.model_validate(
        {"slurm_conf": cluster.slurm_conf, "timeout_s": 10.0, **overrides}
    )


def _terminate(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5.0)


# Keep a cluster up by hand: python -m tests.integration.slurm_cluster DIR
if __name__ == "__main__":
    import sys

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    cluster = SlurmCluster(Path(sys.argv[1]))
    cluster.start()
    print(f"export SLURM_CONF={cluster.slurm_conf}   # Ctrl-C stops the cluster", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
