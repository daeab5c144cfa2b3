"""Fuzzing with hypothesis (issue 9, part 3): what comes from outside (a config file, a trace file,
a request to the node daemon, label values in PromQL) fails only with the domain's own error,
naming what is wrong, never with a crash, a 5xx, or a query of another shape.

Each test is bounded (max_examples, deadline) so the file runs in well under 30 s here. The
config, trace and CSV tests run under a memory limit (`memory_bound`: 1 GiB more than the
process maps when they start): an input that makes a reader allocate without bound fails the
test with a MemoryError instead of taking the machine."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from agent.config import parse_config
from agent.core.errors import ConfigError, TraceError
from agent.core.snapshot import Metric, build_snapshot
from agent.observe import promql
from agent.observe.prometheus import PrometheusSettings, PrometheusSource
from agent.observe.trace import TraceReader, TraceWriter
from tests.node_helpers import FakeGpu, unix_client, unix_node_daemon, write_token

# The memory bound holds for all of a test's examples (a fixture around them all, on purpose).
MEMORY_BOUND = HealthCheck.function_scoped_fixture

# -- config parsing -------------------------------------------------------------------------------

SECTIONS = ["cluster", "source", "twin", "actuators", "daemon", "audit", "guard", "policies"]
KEYS = [
    "name",
    "budget_w",
    "kind",
    "nodes",
    "gpus_per_node",
    "seed",
    "speed",
    "faults",
    "interval_s",
    "state_dir",
    "path",
    "max_bytes",
    "keep",
    "caps",
    "placement",
    "lease_s",
    "prometheus",
    "url",
    "timeout_s",
    "power_budget",
    "dry_run",
    "cap_cooldown_s",
    "model",
    "groups",
    "x",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=3),
    ),
    max_leaves=8,
)
documents = st.dictionaries(
    st.sampled_from([*SECTIONS, "dry_run", "policy_sets"]) | st.text(max_size=6),
    st.one_of(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), values), values),
    max_size=4,
)


@given(documents)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, MEMORY_BOUND]
)
def test_config_parsing_raises_only_config_errors_naming_a_key(
    memory_bound: None, data: dict[str, Any]
) -> None:
    try:
        parse_config(data, source="fuzz.toml")
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("fuzz.toml: ") and "\n" not in message
        # Names the key path: one of the document's top-level keys (or `policies.NAME`).
        assert any(str(key) in message or json.dumps(key) in message for key in data), (
            data,
            message,
        )


# -- trace parsing --------------------------------------------------------------------------------

METRICS = (Metric.POWER_W, Metric.TEMP_C)


@pytest.fixture(scope="module")
def trace_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ooda-fuzz-trace-"))
    with TraceWriter(
        path / "good.parquet", time_base="twin", step_s=15, source={}, metrics=METRICS
    ) as writer:
        for k in range(6):
            writer.append(
                build_snapshot(
                    time_s=15.0 * k,
                    node_of_gpu=["n1", "n1", "n2"],
                    gpu=[0, 1, 0],
                    uuid=["GPU-a", "GPU-b", "GPU-c"],
                    model=["NVIDIA H100 80GB HBM3"] * 3,
                    job=["1", "", "2"],
                    values={Metric.POWER_W: [500.0 + k, np.nan, 300.0], Metric.TEMP_C: [60.0] * 3},
                    age_s=[0.0] * 3,
                    stale=[False] * 3,
                )
            )
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def read_all(path: Path) -> None:
    reader = TraceReader(path)
    for snap in reader.snapshots():
        assert snap.n_gpus >= 0


def read_then_remove(path: Path) -> None:
    """Read a damaged trace: it reads, or fails with a TraceError naming the file, and nothing
    else; the file is removed after."""
    try:
        read_all(path)
    except TraceError as exc:
        assert str(path) in str(exc)
    finally:
        path.unlink()


@given(
    cut=st.integers(min_value=0, max_value=10_000),
    flips=st.lists(
        st.tuples(st.integers(min_value=0, max_value=10_000), st.integers(1, 255)), max_size=4
    ),
)
@example(cut=0, flips=[(167, 1), (167, 5)])  # a dictionary index past its dictionary (found)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, MEMORY_BOUND]
)
def test_truncated_or_mutated_traces_raise_only_trace_errors(
    memory_bound: None, trace_dir: Path, cut: int, flips: list[tuple[int, int]]
) -> None:
    data = bytearray((trace_dir / "good.parquet").read_bytes())
    for at, xor in flips:
        data[at % len(data)] ^= xor
    if cut < len(data) and not flips:
        data = data[:cut]
    path = trace_dir / f"bad-{cut}.parquet"
    path.write_bytes(bytes(data))
    read_then_remove(path)


@given(
    change=st.sampled_from(["drop", "rename", "retype", "nulls"]),
    column=st.integers(min_value=0, max_value=50),
)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, MEMORY_BOUND]
)
@pytest.mark.filterwarnings("error::RuntimeWarning")  # a silent NaN cast is a failure too
def test_bad_columns_raise_trace_errors_naming_the_column(
    memory_bound: None, trace_dir: Path, change: str, column: int
) -> None:
    table = pq.read_table(trace_dir / "good.parquet")
    footer = pq.ParquetFile(trace_dir / "good.parquet").metadata.metadata
    name = table.column_names[column % table.num_columns]
    i = table.column_names.index(name)
    if change == "drop":
        table = table.remove_column(i)
    elif change == "rename":
        table = table.rename_columns([*table.column_names[:i], "zz", *table.column_names[i + 1 :]])
    elif change == "retype":
        table = table.set_column(i, name, pa.array(["x"] * table.num_rows))
    else:
        table = table.set_column(i, name, pa.nulls(table.num_rows, table.schema.field(i).type))
    path = trace_dir / f"cols-{change}-{i}.parquet"
    schema_meta = table.schema.metadata or {}
    writer = pq.ParquetWriter(path, table.schema.with_metadata(schema_meta))
    writer.write_table(table)
    writer.add_key_value_metadata({k.decode(): v.decode() for k, v in (footer or {}).items()})
    writer.close()
    read_then_remove(path)


@given(
    where=st.sampled_from(["header", "steps"]),
    key=st.sampled_from(["time_base", "step_s", "metrics", "labels", "scenario", "source",
                         "time_s", "budget_w", "gpus", "group_steps", "rows", "x"]),
    value=values,
)  # fmt: skip
@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, MEMORY_BOUND]
)
def test_trace_metadata_values_raise_only_trace_errors(
    memory_bound: None, trace_dir: Path, where: str, key: str, value: Any
) -> None:
    source = trace_dir / "good.parquet"
    table = pq.read_table(source)
    meta_key = b"ooda.trace" if where == "header" else b"ooda.trace.steps"
    footer = pq.ParquetFile(source).metadata.metadata or {}
    carried = {k: v for k, v in footer.items() if k == b"ooda.trace.steps"}
    schema_meta = dict(table.schema.metadata or {})
    document = json.loads(schema_meta[b"ooda.trace"] if where == "header" else carried[meta_key])
    document[key] = value
    changed = json.dumps(document).encode()
    if where == "header":
        schema_meta[b"ooda.trace"] = changed
    else:
        carried[meta_key] = changed
    path = trace_dir / f"meta-{where}-{key}.parquet"
    writer = pq.ParquetWriter(path, table.schema.with_metadata(schema_meta))
    writer.write_table(table)
    writer.add_key_value_metadata({k.decode(): v.decode() for k, v in carried.items()})
    writer.close()
    read_then_remove(path)


# -- CSV series (`ooda detect`, `ooda forecast`) --------------------------------------------------

csv_text = st.lists(
    st.one_of(
        st.sampled_from(["timestamp", "value", ",", "\n", "\r\n", '"', "nan", "inf", "-1e309",
                         "2024-01-01T00:00:00Z", "1700000000", "\x00", "\ufeff", " "]),
        st.text(max_size=6),
        st.integers(-(10**30), 10**30).map(str),
    ),
    max_size=60,
).map("".join)  # fmt: skip


@given(text=csv_text)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, MEMORY_BOUND]
)
def test_csv_series_raise_only_bad_input_errors_naming_the_file(
    memory_bound: None, tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    from agent.cli.detect import read_series
    from agent.core.errors import BadInputError

    path = tmp_path_factory.mktemp("csv") / "series.csv"
    path.write_text("timestamp,value\n" + text, encoding="utf-8", errors="surrogatepass")
    try:
        read_series(path, "timestamp", "value")
    except BadInputError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)


# -- the node daemon's request parsing ------------------------------------------------------------


class NodeUnderFuzz:
    def __init__(self, root: Path) -> None:
        self.token = write_token(root / "token")
        self.gpus = [FakeGpu(0), FakeGpu(1)]
        self.daemon = unix_node_daemon(root, self.gpus)
        self.daemon.start()
        self.client = unix_client(root / "node.sock")

    def close(self) -> None:
        self.client.close()
        self.daemon.stop()


@pytest.fixture(scope="module")
def node() -> Iterator[NodeUnderFuzz]:
    root = Path(tempfile.mkdtemp(prefix="ooda-fz-"))  # short: a Unix socket path
    running = NodeUnderFuzz(root)
    try:
        yield running
    finally:
        running.close()
        shutil.rmtree(root, ignore_errors=True)


paths = st.one_of(
    st.sampled_from(
        [
            "/v1/gpus",
            "/v1/gpus/0",
            "/v1/gpus/1/cap",
            "/v1/gpus/7/cap",
            "/v1/gpus/-1/cap",
            "/v1/caps",
            "/v1/caps/release",
            "/metrics",
            "/healthz",
            "/v1/gpus/0/cap/../../caps",
            "/v1/gpus/99999999999999999999/cap",
        ]
    ),
    st.text(alphabet="/abcv01gpus.%-_?=&", max_size=30).map(lambda p: "/" + p.lstrip("/")),
)
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**66), max_value=2**66),
        st.floats(),
        st.text(max_size=8),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(["watts", "lease_s", "caps", "index", "uuid", "gpus", "x"]),
            inner,
            max_size=3,
        ),
    ),
    max_leaves=6,
)
bodies = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda w, lease: json.dumps({"watts": w, "lease_s": lease}).encode(),
        st.one_of(st.floats(), st.integers(), st.text(max_size=4)),
        st.one_of(st.floats(), st.integers(), st.none()),
    ),
)


ROUTES = [
    ("PUT", "/v1/gpus/0/cap"),
    ("PUT", "/v1/gpus/1/cap"),
    ("DELETE", "/v1/gpus/1/cap"),
    ("PUT", "/v1/caps"),
    ("POST", "/v1/caps/release"),
    ("GET", "/v1/gpus/0"),
]


@given(
    # Half the requests go to a real route (their bodies are what is parsed), half anywhere.
    route=st.one_of(
        st.sampled_from(ROUTES),
        st.tuples(st.sampled_from(["GET", "PUT", "DELETE", "POST", "PATCH"]), paths),
    ),
    body=bodies,
    # Half authorized: the request parsing behind the auth gate is what is fuzzed.
    auth=st.one_of(st.just("right"), st.sampled_from(["none", "wrong", "garbage"])),
    content_type=st.sampled_from([None, "application/json", "text/plain", "application/x-\x7f"]),
)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_node_daemon_answers_random_requests_with_4xx_json_never_5xx(
    node: NodeUnderFuzz,
    route: tuple[str, str],
    body: bytes,
    auth: str,
    content_type: str | None,
) -> None:
    method, path = route
    headers: dict[str, str] = {}
    if auth != "none":
        token = {"wrong": "not-the-token", "garbage": "\x01\x02 ;;", "right": node.token}[auth]
        headers["Authorization"] = (
            f"Bearer {token}" if auth != "garbage" else "Basic " + token.encode().hex()
        )
    if content_type is not None:
        headers["Content-Type"] = content_type.replace("\x7f", "")
    before = [g.limit_w for g in node.gpus]
    try:
        response = node.client.request(method, path, content=body, headers=headers)
    except httpx.InvalidURL:
        return  # the client refuses to send it: nothing reached the daemon
    assert response.status_code < 500, (method, path, body, response.text)
    event(f"HTTP {response.status_code}")
    if response.status_code >= 400 and path.startswith("/v1"):
        assert isinstance(response.json(), dict) and "error" in json.dumps(response.json())
    after = [g.limit_w for g in node.gpus]
    if after != before:
        # Only an authorized request carrying valid watts changes a cap.
        assert auth == "right" and method in ("PUT", "POST", "DELETE"), (method, path, body)
        assert response.status_code == 200
        for g in node.gpus:
            assert g.constraints.min_w <= g.limit_w <= g.constraints.max_w
        for g in node.gpus:  # leave it as found for the next example
            g.limit_w = g.constraints.default_w


# -- PromQL from configured label values ----------------------------------------------------------

hostile = st.lists(
    st.one_of(
        st.sampled_from(['"', "\\", "\n", "}", "{", "=", "~", ",", "|", ".*", " or ", "'", "`"]),
        st.characters(blacklist_categories=("Cs",)),
    ),
    max_size=12,
).map("".join)


class RecordingClient:
    """A hand-written fake of prometheus-api-client's client: remembers the queries it gets."""

    def __init__(self) -> None:
        self.queries: list[str] = []

    def custom_query(self, query: str, params: dict[str, str] | None = None) -> Any:
        self.queries.append(query)
        return []

    def close(self) -> None:
        pass


