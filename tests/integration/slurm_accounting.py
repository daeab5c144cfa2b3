"""A real Slurm 22.05 cluster with job accounting: slurmdbd backed by MariaDB (Debian's
mariadb-server), so `sacct` answers for ended jobs and `sshare` gives the accounts' fairshare.

From shared/recipes/services.md (section 6). slurmdbd listens on 0.0.0.0 whatever DbdAddr says,
so every daemon of this cluster runs in a private network namespace (`unshare --net`, its own
loopback and nothing else): nothing of it is reachable from any network. Clients reach it through
wrapper scripts under `base/bin` that enter the namespace (`nsenter --net`) and run the real tool:
the agent's `actuators.slurm.bin_dir` points there, as a site's wrappers would. MariaDB listens on
a Unix socket only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.integration.slurm_cluster import (
    CLIENT_TIMEOUT_S,
    SlurmCluster,
    SlurmClusterError,
    _free_ports,
    _terminate,
    wait_until,
)

TOOLS = ("slurmdbd", "mariadbd", "mariadb-install-db", "mariadb", "sacct", "sacctmgr", "sshare",
         "unshare", "nsenter")  # fmt: skip
CLIENTS = ("scontrol", "sinfo", "squeue", "sbatch", "scancel", "sacct", "sacctmgr", "sshare")
LEAN_DB = ("--innodb-buffer-pool-size=32M", "--innodb-log-file-size=16M",
           "--innodb-log-buffer-size=4M", "--aria-pagecache-buffer-size=8M",
           "--key-buffer-size=8M", "--max-connections=32")  # fmt: skip


def missing_accounting_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


class AccountingCluster(SlurmCluster):
    """`start()`, use, `stop()`: SlurmCluster's nodes, plus MariaDB and slurmdbd, in a network
    namespace. Accounts are added with `add_accounts` (fairshare per account)."""

    def __init__(self, base: Path, nodes: int = 2, gpus_per_node: int = 4) -> None:
        super().__init__(base, nodes=nodes, gpus_per_node=gpus_per_node)
        self.bin_dir = self.base / "bin"
        self.holder: subprocess.Popen[bytes] | None = None
        self.mariadb: subprocess.Popen[bytes] | None = None
        self.slurmdbd: subprocess.Popen[bytes] | None = None
        self.dbd_port = _free_ports(1)[0]
        self.socket = self.base / "db" / "mysqld.sock"

    # -- the namespace --------------------------------------------------------------------------

    def _enter(self) -> list[str]:
        assert self.holder is not None
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--"]

    def _start_namespace(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--", "sleep", "infinity"], stdin=subprocess.DEVNULL
        )

        def up() -> bool:
            # An address besides 127.0.0.1, on lo: getaddrinfo's AI_ADDRCONFIG (slurmdbd's
            # listening socket) finds no IPv4 without one. It is on this namespace's loopback,
            # reachable from nowhere else.
            script = "ip link set lo up && ip addr add 10.254.0.1/32 dev lo"
            done = subprocess.run(
                [*self._enter(), "sh", "-c", script], capture_output=True, check=False
            )
            return done.returncode == 0

        wait_until(up, 10.0, "the network namespace")
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        for tool in CLIENTS:
            real = shutil.which(tool)
            assert real is not None, tool
            wrapper = self.bin_dir / tool
            wrapper.write_text(
                f'#!/bin/sh\nexec nsenter --net=/proc/{self.holder.pid}/ns/net -- {real} "$@"\n'
            )
            wrapper.chmod(0o755)

    # -- MariaDB and slurmdbd -------------------------------------------------------------------

    def _start_database(self, timeout_s: float) -> None:
        b = self.base
        for sub in ("db/data", "log", "etc"):
            (b / sub).mkdir(parents=True, exist_ok=True)
        options = ["--no-defaults", f"--datadir={b}/db/data", "--user=root", *LEAN_DB]
        subprocess.run(
            ["mariadb-install-db", *options, "--auth-root-authentication-method=normal",
             "--skip-test-db"],
            check=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        with open(b / "log" / "mariadbd.out", "ab") as out:
            self.mariadb = subprocess.Popen(
                [*self._enter(), "mariadbd", *options, "--skip-networking",
                 f"--socket={self.socket}", f"--pid-file={b}/db/mariadbd.pid",
                 f"--log-error={b}/log/mariadbd.err"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, start_new_session=True,
            )  # fmt: skip

        def sql(statement: str) -> bool:
            done = subprocess.run(
                ["mariadb", "--no-defaults", "-S", str(self.socket), "-uroot", "-e", statement],
                capture_output=True,
                check=False,
                timeout=10,
            )
            return done.returncode == 0

        try:
            wait_until(lambda: sql("select 1"), timeout_s, "MariaDB")
        except SlurmClusterError as exc:
            raise SlurmClusterError(f"{exc}\n{self.log_tail()}") from None
        assert sql(
            "CREATE DATABASE slurm_acct_db; CREATE USER 'slurm'@'localhost' IDENTIFIED BY "
            "'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
        )

    def _start_slurmdbd(self, timeout_s: float) -> None:
        b = self.base
        conf = b / "etc" / "slurmdbd.conf"
        conf.write_text(
            f"""\
