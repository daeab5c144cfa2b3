"""The twin served like a real cluster: one dcgm-exporter-compatible `/metrics` endpoint per node.

`SimServer` steps the twin in a background thread at `speed` times real time and runs one small
HTTP server per node (node k on port_base + k - 1; port_base 0 picks free ports). Every node server
dispatches on a route table, so further per-node APIs (the node daemon's) are added by registering
routes in `SimServer._node_routes`, the one place node servers are made.

The text is the Prometheus text format exactly as dcgm-exporter writes it: its metric names, help
texts and types, counters without a `_total` suffix (prometheus-client cannot write that, hence
hand-written text), integer fields printed as integers, and its labels (gpu, UUID, pci_bus_id,
device, modelName, Hostname, DCGM_FI_DRIVER_VERSION, and hpc_job while a job runs there).
A node under a `dropout` fault, or whose exporter is restarting (agent/sim/phases.py), stops
answering: its connection is closed without a response.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

from agent.core.app_metrics import (
    SERVERS,
    VLLM_PROMPT_TOKENS,
    VLLM_TPOT_BUCKETS_S,
    VLLM_TTFT_BUCKETS_S,
    ThroughputKind,
)
from agent.core.dcgm import (
    DCGM_FIELDS,
    LABEL_DEVICE,
    LABEL_DRIVER,
    LABEL_GPU,
    LABEL_HOST,
    LABEL_JOB,
    LABEL_MODEL,
    LABEL_PCI_BUS_ID,
    LABEL_UUID,
    DcgmField,
    escape_label_value,
    format_values,
)
from agent.core.snapshot import Metric, Snapshot
from agent.node.server import NodeDaemon, NodeSettings
from agent.sim.devices import TwinNodeBackend
from agent.sim.faults import FaultKind
from agent.sim.twin import Twin, TwinSpec

FloatArray = npt.NDArray[np.float64]

DRIVER_VERSION = "550.54.15"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Counters = Literal["all", "default"]

# Where each metric lives in the twin (in the metric's own unit).
_TWIN_ATTR: dict[Metric, str] = {
    Metric.POWER_W: "reported_power_w",  # what DCGM reports: a flat-lined reading stays frozen
    Metric.TEMP_C: "reported_temp_c",
    Metric.UTIL_PCT: "util_pct",
    Metric.MEM_UTIL_PCT: "mem_util_pct",
    Metric.SM_CLOCK_MHZ: "sm_clock_mhz",
    Metric.XID: "xid",
    Metric.ECC_DBE_TOTAL: "ecc_dbe",
    Metric.REMAPPED_ROWS_UNCORRECTABLE: "remapped_uncorrectable",
    Metric.ROW_REMAP_FAILURE: "row_remap_failure",
    Metric.ENERGY_J: "reported_energy_j",  # restarts from zero with the exporter
    Metric.POWER_LIMIT_W: "cap_w",
    Metric.ENFORCED_LIMIT_W: "enforced_w",
    Metric.MIN_LIMIT_W: "min_w",
    Metric.MAX_LIMIT_W: "max_w",
    Metric.DEFAULT_LIMIT_W: "default_w",
    Metric.CLOCKS_EVENT_REASONS: "clocks_event_reasons",
}


def served_fields(counters: Counters = "all") -> tuple[DcgmField, ...]:
    """`default`: only dcgm-exporter's default counters (no power limits, as out of the box);
    `all`: the power-limit and ECC fields too, as when an operator enables them."""
    return DCGM_FIELDS if counters == "all" else tuple(f for f in DCGM_FIELDS if f.default)


def exported_values(
    twin: Twin, fields: Sequence[DcgmField], rows: npt.NDArray[np.int64] | None = None
) -> dict[str, FloatArray]:
    """Per GPU (all, or `rows`), every field as dcgm-exporter would print it, in DCGM's unit (mJ
    for energy): integer fields rounded, power to the milliwatt NVML reports."""
    out: dict[str, FloatArray] = {}
    for f in fields:
        column = np.asarray(getattr(twin, _TWIN_ATTR[f.metric]), dtype=np.float64)
        raw = (column if rows is None else column[rows]) / f.to_metric
        out[f.name] = np.round(raw) if f.integer else np.round(raw, 3)
    return out


def dcgm_metric_values(twin: Twin, fields: Sequence[DcgmField]) -> dict[Metric, FloatArray]:
    """What a Prometheus reader of the exporter sees, in the Snapshot's units."""
    return {
        f.metric: values * f.to_metric
        for f, values in zip(fields, exported_values(twin, fields).values(), strict=True)
    }


