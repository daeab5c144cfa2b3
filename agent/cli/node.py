"""`ooda node serve`: the privileged per-node daemon that applies power caps under leases."""

from __future__ import annotations

import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from agent.core.errors import BadInputError

if TYPE_CHECKING:
    from agent.core.protocols import GpuBackend

node_app = typer.Typer(help="The privileged node daemon (one per GPU node).", no_args_is_help=True)


class Backend(StrEnum):
    NVML = "nvml"
    SIM = "sim"


class _OnExit(StrEnum):
    FALLBACK = "fallback"
    DEFAULT = "default"
    KEEP = "keep"


class _OnStart(StrEnum):
    KEEP = "keep"
    FALLBACK = "fallback"


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise BadInputError(
            f"--socket-mode: expected octal permissions like 660 (got {text!r})"
        ) from None
    if not 0 <= value <= 0o777:
        raise BadInputError(f"--socket-mode: expected octal permissions like 660 (got {text!r})")
    return value


class _TwinStepper:
    """Moves a one-node twin along in real time, under the daemon's lock."""

    def __init__(self, twin: Any, lock: threading.RLock) -> None:
        self.twin = twin
        self.lock = lock
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ooda-node twin", daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self.stop_event.wait(1.0):
            with self.lock:
                self.twin.run_until(time.monotonic() - start)