AuthType=auth/none
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.dbd_port}
SlurmUser=root
PidFile={b}/slurmdbd.pid
LogFile={b}/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
"""
        )
        conf.chmod(0o600)
        env = {**self.env, "MYSQL_UNIX_PORT": str(self.socket)}
        with open(b / "log" / "slurmdbd.out", "ab") as out:
            self.slurmdbd = subprocess.Popen(
                [*self._enter(), "slurmdbd", "-D"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=b, start_new_session=True,
            )  # fmt: skip
        try:
            wait_until(lambda: self._listening(self.dbd_port), timeout_s, "slurmdbd")
        except SlurmClusterError as exc:
            raise SlurmClusterError(f"{exc}\n{self.log_tail()}") from None

    def _listening(self, port: int) -> bool:
        probe = f"exec 3<>/dev/tcp/127.0.0.1/{port}"
        done = subprocess.run(
            [*self._enter(), "bash", "-c", probe], capture_output=True, check=False, timeout=5
        )
        return done.returncode == 0

    def _write_config(self) -> None:
        super()._write_config()
        text = self.slurm_conf.read_text()
        text = text.replace(
            "AccountingStorageType=accounting_storage/none",
            "AccountingStorageType=accounting_storage/slurmdbd\n"
            "AccountingStorageHost=127.0.0.1\n"
            f"AccountingStoragePort={self.dbd_port}\n"
            "AccountingStorageTRES=gres/gpu\n"
            "PriorityType=priority/multifactor",
        )
        # Ended jobs leave squeue at once: what they were is sacct's to say.
        text = text.replace("MinJobAge=300", "MinJobAge=2")
        self.slurm_conf.write_text(text)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> None:
        self._start_namespace()
        try:
            self._start_database(timeout_s)
            self._start_slurmdbd(timeout_s)
            super().start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _popen(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        return super()._popen([*self._enter(), *argv], log_name)

    def start_controller(self, ignore_state: bool = False, timeout_s: float = 20.0) -> None:
        if self.ctld is not None and self.ctld.poll() is None:
            raise SlurmClusterError("slurmctld is already running")
        argv = ["slurmctld", "-D", "-f", str(self.slurm_conf)]
        if ignore_state:
            argv.insert(2, "-i")
        self.ctld = self._popen(argv, "slurmctld.out")

        def up() -> bool:
            if self.ctld is not None and self.ctld.poll() is not None:
                raise SlurmClusterError(f"slurmctld exited ({self.ctld.returncode})")
            return self._listening(self.ctld_port) and "UP" in self.run("scontrol", "ping").stdout

        try:
            wait_until(up, timeout_s, "slurmctld to answer")
        except SlurmClusterError as exc:
            raise SlurmClusterError(f"{exc}\n{self.log_tail()}") from None

    def run(
        self, tool: str, *args: str, check: bool = True, timeout_s: float = CLIENT_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        wrapper = self.bin_dir / tool
        return super().run(str(wrapper) if wrapper.exists() else tool, *args, check=check,
                           timeout_s=timeout_s)  # fmt: skip

    def _reap_strays(self) -> None:
        """slurmdbd after slurmctld (which flushes to it), then MariaDB, then what is left (the
        reaper finds processes by SLURM_CONF: slurmdbd carries it too), then the namespace."""
        for proc in (self.slurmdbd, self.mariadb):
            if proc is not None:
                _terminate(proc, 10.0)
        self.slurmdbd = self.mariadb = None
        super()._reap_strays()
        if self.holder is not None:
            _terminate(self.holder, 5.0)
            self.holder = None

    # -- accounts -------------------------------------------------------------------------------

    def add_accounts(self, shares: dict[str, int], user: str = "root") -> None:
        """Accounts under root with these fairshares, `user` in each of them."""
        for account, fairshare in shares.items():
            self.run("sacctmgr", "-i", "add", "account", account, f"Fairshare={fairshare}",
                     f"Description={account}", "Organization=ooda")  # fmt: skip
        self.run("sacctmgr", "-i", "add", "user", user, f"account={','.join(shares)}")

    def wait_accounted(self, job_id: str, timeout_s: float = 20.0) -> None:
        """Until sacct shows the job ended (its record reaches slurmdbd within a second)."""

        def ended() -> bool:
            out = self.run("sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id, check=False)
            states = out.stdout.split()
            return bool(states) and states[0] not in ("RUNNING", "PENDING", "COMPLETING")

        wait_until(ended, timeout_s, f"sacct to show job {job_id} ended")

    def gone_from_squeue(self, job_id: str) -> bool:
        with contextlib.suppress(SlurmClusterError):
            self.job(job_id)
            return False
        return True


def wait_gone(cluster: AccountingCluster, job_id: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cluster.gone_from_squeue(job_id):
        if time.monotonic() > deadline:
            raise SlurmClusterError(f"job {job_id} still in squeue after {timeout_s} s")
        time.sleep(0.2)