def dropout_since(twin: Twin) -> FloatArray:
    """Per node: when the dropout (or exporter restart) that silences its exporter now began (NaN:
    it answers)."""
    since = twin.restart_since_s.copy()
    for fault in twin.spec.faults:
        if fault.kind is FaultKind.DROPOUT and fault.active(twin.t_s):
            k = fault.node - 1
            since[k] = np.fmin(since[k], fault.start_s)
    return since


class NodeExporter:
    """Renders one node's /metrics text from the twin. Static labels are built once."""

    def __init__(self, twin: Twin, node: int, fields: Sequence[DcgmField]) -> None:
        g = twin.spec.gpus_per_node
        self.twin = twin
        self.node = node  # 1-based
        self.rows = np.arange((node - 1) * g, node * g, dtype=np.int64)
        self.fields = tuple(fields)
        host = escape_label_value(str(twin.node_names[node - 1]))
        model = escape_label_value(twin.spec.model.model_name)
        self._labels = [
            f'{LABEL_GPU}="{int(twin.gpu_idx[r])}",{LABEL_UUID}="{twin.uuid[r]}",'
            f'{LABEL_PCI_BUS_ID}="{twin.pci_bus_id[r]}",{LABEL_DEVICE}="nvidia{int(twin.gpu_idx[r])}",'
            f'{LABEL_MODEL}="{model}",{LABEL_HOST}="{host}",{LABEL_DRIVER}="{DRIVER_VERSION}"'
            for r in self.rows.tolist()
        ]

    @property
    def up(self) -> bool:
        return not math.isfinite(dropout_since(self.twin)[self.node - 1])

    def render(self) -> str:
        """The exposition text. The caller holds the twin's lock."""
        tw = self.twin
        jobs = tw.job_labels()[self.rows].tolist()
        labels = [
            f'{base},{LABEL_JOB}="{escape_label_value(job)}"' if job else base
            for base, job in zip(self._labels, jobs, strict=True)
        ]
        sub = exported_values(tw, self.fields, self.rows)
        parts: list[str] = []
        for f in self.fields:
            parts.append(f"# HELP {f.name} {f.help}\n# TYPE {f.name} {f.kind}\n")
            texts = format_values(sub[f.name], f.integer)
            parts.extend(
                f"{f.name}{{{lab}}} {text}\n" for lab, text in zip(labels, texts, strict=True)
            )
        return "".join(parts)


# -- the inference services' own metrics (vLLM's) ------------------------------------------------

VLLM_PATH = "/vllm/metrics"
VLLM_MODEL_NAME = "twin/llm-8b"


def _histogram(
    name: str,
    help_text: str,
    labels: str,
    buckets: Sequence[float],
    counts: FloatArray,
    total: float,
    sum_s: float,
) -> list[str]:
    """One histogram's lines: cumulative buckets, +Inf, _sum and _count."""
    lines = [f"# HELP {name} {help_text}\n", f"# TYPE {name} histogram\n"]
    lines += [
        f'{name}_bucket{{{labels},le="{le!r}"}} {count!r}\n'
        for le, count in zip(buckets, counts.tolist(), strict=True)
    ]
    lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {total!r}\n')
    lines.append(f"{name}_sum{{{labels}}} {sum_s!r}\n")
    lines.append(f"{name}_count{{{labels}}} {total!r}\n")
    return lines


def render_vllm(twin: Twin, node: int) -> str:
    """The /metrics text of the vLLM servers of the services on `node` (1-based), with vLLM's
    names, types and `model_name` label (agent.core.app_metrics); empty where none runs. The
    caller holds the twin's lock."""
    meters = twin.services
    g = twin.spec.gpus_per_node
    on_node = np.flatnonzero(np.isin(meters.rows, twin.job_row[(node - 1) * g : node * g]))
    if not on_node.size:
        return ""
    labels = f'model_name="{escape_label_value(VLLM_MODEL_NAME)}"'
    lines: list[str] = []
    counters = (
        (
            SERVERS[ThroughputKind.VLLM].rate,
            "Number of generation tokens processed.",
            meters.generation_tokens,
        ),
        (VLLM_PROMPT_TOKENS, "Number of prefill tokens processed.", meters.prompt_tokens),
    )
    for name, help_text, values in counters:
        base = name.removesuffix("_total")
        lines += [f"# HELP {base} {help_text}\n", f"# TYPE {base} counter\n"]
        lines += [f"{name}{{{labels}}} {float(values[i])!r}\n" for i in on_node]
    vllm = SERVERS[ThroughputKind.VLLM]
    for i in on_node:
        lines += _histogram(
            vllm.ttft,
            "Histogram of time to first token in seconds.",
            labels,
            VLLM_TTFT_BUCKETS_S,
            meters.ttft_buckets[i],
            float(meters.requests[i]),
            float(meters.ttft_sum_s[i]),
        )
        lines += _histogram(
            vllm.tpot,
            "Histogram of time per output token in seconds.",
            labels,
            VLLM_TPOT_BUCKETS_S,
            meters.tpot_buckets[i],
            float(meters.tpot_count[i]),
            float(meters.tpot_sum_s[i]),
        )
    return "".join(lines)


