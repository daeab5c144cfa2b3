"""The node actuator: GPU power caps through the node daemons (`ooda node serve`), many at once.

One request per node (the daemon's bulk endpoints), sent in parallel on a bounded thread pool,
each with a timeout and retries (setting a cap under a lease is idempotent, so a retry is safe),
and the whole call bounded by a deadline. The result is per target: a node that is down, slow or
refuses is explained in `CapResult.errors` for its GPUs, never raised.

Caps are leases: the actuator remembers every cap it set (columnar, keyed by node/GPU) and
`renew_leases()` renews them; the loop calls it once per cycle. If the agent stops, the leases run
out and each node puts its GPUs at its fallback cap.

Endpoints: `unix:///run/ooda/node.sock` (a Unix socket) or `https://node1:9440` (TCP with TLS;
`http://` only for tests), per node or from a template with `{node}`.
"""

from __future__ import annotations

import math
import os
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import numpy.typing as npt
import structlog
from pydantic import BaseModel, Field, field_validator, model_validator

from agent.core.clock import Clock, SystemClock
from agent.core.errors import ConfigError
from agent.core.intents import GpuTargets
from agent.core.keyed import KeyedColumns
from agent.core.protocols import CapResult, GpuLimits
from agent.core.settings import STRICT_SETTINGS, file_field
from agent.core.urls import check_http_url, is_loopback

log = structlog.get_logger("ooda.act.node")

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_RETRY_STATUS = frozenset({502, 503, 504})
_GONE_STATUS = frozenset({404, 409})  # the GPU is not (or no longer) at that index
_SCHEMES = ("unix", "http", "https")


class NodeClientSettings(BaseModel):
    """How the agent reaches the node daemons (config section `[actuators.node]`)."""

    model_config = STRICT_SETTINGS

    endpoints: dict[str, str] = Field(
        default_factory=dict,
        description="Node name -> endpoint (unix:///path.sock or https://host:port; http:// "
        "only to a loopback address: the token would travel in clear).",
    )
    endpoint_template: str | None = Field(
        None,
        description="Endpoint for nodes not in `endpoints`, with {node}, "
        "e.g. 'https://{node}:9440'.",
    )
    token_file: Path = Field(
        ...,
        strict=False,
        description="Bearer token file (its first token is sent).",
        json_schema_extra=file_field("secret"),
    )
    tls_ca: Path | None = Field(
        None,
        strict=False,
        description="CA bundle that signed the daemons' certificates (default: system).",
        json_schema_extra=file_field("file"),
    )
    tls_client_cert: Path | None = Field(
        None,
        strict=False,
        description="Client certificate (PEM) for daemons that require one.",
        json_schema_extra=file_field("file"),
    )
    tls_client_key: Path | None = Field(
        None,
        strict=False,
        description="The client certificate's key (PEM).",
        json_schema_extra=file_field("secret"),
    )
    timeout_s: float = Field(2.0, gt=0, le=60, description="Per-request timeout (s).")
    retries: int = Field(1, ge=0, le=5, description="Retries per node on transport errors/5xx.")
    retry_backoff_s: float = Field(0.1, ge=0, le=5, description="First retry delay (doubles).")
    max_parallel: int = Field(32, ge=1, le=1024, description="Nodes contacted at once.")
    deadline_s: float | None = Field(
        None,
        gt=0,
        description="Bound on one whole call (s); default: what the timeouts and retries allow.",
    )
    renew_min_age_s: float = Field(
        5.0, ge=0, description="Caps set or renewed less than this long ago are not renewed (s)."
    )
    unreachable_backoff_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="A node that could not be reached (timeouts, refused connections) is not "
        "asked again for this long, doubling with each failure up to 10x (0: always ask): its "
        "timeouts would hold the workers, and the deadline, from the nodes that answer.",
    )

    @field_validator("endpoints")
    @classmethod
    def _valid_endpoints(cls, value: dict[str, str]) -> dict[str, str]:
        for node, url in value.items():
            _check_endpoint(url, f"endpoint of {node!r}")
        return value

    @field_validator("endpoint_template")
    @classmethod
    def _valid_template(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if "{node}" not in value:
            raise ValueError(f"must contain {{node}} (got {value!r})")
        try:
            url = value.format(node="node1")
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"only {{node}} may be substituted (got {value!r})") from None
        _check_endpoint(url, "endpoint_template")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> NodeClientSettings:
        if (self.tls_client_cert is None) != (self.tls_client_key is None):
            raise ValueError("tls_client_cert and tls_client_key go together")
        if not self.endpoints and self.endpoint_template is None:
            raise ValueError("give endpoints (node -> URL) or an endpoint_template")
        return self

    def call_deadline_s(self) -> float:
        if self.deadline_s is not None:
            return self.deadline_s
        backoff = float(sum(self.retry_backoff_s * 2**k for k in range(self.retries)))
        return self.timeout_s * (self.retries + 1) * 2 + backoff + 1.0