@node_app.command("serve")
def serve(
    token_file: Annotated[
        Path,
        typer.Option(
            "--token-file",
            help="Accepted bearer tokens, one per line; re-read when it changes.",
        ),
    ],
    socket_path: Annotated[
        Path | None,
        typer.Option("--socket", help="Unix socket to serve on (default /run/ooda/node.sock)."),
    ] = None,
    listen: Annotated[
        str | None, typer.Option("--listen", help="ADDR:PORT to serve on over TCP instead.")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="Server certificate (PEM) for --listen.")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="Server private key (PEM) for --listen.")
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-client-ca", help="Require client certificates signed by this CA (PEM)."
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Allow plain HTTP on a non-loopback address (tests)."),
    ] = False,
    socket_mode: Annotated[
        str, typer.Option("--socket-mode", help="Permissions of the Unix socket (octal).")
    ] = "660",
    fallback_cap_w: Annotated[
        float | None,
        typer.Option(
            "--fallback-cap-w",
            help="Cap (W) a GPU gets when its lease runs out, clipped into the GPU's "
            "constraints (default: the GPU's minimum).",
        ),
    ] = None,
    max_lease_s: Annotated[
        float, typer.Option("--max-lease-s", help="Longest lease a request may ask for (s).")
    ] = 3600.0,
    check_interval_s: Annotated[
        float, typer.Option("--check-interval-s", help="How often leases are checked (s).")
    ] = 1.0,
    on_exit: Annotated[
        _OnExit,
        typer.Option(
            "--on-exit",
            help="On shutdown: leased GPUs to the fallback cap, every managed GPU to its "
            "default, or keep.",
        ),
    ] = _OnExit.FALLBACK,
    on_start: Annotated[
        _OnStart,
        typer.Option("--on-start", help="On start: keep GPUs as found, or all to fallback."),
    ] = _OnStart.KEEP,
    public_metrics: Annotated[
        bool, typer.Option("--public-metrics", help="Serve /metrics without a token.")
    ] = False,
    lease_file: Annotated[
        Path | None,
        typer.Option(
            "--lease-file",
            help="Keep the lease table in this file, so a restarted daemon lets each lease run "
            "out as it would have (e.g. /run/ooda/node-leases.json).",
        ),
    ] = None,
    adopt_lease_s: Annotated[
        float,
        typer.Option(
            "--adopt-lease-s",
            help="A GPU found capped at start with no lease on record gets a lease this long "
            "(s): renewed by the agent, or it ends under the fallback cap.",
        ),
    ] = 60.0,
    max_connections: Annotated[
        int, typer.Option("--max-connections", help="Connections held at once, in all.")
    ] = 512,
    max_connections_per_peer: Annotated[
        int,
        typer.Option(
            "--max-connections-per-peer",
            help="Connections held at once per peer (IP address, or user id on the socket).",
        ),
    ] = 64,
    header_timeout_s: Annotated[
        float,
        typer.Option(
            "--header-timeout-s",
            help="A request's head (and a TLS handshake, and a body) must arrive within this (s).",
        ),
    ] = 5.0,
    idle_timeout_s: Annotated[
        float,
        typer.Option("--idle-timeout-s", help="Close a connection idle this long (s)."),
    ] = 30.0,
    backend: Annotated[
        Backend, typer.Option("--backend", help="nvml (real GPUs) or sim (twin GPUs).")
    ] = Backend.NVML,
    sim_gpus: Annotated[
        int, typer.Option("--sim-gpus", min=1, max=16, help="GPUs of the sim backend.")
    ] = 8,
    sim_model: Annotated[
        str, typer.Option("--sim-model", help="GPU model of the sim backend (H100, A100).")
    ] = "H100",
    sim_seed: Annotated[int, typer.Option("--sim-seed", help="Seed of the sim backend.")] = 0,
) -> None:
    """Serve the node API: list GPUs, set caps under leases, release them.

    Every request needs `Authorization: Bearer TOKEN` with a token from --token-file. A cap not
    renewed within its lease falls back to --fallback-cap-w, never to the maximum (and never
    up: a lower cap stays). With --lease-file, leases outlive a restart of the daemon.

    Examples:

      ooda node serve --token-file /etc/ooda/node.token --fallback-cap-w 400

      ooda node serve --token-file /etc/ooda/node.token --listen 0.0.0.0:9440 \\
        --tls-cert node.pem --tls-key node.key --tls-client-ca agents-ca.pem --fallback-cap-w 400

      ooda node serve --backend sim --sim-gpus 4 --token-file t.token --socket /tmp/node.sock
    """
    from agent.node.connections import ConnectionLimits
    from agent.node.leases import OnExit, OnStart
    from agent.node.server import DEFAULT_SOCKET, NodeDaemon, NodeSettings, ensure_fd_limit

    if socket_path is None and listen is None:
        socket_path = DEFAULT_SOCKET
    settings = NodeSettings(
        token_file=token_file,
        socket_path=socket_path,
        listen=listen,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        insecure=insecure,
        socket_mode=_mode(socket_mode),
        fallback_cap_w=fallback_cap_w,
        max_lease_s=max_lease_s,
        check_interval_s=check_interval_s,
        on_exit=OnExit(on_exit.value),
        on_start=OnStart(on_start.value),
        public_metrics=public_metrics,
        limits=ConnectionLimits(
            max_connections=max_connections,
            max_per_peer=max_connections_per_peer,
            header_timeout_s=header_timeout_s,
            idle_timeout_s=idle_timeout_s,
        ),
        lease_file=lease_file,
        adopt_lease_s=adopt_lease_s,
    )
    settings.validate()
    ensure_fd_limit(settings.limits)
    lock = threading.RLock()
    stepper: _TwinStepper | None = None
    closer: Any = None
    gpus: GpuBackend
    if backend is Backend.SIM:
        from agent.core.gpu_models import BUILTIN_MODELS
        from agent.sim.devices import TwinNodeBackend
        from agent.sim.twin import Twin, TwinSpec

        if sim_model not in BUILTIN_MODELS:
            known = ", ".join(sorted(BUILTIN_MODELS))
            raise BadInputError(f"--sim-model: unknown GPU model {sim_model!r} (known: {known})")
        twin = Twin(
            TwinSpec(
                nodes=1, gpus_per_node=sim_gpus, model=BUILTIN_MODELS[sim_model], seed=sim_seed
            )
        )
        gpus = TwinNodeBackend(twin, 1)
        stepper = _TwinStepper(twin, lock)
    else:
        from agent.node.nvml import NvmlBackend

        nvml = NvmlBackend()
        gpus, closer = nvml, nvml.close
    daemon = NodeDaemon(gpus, settings, lock=lock)
    address = daemon.bind()
    typer.echo(f"ooda node: serving {len(daemon.manager.indices)} GPUs on {address}", err=True)
    if stepper is not None:
        stepper.thread.start()
    try:
        daemon.run()
    finally:
        if stepper is not None:
            stepper.stop_event.set()
        if closer is not None:
            closer()