def service_jobs(twin: Twin) -> dict[int, str]:
    """Node (1-based) -> the job id of the inference service running there."""
    g = twin.spec.gpus_per_node
    out: dict[int, str] = {}
    for row in twin.services.rows.tolist():
        gpus = np.flatnonzero(twin.job_row == row)
        if gpus.size:
            out[int(gpus[0]) // g + 1] = str(int(twin.jobs.job_id[row]))
    return out


# -- HTTP -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes


# A route answers a request (method, path, query string, body); None drops the connection.
Route = Callable[[str, str, bytes], Response | None]


class _Handler(BaseHTTPRequestHandler):
    server: _NodeHTTPServer
    protocol_version = "HTTP/1.1"

    def _dispatch(self, method: str) -> None:
        path, _, query = self.path.partition("?")
        route = self.server.routes.get((method, path))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if route is None:
            response: Response | None = Response(404, "text/plain", b"not found\n")
        else:
            response = route(path, query, body)
        if response is None:  # this endpoint "stops answering"
            self.close_connection = True
            return
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:  # quiet: Prometheus scrapes often
        pass


class _NodeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    routes: dict[tuple[str, str], Route]


class NodeServer:
    """One node's HTTP endpoint (its own port) with a route table."""

    def __init__(self, name: str, host: str, port: int, routes: dict[tuple[str, str], Route]):
        self.name = name
        self._httpd = _NodeHTTPServer((host, port), _Handler, bind_and_activate=True)
        self._httpd.routes = routes
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def routes(self) -> dict[tuple[str, str], Route]:
        return self._httpd.routes

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever: only if it runs
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()


@dataclass(frozen=True)
class NodeApiOptions:
    """A node daemon per twin node (what `ooda node serve` is on a real node): on a Unix socket
    `socket_dir/nodeK.sock`, or on 127.0.0.1 at `port_base + K - 1` (plain HTTP, loopback only)."""

    token_file: Path
    socket_dir: Path | None = None
    port_base: int | None = None  # 0: free ports
    fallback_cap_w: float | None = None

    def settings_for(self, node: int) -> NodeSettings:
        if self.socket_dir is not None:
            return NodeSettings(
                token_file=self.token_file,
                socket_path=self.socket_dir / f"node{node}.sock",
                fallback_cap_w=self.fallback_cap_w,
            )
        base = self.port_base or 0
        port = 0 if base == 0 else base + node - 1
        return NodeSettings(
            token_file=self.token_file,
            listen=f"127.0.0.1:{port}",
            fallback_cap_w=self.fallback_cap_w,
        )


class SimServer:
    """The twin plus one HTTP server per node, stepping in a background thread.

    `speed` is twin seconds per wall second (0: the twin stands still until `advance` is called).
    Everything that touches the twin holds `lock`.
    """

    TICK_S: ClassVar[float] = 0.05

    def __init__(
        self,
        spec: TwinSpec,
        *,
        listen: str = "127.0.0.1",
        port_base: int = 19400,
        speed: float = 1.0,
        counters: Counters = "all",
        node_api: NodeApiOptions | None = None,
    ) -> None:
        if speed < 0:
            raise ValueError("speed must be >= 0")
        self.twin = Twin(spec)
        self.lock = threading.RLock()
        self.speed = speed
        self.listen = listen
        self.port_base = port_base
        self.fields = served_fields(counters)
        self.exporters = [NodeExporter(self.twin, k, self.fields) for k in range(1, spec.nodes + 1)]
        self.nodes: list[NodeServer] = []
        self.node_api = node_api
        self.node_daemons: list[NodeDaemon] = []
        self._stop = threading.Event()
        self._stepper: threading.Thread | None = None
        self._paused = speed == 0

    # -- per-node endpoints: the one place they are made --------------------------------------

    def _node_routes(self, node: int) -> dict[tuple[str, str], Route]:
        exporter = self.exporters[node - 1]

        def metrics(path: str, query: str, body: bytes) -> Response | None:
            with self.lock:
                if not exporter.up:
                    return None
                text = exporter.render()
            return Response(200, CONTENT_TYPE, text.encode())

        def vllm(path: str, query: str, body: bytes) -> Response | None:
            with self.lock:
                text = render_vllm(self.twin, node)
            return Response(200, CONTENT_TYPE, text.encode())

        return {("GET", "/metrics"): metrics, ("GET", VLLM_PATH): vllm}

    def start(self) -> SimServer:
        for k in range(1, self.twin.spec.nodes + 1):
            port = 0 if self.port_base == 0 else self.port_base + k - 1
            name = str(self.twin.node_names[k - 1])
            try:
                self.nodes.append(NodeServer(name, self.listen, port, self._node_routes(k)))
            except OSError as exc:
                for server in self.nodes:
                    server.stop()
                self.nodes = []
                raise OSError(
                    exc.errno, f"cannot listen on {self.listen}:{port} for {name} ({exc.strerror})"
                ) from exc
        for server in self.nodes:
            server.start()
        if self.node_api is not None:
            try:
                for k in range(1, self.twin.spec.nodes + 1):
                    daemon = NodeDaemon(
                        TwinNodeBackend(self.twin, k), self.node_api.settings_for(k), lock=self.lock
                    )
                    self.node_daemons.append(daemon.start())
            except Exception:
                self.stop()
                raise
        self._stepper = threading.Thread(target=self._run, name="twin-stepper", daemon=True)
        self._stepper.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._stepper is not None:
            self._stepper.join(timeout=5)
        for server in self.nodes:
            server.stop()
        for daemon in self.node_daemons:
            daemon.stop()
        self.node_daemons = []

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        wall0 = time.monotonic()
        twin0 = self.twin.t_s
        while not self._stop.wait(self.TICK_S):
            if self._paused:
                wall0, twin0 = time.monotonic(), self.twin.t_s
                continue
            target = twin0 + self.speed * (time.monotonic() - wall0)
            with self.lock:
                if not self._paused:
                    self.twin.run_until(target)

    # -- control (tests, and the Act work's node API) --------------------------------------

    def pause(self) -> None:
        with self.lock:
            self._paused = True

    def resume(self) -> None:
        with self.lock:
            self._paused = self.speed == 0

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.twin.run_until(self.twin.t_s + seconds)

    def node_api_endpoints(self) -> dict[str, str]:
        """Node name -> its node daemon's address (`unix:///...` or `http://127.0.0.1:PORT`)."""
        return {f"node{k + 1}": d.address for k, d in enumerate(self.node_daemons)}

    def targets(self) -> list[str]:
        return [f"{host}:{port}" for host, port in (s.address for s in self.nodes)]

    def scrape_config(self, job_name: str = "ooda-sim-dcgm", interval_s: float = 15.0) -> str:
        return scrape_config(self.targets(), job_name, interval_s)

    def vllm_targets(self) -> dict[str, str]:
        """The services' vLLM endpoints (`host:port`, path VLLM_PATH) -> the job each serves:
        the label a scrape configuration puts on the target (vLLM does not know its job)."""
        with self.lock:
            jobs = service_jobs(self.twin)
        addresses = self.targets()
        return {addresses[node - 1]: job for node, job in sorted(jobs.items())}


def scrape_config(targets: Sequence[str], job_name: str, interval_s: float) -> str:
    """A Prometheus scrape config (YAML) for the given targets."""
    timeout = min(interval_s, 10.0)
    lines = [
        "scrape_configs:",
        f"  - job_name: {job_name}",
        f"    scrape_interval: {interval_s:g}s",
        f"    scrape_timeout: {timeout:g}s",
        "    static_configs:",
        "      - targets:",
        *(f"          - '{t}'" for t in targets),
    ]
    return "\n".join(lines) + "\n"


def dcgm_snapshot(twin: Twin, fields: Sequence[DcgmField]) -> Snapshot:
    """The twin as a Prometheus reader of its exporters would see it now: values as served
    (rounded like DCGM), and the GPUs of a node whose exporter is down stale, with no values and
    the age of their last sample (Prometheus marks such series stale at the first failed scrape).
    Twin ground truth a trace keeps for replay rides along as the `priority` label (and the
    `workload` label, where the twin labels its jobs' workloads)."""
    tw = twin
    since = dropout_since(tw)[tw.node_of]
    stale = np.isfinite(since)
    age = np.where(stale, tw.t_s - since, 0.0)
    values = dcgm_metric_values(tw, fields)
    for column in values.values():
        column[stale] = np.nan
    return Snapshot(
        time_s=tw.t_s,
        node_names=tw.node_names,
        node=tw.node_of,
        gpu=tw.gpu_idx,
        uuid=tw.uuid,
        model=np.full(tw.spec.n_gpus, tw.spec.model.model_name),
        job=np.where(stale, "", tw.job_labels()),
        values=values,
        valid={m: ~stale for m in values},
        age_s=age,
        stale=stale,
        budget_w=tw.budget_w(),
        labels=tw.labels(),
    )