MATCHER = re.compile(r'(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')


@given(cluster=hostile, zone=hostile)
@example(cluster="", zone="C")  # once broke the test's own substitution, not the query
@settings(max_examples=150, deadline=None)
def test_configured_label_values_stay_one_quoted_string_in_every_query(
    cluster: str, zone: str
) -> None:
    client = RecordingClient()
    source = PrometheusSource(
        PrometheusSettings(match={"cluster": cluster, "zone": zone}),
        client=client,  # type: ignore[arg-type]
    )
    source.observe(1_700_000_000.0)
    assert client.queries
    literal = {"cluster": promql.quote(cluster), "zone": promql.quote(zone)}
    placeholder = {"cluster": '"C"', "zone": '"Z"'}

    def harmless(m: re.Match[str]) -> str:
        """A configured literal as a harmless one, all in one pass (replacing one value and then
        the other collides when a value is the other's placeholder: cluster "", zone "C")."""
        label = m["label"]
        if label in literal and m.group(0) == f"{label}={literal[label]}":
            return f"{label}={placeholder[label]}"
        return m.group(0)

    for query in client.queries:
        assert "\n" not in query
        found = {
            m["label"]: json.loads(f'"{m["value"]}"')
            for m in MATCHER.finditer(query)
            if m["label"] in ("cluster", "zone")
        }
        # Each configured value appears as exactly one string literal that decodes to it.
        assert found == {"cluster": cluster, "zone": zone}, query
        # And nothing else: the query with the two literals taken out has the shape it has with
        # harmless values.
        shape = MATCHER.sub(harmless, query)
        assert shape.count('cluster="C"') >= 1 and shape.count('zone="Z"') >= 1