def _check_endpoint(url: str, what: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(
            f"{what}: expected unix:///path, https://host:port or http:// (got {url!r})"
        )
    if parts.scheme == "unix" and not parts.path:
        raise ValueError(f"{what}: a unix endpoint needs a path, e.g. unix:///run/ooda/node.sock")
    if parts.scheme != "unix":
        check_http_url(url, what)
    if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
        # Every request carries the bearer token: in clear, anyone on the path could take it.
        raise ValueError(
            f"{what}: plain http:// off this machine would send the bearer token in clear "
            f"(got {url!r}); use https:// (or unix:// on the node itself)"
        )


class _NodeError(Exception):
    """One node could not answer: the message explains, for every GPU of that node.
    `unreachable`: no answer at all (timeouts, transport errors), as opposed to a refusal."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True, slots=True)
class _Call:
    """The outcome of one node's request: the parsed answer, or why there is none."""

    node: str
    body: Any = None
    error: str | None = None
    unreachable: bool = False  # no answer at all: the node is backed off


class _Token:
    """The first token of the token file, re-read when the file changes (rotation)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._sig: tuple[int, int, int] | None = None
        self._token: str | None = None

    def get(self) -> str:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise _NodeError(f"token file {self.path}: {exc.strerror or exc}") from None
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if sig != self._sig or self._token is None:
                try:
                    # utf-8-sig: a byte order mark (as some editors write) is not the token's.
                    lines = self.path.read_text(encoding="utf-8-sig").splitlines()
                except (OSError, UnicodeDecodeError) as exc:
                    raise _NodeError(f"token file {self.path}: cannot read ({exc})") from None
                tokens = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
                if not tokens:
                    raise _NodeError(f"token file {self.path}: no token in it")
                self._token, self._sig = tokens[0], sig
            return self._token


def _group_by_node(nodes: npt.NDArray[np.str_]) -> list[tuple[str, IntArray]]:
    """(node, positions of its targets) for every node, in one sort."""
    if nodes.size == 0:
        return []
    names, inverse = np.unique(nodes, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(names.size + 1))
    return [
        (str(names[k]), order[bounds[k] : bounds[k + 1]].astype(np.int64))
        for k in range(names.size)
    ]


class NodeCapActuator:
    """CapActuator (and CapLeaseRenewer, GpuLimitsSource) over the node daemons."""

    def __init__(self, settings: NodeClientSettings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self._token = _Token(settings.token_file)
        self._ssl = self._ssl_context(settings)
        timeout = httpx.Timeout(settings.timeout_s)
        self._timeout = timeout
        self._tcp = httpx.Client(
            verify=self._ssl,
            timeout=timeout,
            limits=httpx.Limits(
                max_connections=settings.max_parallel * 2,
                max_keepalive_connections=settings.max_parallel * 2,
            ),
        )
        self._unix: dict[str, httpx.Client] = {}
        self._clients_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            settings.max_parallel, thread_name_prefix="ooda-node-client"
        )
        # Nodes that went unanswered: node -> (failures in a row, not asked before, last error).
        self._unreachable: dict[str, tuple[int, float, str]] = {}
        # The caps we set, for renewal: key "node/gpuN".
        self._caps = KeyedColumns(
            {
                "node": ("U128", ""),
                "gpu": (np.int64, -1),
                "uuid": ("U128", ""),
                "watts": (np.float64, np.nan),
                "last_ok_s": (np.float64, -np.inf),
                "active": (np.bool_, False),
            }
        )
        self._caps_lock = threading.Lock()

    @staticmethod
    def _ssl_context(settings: NodeClientSettings) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(
                cafile=str(settings.tls_ca) if settings.tls_ca is not None else None
            )
            if settings.tls_client_cert is not None:
                ctx.load_cert_chain(str(settings.tls_client_cert), str(settings.tls_client_key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"actuators.node: cannot load the TLS files (tls_ca, tls_client_cert, "
                f"tls_client_key): {exc}"
            ) from None
        return ctx

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._tcp.close()
        with self._clients_lock:
            for client in self._unix.values():
                client.close()
            self._unix.clear()

    # -- transport ------------------------------------------------------------------------------

    def endpoint(self, node: str) -> str | None:
        url = self.settings.endpoints.get(node)
        if url is None and self.settings.endpoint_template is not None:
            url = self.settings.endpoint_template.format(node=node)
        return url

    def _client(self, node: str) -> tuple[httpx.Client, str]:
        url = self.endpoint(node)
        if url is None:
            raise _NodeError("no endpoint configured for this node")
        parts = urlsplit(url)
        if parts.scheme != "unix":
            return self._tcp, url.rstrip("/")
        with self._clients_lock:
            client = self._unix.get(parts.path)
            if client is None:
                client = httpx.Client(
                    transport=httpx.HTTPTransport(uds=parts.path), timeout=self._timeout
                )
                self._unix[parts.path] = client
        return client, "http://node"

    def _request(self, node: str, method: str, path: str, body: Any = None) -> Any:
        """One node's request with retries; the JSON answer, or _NodeError explaining."""
        s = self.settings
        client, base = self._client(node)
        headers = {"Authorization": f"Bearer {self._token.get()}"}
        last = ""
        unreachable = True  # every attempt so far went unanswered
        for attempt in range(s.retries + 1):
            if attempt:
                time.sleep(s.retry_backoff_s * 2 ** (attempt - 1))
            try:
                response = client.request(method, base + path, json=body, headers=headers)
            except httpx.TimeoutException:
                last = f"timed out after {s.timeout_s:g} s"
                continue
            except httpx.TransportError as exc:
                last = f"unreachable ({type(exc).__name__}: {exc})"
                continue
            unreachable = False
            if response.status_code in _RETRY_STATUS and attempt < s.retries:
                last = f"HTTP {response.status_code}"
                continue
            try:
                answer = response.json()
            except ValueError:
                answer = None
            if response.status_code != 200:
                detail = answer.get("error") if isinstance(answer, dict) else None
                raise _NodeError(f"HTTP {response.status_code}: {detail or response.text[:200]}")
            return answer
        tries = s.retries + 1
        raise _NodeError(f"{last} ({tries} {'try' if tries == 1 else 'tries'})", unreachable)

    def _backed_off(self, node: str, now_s: float) -> _Call | None:
        """The answer for a node still backed off (not asked), or None to ask it."""
        down = self._unreachable.get(node)
        if down is None or not (now_s < down[1] <= now_s + self._backoff_s(down[0])):
            return None  # never failed, backed off long enough, or the clock went back
        failures, until_s, last = down
        return _Call(
            node,
            error=f"unreachable ({failures} times in a row; last: {last}); not asked again "
            f"for {until_s - now_s:.0f} s",
        )

    def _backoff_s(self, failures: int) -> float:
        base = self.settings.unreachable_backoff_s
        return float(min(base * 2 ** (failures - 1), 10 * base))

    def _note_reach(self, call: _Call, now_s: float) -> None:
        """Remember whether the node answered (called in one thread, after the fan-out)."""
        if not call.unreachable:
            self._unreachable.pop(call.node, None)
            return
        failures = self._unreachable.get(call.node, (0, 0.0, ""))[0] + 1
        until_s = now_s + self._backoff_s(failures)
        self._unreachable[call.node] = (failures, until_s, call.error or "")

    def _fan_out(self, calls: Sequence[tuple[str, str, str, Any]]) -> dict[str, _Call]:
        """Run (node, method, path, body) calls in parallel within the deadline."""

        def one(node: str, method: str, path: str, body: Any) -> _Call:
            try:
                return _Call(node, body=self._request(node, method, path, body))
            except _NodeError as exc:
                return _Call(node, error=str(exc), unreachable=exc.unreachable)
            except Exception as exc:  # one node's surprise must not sink the others
                log.exception("node_request_failed", node=node)
                return _Call(node, error=f"{type(exc).__name__}: {exc}")

        now = self.clock.now()
        out: dict[str, _Call] = {}
        asked: list[tuple[str, str, str, Any]] = []
        for request in calls:
            skipped = self._backed_off(request[0], now)
            if skipped is None:
                asked.append(request)
            else:
                out[request[0]] = skipped
        futures: dict[Future[_Call], str] = {
            self._pool.submit(one, node, method, path, body): node
            for node, method, path, body in asked
        }
        deadline = self.settings.call_deadline_s()
        done, pending = wait(futures, timeout=deadline)
        for f in done:
            answer = f.result()
            out[answer.node] = answer
            self._note_reach(answer, now)
        for f in pending:
            f.cancel()
            out[futures[f]] = _Call(futures[f], error=f"no answer within {deadline:g} s")
        return out

    # -- caps -----------------------------------------------------------------------------------

    def _apply(
        self, targets: GpuTargets, watts: FloatArray | None, lease_s: float
    ) -> tuple[CapResult, npt.NDArray[np.bool_]]:
        """Set (watts given) or release caps; the result, and which targets are gone (404/409)."""
        n = len(targets)
        outcome = _CapOutcome(
            ok=np.zeros(n, dtype=bool), gone=np.zeros(n, dtype=bool), before=np.full(n, np.nan)
        )
        groups = _group_by_node(targets.node)
        gpus = targets.gpu.tolist()
        uuids = targets.uuid.tolist()
        calls = _cap_calls(groups, gpus, uuids, watts, lease_s, outcome.errors)
        answers = self._fan_out(calls)
        for node, pos in groups:
            call = answers.get(node)
            if call is not None:
                plist = [p for p in pos.tolist() if p not in outcome.errors]
                outcome.read(node, call, plist, gpus)
        errors = outcome.errors
        if errors:
            log.warning(
                "node_caps_failed",
                targets=len(errors),
                nodes=len({e.split(":", 1)[0].split("/")[0] for e in errors.values()}),
                first=next(iter(errors.values())),
            )
        return CapResult(ok=outcome.ok, before_w=outcome.before, errors=errors), outcome.gone

    def _remember(
        self,
        targets: GpuTargets,
        ok: npt.NDArray[np.bool_],
        gone: npt.NDArray[np.bool_],
        watts: FloatArray | None,
        renewed_s: float | None = None,
    ) -> None:
        """What was set (`watts`) or released (None) where `ok`; `renewed_s`: when the caps set
        were last granted (default: now)."""
        keys = np.char.add(np.char.add(targets.node.astype(np.str_), "/"), targets.gpu.astype(str))
        granted_s = self.clock.now() if renewed_s is None else renewed_s
        with self._caps_lock:
            slots = self._caps.slots(keys)
            cols = self._caps.cols
            cols["node"][slots] = targets.node
            cols["gpu"][slots] = targets.gpu
            cols["uuid"][slots] = targets.uuid
            s_ok = slots[ok]
            if watts is None:
                cols["active"][s_ok] = False
            else:
                cols["watts"][s_ok] = watts[ok]
                cols["last_ok_s"][s_ok] = granted_s
                cols["active"][s_ok] = True
            cols["active"][slots[gone]] = False

    def set_caps(self, targets: GpuTargets, watts: FloatArray, lease_s: float) -> CapResult:
        w = np.asarray(watts, dtype=np.float64)
        result, gone = self._apply(targets, w, lease_s)
        self._remember(targets, result.ok, gone, w)
        return result

    def release_caps(self, targets: GpuTargets) -> CapResult:
        result, gone = self._apply(targets, None, 0.0)
        self._remember(targets, result.ok, gone, None)
        return result

    def adopt_leases(self, targets: GpuTargets, watts: FloatArray) -> None:
        """Caps of ours found in force that this process did not record as set (after a
        restart, or a call that failed late): renewed at the next renewal (their leases were
        granted at a time not known here) and from then on."""
        n = len(targets)
        self._remember(
            targets, np.ones(n, dtype=bool), np.zeros(n, dtype=bool), watts, renewed_s=-np.inf
        )

    def leased(self) -> tuple[GpuTargets, FloatArray]:
        """The caps this actuator set and has not released (what it renews)."""
        with self._caps_lock:
            cols = self._caps.cols
            sel = cols["active"].copy()
            targets = GpuTargets(
                cols["node"][sel].astype(np.str_),
                cols["gpu"][sel].astype(np.int64),
                cols["uuid"][sel].astype(np.str_),
            )
            return targets, cols["watts"][sel].astype(np.float64)

    def to_dict(self) -> dict[str, Any]:
        """The caps this actuator set (what it renews), JSON-ready: a restarted agent keeps
        renewing them instead of letting every node fall back."""
        with self._caps_lock:
            return self._caps.to_dict()

    def load_dict(self, data: Mapping[str, Any]) -> None:
        with self._caps_lock:
            self._caps.load_dict(data)

    def renew_leases(self, lease_s: float) -> tuple[GpuTargets, CapResult]:
        """Renew every cap we set that was not set or renewed within `renew_min_age_s`."""
        now = self.clock.now()
        with self._caps_lock:
            cols = self._caps.cols
            age = now - cols["last_ok_s"]
            # A negative age: the clock went back; renew rather than let the leases lapse.
            sel = cols["active"] & ((age >= self.settings.renew_min_age_s) | (age < 0))
            targets = GpuTargets(
                cols["node"][sel].astype(np.str_),
                cols["gpu"][sel].astype(np.int64),
                cols["uuid"][sel].astype(np.str_),
            )
            watts = cols["watts"][sel].astype(np.float64)
        if not len(targets):
            return targets, CapResult.all_ok(0)
        result = self.set_caps(targets, watts, lease_s)
        log.debug("leases_renewed", gpus=len(targets), failed=int((~result.ok).sum()))
        return targets, result

    # -- telemetry ------------------------------------------------------------------------------

    def gpu_limits(self, node_names: Sequence[str]) -> GpuLimits:
        """Every GPU's constraints, limits and lease, read from the nodes in parallel."""
        answers = self._fan_out([(node, "GET", "/v1/gpus", None) for node in node_names])
        rows: list[dict[str, Any]] = []
        node_col: list[str] = []
        errors: dict[str, str] = {}
        for node in node_names:
            call = answers[node]
            if call.error is not None or not isinstance(call.body, list):
                errors[node] = call.error or "unexpected answer (not a list of GPUs)"
                continue
            for gpu in call.body:
                if _gpu_index(gpu) is not None:
                    rows.append(gpu)
                    node_col.append(node)

        def col(key: str) -> FloatArray:
            return np.array(
                [float(r[key]) if isinstance(r.get(key), int | float) else np.nan for r in rows],
                dtype=np.float64,
            )

        return GpuLimits(
            node=np.array(node_col, dtype=np.str_),
            gpu=np.array([r["index"] for r in rows], dtype=np.int64),
            uuid=np.array([str(r.get("uuid", "")) for r in rows], dtype=np.str_),
            min_w=col("min_w"),
            max_w=col("max_w"),
            default_w=col("default_w"),
            power_limit_w=col("power_limit_w"),
            enforced_limit_w=col("enforced_limit_w"),
            lease_remaining_s=col("lease_remaining_s"),
            errors=errors,
        )


def _gpu_index(item: object) -> int | None:
    """The GPU index a node's answer item is about, None when it names none (not an object,
    no index, or an index that is not a non-negative integer)."""
    if not isinstance(item, dict):
        return None
    index = item.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        return None
    return index


def _cap_calls(
    groups: list[tuple[str, IntArray]],
    gpus: list[int],
    uuids: list[str],
    watts: FloatArray | None,
    lease_s: float,
    errors: dict[int, str],
) -> list[tuple[str, str, str, Any]]:
    """One call per node: release its targets' caps (watts None), or set them (a target whose
    watts are not a number goes to `errors` instead)."""
    calls: list[tuple[str, str, str, Any]] = []
    for node, pos in groups:
        plist = pos.tolist()
        if watts is None:
            items = [{"index": gpus[p], "uuid": uuids[p] or None} for p in plist]
            calls.append((node, "POST", "/v1/caps/release", {"gpus": items}))
            continue
        for p in plist:
            if not math.isfinite(float(watts[p])):
                errors[p] = f"{node}/gpu{gpus[p]}: {watts[p]} W is not a number of watts"
        items = [
            {
                "index": gpus[p],
                "uuid": uuids[p] or None,
                "watts": float(watts[p]),
                "lease_s": float(lease_s),
            }
            for p in plist
            if p not in errors
        ]
        if items:
            calls.append((node, "PUT", "/v1/caps", {"caps": items}))
    return calls


@dataclass
class _CapOutcome:
    """Per target of a cap call: applied, gone (404/409), the limit before, or why not."""

    ok: npt.NDArray[np.bool_]
    gone: npt.NDArray[np.bool_]
    before: FloatArray
    errors: dict[int, str] = field(default_factory=dict)

    def read(self, node: str, call: _Call, plist: list[int], gpus: list[int]) -> None:
        """One node's answer for its targets `plist`."""
        if call.error is not None:
            for p in plist:
                self.errors[p] = f"{node}: {call.error}"
            return
        results = call.body.get("results") if isinstance(call.body, dict) else None
        by_index: dict[int, dict[str, Any]] = {}
        if isinstance(results, list):
            # A result without an integer index answers for no GPU (its GPU then reads
            # "no result"): one malformed node answer must not raise for every node.
            by_index = {i: r for r in results if (i := _gpu_index(r)) is not None}
        for p in plist:
            r = by_index.get(gpus[p])
            if r is None:
                self.errors[p] = f"{node}/gpu{gpus[p]}: no result in the node's answer"
            elif r.get("ok") is True:
                self.ok[p] = True
                b = r.get("before_w")
                self.before[p] = float(b) if isinstance(b, int | float) else np.nan
            else:
                status = r.get("status")
                self.gone[p] = status in _GONE_STATUS
                self.errors[p] = f"{node}/gpu{gpus[p]}: {r.get('error', 'refused')} (HTTP {status})"
