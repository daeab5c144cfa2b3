"""Helpers for the node daemon tests: a hand-written GPU fake, throwaway TLS certificates, tokens,
daemons started on free sockets (Unix sockets in a temp dir, TCP on 127.0.0.1 port 0), clients of
a daemon's Unix socket, and `ooda node serve` as a process."""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.core.errors import GpuInvalidArgumentError, GpuLostError
from agent.core.protocols import GpuDevice, PowerConstraints
from agent.node.server import NodeDaemon, NodeSettings


class FakeGpu:
    """A GPU behind the GpuDevice protocol with switchable failures."""

    def __init__(
        self, index: int, min_w: float = 200.0, max_w: float = 700.0, default_w: float = 700.0
    ) -> None:
        self._index = index
        self.constraints = PowerConstraints(min_w, max_w, default_w)
        self.limit_w = default_w
        self.lost = False
        self.sets: list[float] = []

    def _check(self) -> None:
        if self.lost:
            raise GpuLostError(f"GPU {self._index} has fallen off the bus")

    @property
    def index(self) -> int:
        return self._index

    @property
    def uuid(self) -> str:
        return f"GPU-fake-{self._index:04d}"

    @property
    def model_name(self) -> str:
        return "Fake GPU"

    def power_constraints(self) -> PowerConstraints:
        self._check()
        return self.constraints

    def power_limit_w(self) -> float:
        self._check()
        return self.limit_w

    def enforced_power_limit_w(self) -> float:
        self._check()
        return self.limit_w

    def set_power_limit_w(self, watts: float) -> None:
        self._check()
        if not self.constraints.contains(watts):
            raise GpuInvalidArgumentError(f"{watts} W out of range")
        self.limit_w = watts
        self.sets.append(watts)

    def power_usage_w(self) -> float:
        self._check()
        return 100.0

    def temperature_c(self) -> float:
        return 50.0

    def utilization_pct(self) -> tuple[float, float]:
        return 0.0, 0.0

    def sm_clock_mhz(self) -> float:
        return 1000.0

    def total_energy_j(self) -> float:
        return 0.0

    # SM clock locks (the ClockLocker protocol): `locked_mhz` None when not locked.
    supported_mhz = (210.0, 1980.0)
    locked_mhz: tuple[float, float] | None = None

    def supported_sm_clock_range_mhz(self) -> tuple[float, float]:
        self._check()
        return self.supported_mhz

    def lock_sm_clocks_mhz(self, min_mhz: float, max_mhz: float) -> None:
        self._check()
        lo, hi = self.supported_mhz
        if not lo <= min_mhz <= max_mhz <= hi:
            raise GpuInvalidArgumentError(f"[{min_mhz}, {max_mhz}] MHz out of range")
        self.locked_mhz = (min_mhz, max_mhz)

    def reset_sm_clocks(self) -> None:
        self._check()
        self.locked_mhz = None

    # Workload power profiles (the PowerProfiler protocol): NVML's ids; `requested` as NVML
    # holds them (a set: requests add up until cleared).
    profiles = frozenset({3, 5, 6})  # memory_bound, balanced, llm_inference

    def supported_power_profiles(self) -> frozenset[int]:
        self._check()
        return self.profiles

    def request_power_profile(self, profile: int) -> None:
        self._check()
        if profile not in self.profiles:
            raise GpuInvalidArgumentError(f"profile {profile} not supported")
        self.requested = self.requested | {profile}

    def clear_power_profile(self, profile: int) -> None:
        self._check()
        self.requested = self.requested - {profile}

    requested: frozenset[int] = frozenset()


class FakeBackend:
    def __init__(self, gpus: Sequence[GpuDevice]) -> None:
        self._gpus = list(gpus)

    def devices(self) -> Sequence[GpuDevice]:
        return self._gpus


