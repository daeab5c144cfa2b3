"""The node daemon's HTTP API (Starlette, served by uvicorn), its auth gate and its /metrics.

    GET    /v1/gpus                 every GPU: index, uuid, min_w, max_w, default_w, power_limit_w,
                                    enforced_limit_w, lease_remaining_s (plus model, state, error)
    GET    /v1/gpus/{index}         one GPU
    PUT    /v1/gpus/{index}/cap     {"watts": W, "lease_s": T}: set or renew a cap under a lease
    DELETE /v1/gpus/{index}/cap     release: back to the GPU's default limit
    PUT    /v1/gpus/{index}/clocks  {"min_mhz": F, "max_mhz": F, "lease_s": T}: lock (or renew)
                                    the SM clocks to a range under a lease; reset when it lapses
    DELETE /v1/gpus/{index}/clocks  reset the SM clocks (unlock)
    PUT    /v1/gpus/{index}/profile {"profile": NAME, "lease_s": T}: request (or renew) a workload
                                    power profile under a lease; cleared when it lapses
    DELETE /v1/gpus/{index}/profile clear the requested profile
    PUT    /v1/caps                 {"caps": [{"index", "watts", "lease_s", "uuid"?}, ...]}:
                                    set or renew many in one request; a result per GPU
    POST   /v1/caps/release         {"gpus": [{"index", "uuid"?}, ...]}: release many
    GET    /metrics                 Prometheus metrics (ooda_node_*); token needed unless public
    GET    /healthz                 liveness, no token, no information

Every request but /healthz needs `Authorization: Bearer TOKEN`: none -> 401, a wrong one -> 403.
Bodies are validated before any GPU is touched: malformed JSON, unknown keys, wrong types,
non-finite numbers -> 400; a GPU that does not exist (or an index of more than a few digits)
-> 404; watts outside the GPU's constraints, clocks outside its supported SM clocks, min_mhz
above max_mhz, a profile unknown or unsupported or a lease out of bounds -> 400; a GPU without
clock locks or profiles -> 501; a `uuid` that is
not the GPU at that index -> 409; a body that does not arrive within the body timeout -> 408. Every
answer is JSON, an unexpected failure included (500, logged, never a traceback to the client).

Metrics are labelled by route (one of the routes above, or `other`) and method (the API's, or
`other`), never by the raw path or method a client sent: unauthenticated requests cannot grow
/metrics.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent.core.errors import GpuError
from agent.node.auth import AuthResult, TokenStore
from agent.node.connections import ShedEvents
from agent.node.leases import CapOutcome, CapRequestError, LeaseEvents, LeaseManager

log = structlog.get_logger("ooda.node.api")

MAX_BODY_BYTES = 64 * 1024
MAX_BULK_ITEMS = 256
BODY_TIMEOUT_S = 10.0
MAX_INDEX_DIGITS = 6  # GPU indices are small; a longer number is no GPU (and no 4,300-digit int)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# -- request bodies -------------------------------------------------------------------------------


class _Body(BaseModel):
    # strict: "300" or true is not a number of watts; no NaN or infinity.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class CapBody(_Body):
    watts: float
    lease_s: float


class ClockLockBody(_Body):
    min_mhz: float = Field(ge=0, le=1e5)
    max_mhz: float = Field(ge=0, le=1e5)
    lease_s: float


class ProfileBody(_Body):
    profile: str = Field(max_length=64)
    lease_s: float


class BulkCapItem(CapBody):
    index: int = Field(ge=0)
    uuid: str | None = None


class BulkCapBody(_Body):
    caps: list[BulkCapItem] = Field(max_length=MAX_BULK_ITEMS)


class ReleaseItem(_Body):
    index: int = Field(ge=0)
    uuid: str | None = None


class BulkReleaseBody(_Body):
    gpus: list[ReleaseItem] = Field(max_length=MAX_BULK_ITEMS)


_B = TypeVar("_B", bound=BaseModel)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        if err["type"] == "json_invalid":
            return f"malformed JSON: {err['msg'].removeprefix('Invalid JSON: ')}"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


# -- metrics --------------------------------------------------------------------------------------


class NodeMetrics(LeaseEvents, ShedEvents):
    """The daemon's own metrics, in its own registry (many daemons may share a process)."""

    def __init__(
        self,
        manager_ref: Callable[[], LeaseManager | None],
        open_connections: Callable[[], int] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ooda_node_requests",
            "HTTP requests by route, method and status code.",
            ["route", "method", "code"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "ooda_node_auth_failures",
            "Requests refused by the auth gate (missing, invalid, unavailable).",
            ["reason"],
            registry=self.registry,
        )
        self.cap_changes = Counter(
            "ooda_node_cap_changes",
            "Cap and clock lock changes by GPU and kind (set, renew, release, fallback, on_exit, "
            "on_start, adopt, resume, clock_lock, clock_renew, clock_reset, clock_expired, "
            "profile_set, profile_renew, profile_clear, profile_expired).",
            ["gpu", "kind"],
            registry=self.registry,
        )
        self.lease_expirations = Counter(
            "ooda_node_lease_expirations",
            "Leases that ran out, putting the GPU at the fallback cap.",
            ["gpu"],
            registry=self.registry,
        )
        self.gpu_errors = Counter(
            "ooda_node_gpu_errors",
            "GPU operations that failed, by GPU and error type.",
            ["gpu", "error"],
            registry=self.registry,
        )
        self.connections_shed = Counter(
            "ooda_node_connections_shed",
            "Connections closed by the daemon's limits (evicted: room for a new one; refused: "
            "no room; header_timeout: the request head took too long).",
            ["reason"],
            registry=self.registry,
        )
        self.registry.register(_GpuCollector(manager_ref))
        if open_connections is not None:
            self.registry.register(_ConnectionCollector(open_connections))

    def connection_shed(self, reason: str) -> None:
        self.connections_shed.labels(reason).inc()

    def cap_changed(self, index: int, kind: str) -> None:
        self.cap_changes.labels(str(index), kind).inc()

    def lease_expired(self, index: int) -> None:
        self.lease_expirations.labels(str(index)).inc()

    def gpu_error(self, index: int, exc: GpuError) -> None:
        self.gpu_errors.labels(str(index), type(exc).__name__).inc()


class _GpuCollector(Collector):
    """Per-GPU gauges read at scrape time (limits, lease), in watts and seconds."""

    _GAUGES = (
        ("power_limit_w", "ooda_node_power_limit_watts", "The GPU's power limit (W)."),
        ("enforced_limit_w", "ooda_node_enforced_limit_watts", "The enforced power limit (W)."),
        ("min_w", "ooda_node_min_limit_watts", "The lowest settable limit (W)."),
        ("max_w", "ooda_node_max_limit_watts", "The highest settable limit (W)."),
        ("default_w", "ooda_node_default_limit_watts", "The default limit (W)."),
        (
            "lease_remaining_s",
            "ooda_node_lease_remaining_seconds",
            "Seconds left on the cap's lease (absent: no lease).",
        ),
    )

    def __init__(self, manager_ref: Callable[[], LeaseManager | None]) -> None:
        self._manager_ref = manager_ref

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        manager = self._manager_ref()
        if manager is None:
            return []
        families = {
            key: GaugeMetricFamily(name, doc, labels=["gpu", "uuid"])
            for key, name, doc in self._GAUGES
        }
        state = GaugeMetricFamily(
            "ooda_node_cap_state",
            "1 for the GPU's cap state (unmanaged, leased, fallback, default).",
            labels=["gpu", "uuid", "state"],
        )
        for gpu in manager.gpus():
            labels = [str(gpu["index"]), str(gpu["uuid"])]
            for key, family in families.items():
                if gpu.get(key) is not None:
                    family.add_metric(labels, float(gpu[key]))
            state.add_metric([*labels, str(gpu["state"])], 1.0)
        return [*families.values(), state]


class _ConnectionCollector(Collector):
    def __init__(self, open_connections: Callable[[], int]) -> None:
        self._open = open_connections

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        gauge = GaugeMetricFamily(
            "ooda_node_connections", "Connections open now (all peers, all states)."
        )
        gauge.add_metric([], float(self._open()))
        return [gauge]


# -- the app --------------------------------------------------------------------------------------

_ROUTE_LABELS = tuple(
    (re.compile(pattern), label)
    for pattern, label in (
        (r"/v1/gpus", "/v1/gpus"),
        (r"/v1/gpus/[0-9]+", "/v1/gpus/{index}"),
        (r"/v1/gpus/[0-9]+/cap", "/v1/gpus/{index}/cap"),
        (r"/v1/gpus/[0-9]+/clocks", "/v1/gpus/{index}/clocks"),
        (r"/v1/gpus/[0-9]+/profile", "/v1/gpus/{index}/profile"),
        (r"/v1/caps", "/v1/caps"),
        (r"/v1/caps/release", "/v1/caps/release"),
        (r"/metrics", "/metrics"),
        (r"/healthz", "/healthz"),
    )
)
_METHOD_LABELS = frozenset({"GET", "PUT", "POST", "DELETE", "HEAD"})
_INDEX_TEXT = re.compile(rf"[0-9]{{1,{MAX_INDEX_DIGITS}}}")


def route_label(path: str) -> str:
    """The route a path is for (`/v1/gpus/{index}/cap`), or `other`: a bounded set of labels."""
    for pattern, label in _ROUTE_LABELS:
        if pattern.fullmatch(path):
            return label
    return "other"


def method_label(method: str) -> str:
    return method if method in _METHOD_LABELS else "other"


def _index(request: Request) -> int:
    """The path's GPU index; 404 for anything but a few ASCII digits."""
    text = str(request.path_params["index"])
    if not _INDEX_TEXT.fullmatch(text):
        shown = text if len(text) <= 12 else f"{text[:12]}... ({len(text)} characters)"
        raise CapRequestError(404, f"no GPU with index {shown} on this node")
    return int(text)


class AuthGate:
    """Pure ASGI middleware: every request but the open paths needs an accepted bearer token,
    checked before the body is read or any handler runs; it also counts requests."""

    def __init__(
        self, app: ASGIApp, tokens: TokenStore, metrics: NodeMetrics, open_paths: frozenset[str]
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.metrics = metrics
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(str(scope["path"]))
        method = method_label(str(scope["method"]))
        status: list[int] = [500]

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            if scope["path"] not in self.open_paths:
                header: str | None = None
                for name, value in scope["headers"]:
                    if name == b"authorization":
                        header = value.decode("latin-1")
                result = await self.tokens.check_async(header)
                if result is not AuthResult.OK:
                    self.metrics.auth_failures.labels(str(result)).inc()
                    await _refusal(result)(scope, receive, counted_send)
                    return
            await self.app(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(route, method, str(status[0])).inc()


def _refusal(result: AuthResult) -> Response:
    if result is AuthResult.MISSING:
        return JSONResponse(
            {"error": "a bearer token is required (Authorization: Bearer TOKEN)"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="ooda-node"'},
        )
    if result is AuthResult.INVALID:
        return JSONResponse({"error": "the bearer token is not accepted"}, status_code=403)
    return JSONResponse(
        {"error": "the daemon's token file is unusable: nobody is accepted until it is fixed"},
        status_code=503,
    )


async def _read_body(request: Request, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (
        len(declared) > 12 or (declared.isdecimal() and int(declared) > MAX_BODY_BYTES)
    ):
        raise CapRequestError(413, f"body larger than {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise CapRequestError(413, f"body larger than {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise CapRequestError(408, f"the body did not arrive within {timeout_s:g} s") from None
    return b"".join(chunks)


async def _parse(request: Request, model: type[_B], timeout_s: float) -> _B:
    body = await _read_body(request, timeout_s)
    if not body.strip():
        raise CapRequestError(400, "a JSON body is required")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise CapRequestError(400, _validation_message(exc)) from None


def _result(outcome: CapOutcome) -> dict[str, Any]:
    return {"index": outcome.index, "ok": True, "before_w": outcome.before_w, "gpu": outcome.gpu}


def _error(index: int | None, exc: CapRequestError) -> dict[str, Any]:
    return {"index": index, "ok": False, "status": exc.status, "error": exc.message}


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 as JSON errors, like every other answer of the API."""
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        {"error": exc.detail}, status_code=exc.status_code, headers=exc.headers or None
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    """Anything unexpected: a JSON 500 for the client, the traceback for the log only."""
    log.error("request_failed", route=route_label(request.url.path), exc_info=exc)
    return JSONResponse({"error": "internal error (see the daemon's log)"}, status_code=500)


def _handled(
    fn: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """A refused request (CapRequestError) as its JSON error, with the GPU index if any."""

    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except CapRequestError as exc:
            text = str(request.path_params.get("index", ""))
            index = int(text) if _INDEX_TEXT.fullmatch(text) else None
            return JSONResponse(_error(index, exc), status_code=exc.status)

    return endpoint


def _unique(indices: list[int]) -> None:
    seen: set[int] = set()
    for index in indices:
        if index in seen:
            raise CapRequestError(400, f"GPU {index} appears twice in one request")
        seen.add(index)


def _gpu_answer(index: int, gpu: dict[str, Any]) -> Response:
    """A lever's answer: the GPU as described after the change."""
    return JSONResponse({"index": index, "ok": True, "gpu": gpu})


class _Api:
    """The endpoints over one node's lease manager (GPU calls run in worker threads)."""

    def __init__(self, manager: LeaseManager, metrics: NodeMetrics, body_timeout_s: float) -> None:
        self.manager = manager
        self.metrics = metrics
        self.body_timeout_s = body_timeout_s

    async def list_gpus(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self.manager.gpus))

    async def get_gpu(self, request: Request) -> Response:
        index = _index(request)
        return JSONResponse(await run_in_threadpool(self.manager.gpu, index))

    async def put_cap(self, request: Request) -> Response:
        index = _index(request)
        body = await _parse(request, CapBody, self.body_timeout_s)
        outcome = await run_in_threadpool(self.manager.set_cap, index, body.watts, body.lease_s)
        log.info("cap_set", gpu=index, watts=body.watts, lease_s=body.lease_s)
        return JSONResponse(_result(outcome))

    async def delete_cap(self, request: Request) -> Response:
        index = _index(request)
        outcome = await run_in_threadpool(self.manager.release, index)
        log.info("cap_released", gpu=index)
        return JSONResponse(_result(outcome))

    async def put_clocks(self, request: Request) -> Response:
        index = _index(request)
        body = await _parse(request, ClockLockBody, self.body_timeout_s)
        gpu = await run_in_threadpool(
            self.manager.lock_clocks, index, body.min_mhz, body.max_mhz, body.lease_s
        )
        log.info("clocks_locked", gpu=index, min_mhz=body.min_mhz, max_mhz=body.max_mhz)
        return _gpu_answer(index, gpu)

    async def delete_clocks(self, request: Request) -> Response:
        index = _index(request)
        gpu = await run_in_threadpool(self.manager.reset_clocks, index)
        log.info("clocks_reset", gpu=index)
        return _gpu_answer(index, gpu)

    async def put_profile(self, request: Request) -> Response:
        index = _index(request)
        body = await _parse(request, ProfileBody, self.body_timeout_s)
        gpu = await run_in_threadpool(
            self.manager.request_profile, index, body.profile, body.lease_s
        )
        log.info("profile_requested", gpu=index, profile=body.profile, lease_s=body.lease_s)
        return _gpu_answer(index, gpu)

    async def delete_profile(self, request: Request) -> Response:
        index = _index(request)
        gpu = await run_in_threadpool(self.manager.clear_profile, index)
        log.info("profile_cleared", gpu=index)
        return _gpu_answer(index, gpu)

    def _set_many(self, items: list[BulkCapItem]) -> list[dict[str, Any]]:
        out = []
        with self.manager.batch():  # one write of the lease table for the whole request
            for item in items:
                try:
                    outcome = self.manager.set_cap(item.index, item.watts, item.lease_s, item.uuid)
                    out.append(_result(outcome))
                except CapRequestError as exc:
                    out.append(_error(item.index, exc))
        return out

    def _release_many(self, items: list[ReleaseItem]) -> list[dict[str, Any]]:
        out = []
        with self.manager.batch():
            for item in items:
                try:
                    out.append(_result(self.manager.release(item.index, item.uuid)))
                except CapRequestError as exc:
                    out.append(_error(item.index, exc))
        return out

    async def put_caps(self, request: Request) -> Response:
        body = await _parse(request, BulkCapBody, self.body_timeout_s)
        _unique([item.index for item in body.caps])
        results = await run_in_threadpool(self._set_many, body.caps)
        log.info("caps_set", gpus=len(results), ok=sum(bool(r["ok"]) for r in results))
        return JSONResponse({"results": results})

    async def release_caps(self, request: Request) -> Response:
        body = await _parse(request, BulkReleaseBody, self.body_timeout_s)
        _unique([item.index for item in body.gpus])
        results = await run_in_threadpool(self._release_many, body.gpus)
        log.info("caps_released", gpus=len(results), ok=sum(bool(r["ok"]) for r in results))
        return JSONResponse({"results": results})

    async def metrics_page(self, request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, self.metrics.registry)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})


def build_app(
    manager: LeaseManager,
    tokens: TokenStore,
    metrics: NodeMetrics,
    *,
    public_metrics: bool = False,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> ASGIApp:
    """The daemon's ASGI app over one node's lease manager."""
    api = _Api(manager, metrics, body_timeout_s)
    routes = [
        Route("/v1/gpus", _handled(api.list_gpus), methods=["GET"]),
        Route("/v1/gpus/{index}", _handled(api.get_gpu), methods=["GET"]),
        Route("/v1/gpus/{index}/cap", _handled(api.put_cap), methods=["PUT"]),
        Route("/v1/gpus/{index}/cap", _handled(api.delete_cap), methods=["DELETE"]),
        Route("/v1/gpus/{index}/clocks", _handled(api.put_clocks), methods=["PUT"]),
        Route("/v1/gpus/{index}/clocks", _handled(api.delete_clocks), methods=["DELETE"]),
        Route("/v1/gpus/{index}/profile", _handled(api.put_profile), methods=["PUT"]),
        Route("/v1/gpus/{index}/profile", _handled(api.delete_profile), methods=["DELETE"]),
        Route("/v1/caps", _handled(api.put_caps), methods=["PUT"]),
        Route("/v1/caps/release", _handled(api.release_caps), methods=["POST"]),
        Route("/metrics", api.metrics_page, methods=["GET"]),
        Route("/healthz", api.healthz, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )
    open_paths = frozenset({"/healthz", "/metrics"} if public_metrics else {"/healthz"})
    return AuthGate(app, tokens, metrics, open_paths)