class SlowGpu:
    """Wraps a GPU so that every cap operation takes `delay_s` (a node that answers late)."""

    def __init__(self, inner: GpuDevice, delay_s: float) -> None:
        self._inner = inner
        self.delay_s = delay_s

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    @property
    def index(self) -> int:
        return self._inner.index

    @property
    def uuid(self) -> str:
        return self._inner.uuid

    @property
    def model_name(self) -> str:
        return self._inner.model_name

    def power_constraints(self) -> PowerConstraints:
        time.sleep(self.delay_s)
        return self._inner.power_constraints()


def write_token(path: Path, *tokens: str) -> str:
    """Write tokens atomically (as an operator should: temp file, then rename); return the first."""
    values = list(tokens) or [secrets.token_urlsafe(24)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("# ooda node tokens\n" + "\n".join(values) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)
    return values[0]


def unix_node_daemon(root: Path, gpus: Sequence[FakeGpu]) -> NodeDaemon:
    """A node daemon (not started) over fake GPUs on `root/node.sock`, with the token of
    `root/token`, a 400 W fallback cap and 600 s leases at most, checked every 50 ms."""
    return NodeDaemon(
        FakeBackend(list(gpus)),
        NodeSettings(
            token_file=root / "token",
            socket_path=root / "node.sock",
            fallback_cap_w=400.0,
            max_lease_s=600.0,
            check_interval_s=0.05,
        ),
    )


def unix_client(sock: Path | str, token: str | None = None) -> httpx.Client:
    """A client of a node daemon's Unix socket (`unix://` taken off), with the bearer `token`
    when one is given."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock).removeprefix("unix://")),
        base_url="http://node",
        headers=headers,
        timeout=5.0,
    )


def wait_socket(sock: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until the daemon process `proc` listens on `sock` (30 s at most; its stderr if not)."""
    deadline = time.monotonic() + 30.0
    while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert sock.exists(), proc.stderr.read() if proc.stderr else ""


def node_gpus(sock: Path | str, token: str) -> list[dict[str, Any]]:
    """A node daemon's `GET /v1/gpus`."""
    with unix_client(sock, token) as client:
        answer = client.get("/v1/gpus")
    answer.raise_for_status()
    return answer.json()  # type: ignore[no-any-return]


def sim_serve_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The first line `ooda sim serve --json` prints (where its node daemons and exporters
    are), read on a thread: a process that prints nothing fails the test, never hangs it."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout_s)
    assert box and box[0], f"ooda sim serve printed nothing ({proc.poll()=})"
    return box[0]


@contextmanager
def node_serve(
    args: Sequence[str], sock: Path, token: str
) -> Iterator[tuple[subprocess.Popen[bytes], httpx.Client]]:
    """`ooda node serve ARGS --socket SOCK` as a process, ready, and a client of its socket with
    the bearer `token`; the process is killed if it still runs at the end."""
    command = [sys.executable, "-m", "agent", "node", "serve", *args, "--socket", str(sock)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_socket(sock, proc)
        with unix_client(sock, token) as client:
            yield proc, client
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- throwaway certificates --------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    cn: str,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier,
    server: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a client
    certificate from an unrelated CA."""
    ca, ca_key = _ca("ooda test CA")
    server, server_key = _leaf("ooda-node", ca, ca_key, ExtendedKeyUsageOID.SERVER_AUTH, True)
    client, client_key = _leaf("ooda-agent", ca, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH, False)
    rogue_ca, rogue_ca_key = _ca("someone else's CA")
    rogue, rogue_key = _leaf(
        "ooda-agent", rogue_ca, rogue_ca_key, ExtendedKeyUsageOID.CLIENT_AUTH, False
    )
    return Pki(
        ca=_write_cert(ca, directory / "ca.pem"),
        server_cert=_write_cert(server, directory / "server.pem"),
        server_key=_write_key(server_key, directory / "server.key"),
        client_cert=_write_cert(client, directory / "client.pem"),
        client_key=_write_key(client_key, directory / "client.key"),
        rogue_cert=_write_cert(rogue, directory / "rogue.pem"),
        rogue_key=_write_key(rogue_key, directory / "rogue.key"),
    )
