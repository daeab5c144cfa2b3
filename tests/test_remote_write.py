"""The remote-write source without a Prometheus: real protobuf + snappy bodies (encoded by the
protobuf package and cramjam, as senders encode them) decoded by the fast path exactly as
protobuf decodes them; staleness from sample times and markers; bounds answered with 4xx; the
receiver's token and TLS; the config's rules."""

from __future__ import annotations

import http.client
import os
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import cramjam
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import parse_config
from agent.core.errors import ConfigError, TelemetryError
from agent.core.snapshot import Metric
from agent.node.auth import TokenStore
from agent.observe.remote_write import RemoteWriteConfig, RemoteWriteSource, wire
from agent.observe.remote_write.store import HashIndex

POWER = "DCGM_FI_DEV_POWER_USAGE"
TEMP = "DCGM_FI_DEV_GPU_TEMP"
XID = "DCGM_FI_DEV_XID_ERRORS"
NOW_S = 1_800_000_000.0
NOW_MS = int(NOW_S * 1000)


def labels(name: str, host: str = "node1", gpu: int = 0, job: str = "", **extra: str) -> Any:
    found = {
        "__name__": name,
        "Hostname": host,
        "gpu": str(gpu),
        "UUID": f"GPU-{host}-{gpu}",
        "modelName": "NVIDIA H100 80GB HBM3",
        "instance": f"{host}:9400",
        "job": "dcgm",
        **extra,
    }
    if job:
        found["hpc_job"] = job
    return sorted(found.items())


def decoded_by_protobuf(body: bytes) -> list[tuple[dict[str, str], list[tuple[float, int]]]]:
    request = cast(Any, wire.WriteRequest())
    request.ParseFromString(bytes(cramjam.snappy.decompress_raw(body)))
    return [
        ({x.name: x.value for x in ts.labels}, [(s.value, s.timestamp) for s in ts.samples])
        for ts in request.timeseries
    ]


# -- the wire ------------------------------------------------------------------------------------


def test_the_fast_path_reads_what_protobuf_reads() -> None:
    series = [(labels(POWER, gpu=g), [(300.25 + g, NOW_MS - 1000 * g)]) for g in range(8)] + [
        (labels(XID), [(0.0, NOW_MS)]),  # a zero value is left out of the encoding
        (labels(TEMP), [(wire.stale_marker(), NOW_MS)]),
        (labels(TEMP, gpu=1), [(-1.5, 1)]),  # a 1-byte timestamp
        (labels(TEMP, gpu=2), [(7.0, 2**62)]),  # a 9-byte one
    ]
    body = wire.encode_request(series)
    raw = wire.decompress(body, 1 << 20)
    parts = wire.split(raw)
    tails = wire.tails(parts, raw)
    assert tails.fast.all()
    for k, (want_labels, want_samples) in enumerate(decoded_by_protobuf(body)):
        value, time_ms = want_samples[0]
        got = struct.pack("<d", tails.value[k])
        assert got == struct.pack("<d", value)  # bit for bit: the stale marker's NaN too
        assert tails.time_ms[k] == time_ms
        block = parts[k][: tails.label_bytes[k]]
        assert wire.decode_labels(block) == want_labels
        assert block == wire.decode_series(parts[k]).label_block  # protobuf's own encoding


def test_series_of_other_shapes_are_left_to_protobuf() -> None:
    body = wire.encode_request(
        [
            (labels(POWER), [(1.0, NOW_MS), (2.0, NOW_MS + 1000)]),  # two samples
            (labels(POWER, gpu=1), []),  # none
            (labels(POWER, gpu=2), [(3.0, -5)]),  # a negative time: a 10-byte varint
            (labels(POWER, gpu=3), [(3.0, 0)]),  # time 0 is left out of the encoding
        ]
    )
    raw = wire.decompress(body, 1 << 20)
    parts = wire.split(raw)
    tails = wire.tails(parts, raw)
    # The two-sample series ends like one sample: its "label block" holds the first sample,
    # which no label block the store keeps can match, so protobuf decodes it in full.
    assert wire.decode_labels(parts[0][: tails.label_bytes[0]]) is None
    assert not tails.fast[1:].any()
    full = wire.decode_series(parts[0])
    assert full.values.tolist() == [1.0, 2.0] and full.time_ms.tolist() == [NOW_MS, NOW_MS + 1000]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.dictionaries(
                st.text(min_size=1, max_size=12), st.text(max_size=20), min_size=0, max_size=6
            ),
            st.lists(
                st.tuples(
                    st.floats(allow_nan=False, width=64),
                    st.integers(min_value=-(2**63), max_value=2**63 - 1),
                ),
                max_size=3,
            ),
        ),
        max_size=20,
    )
)
def test_any_body_reads_as_protobuf_reads_it(
    body_series: list[tuple[dict[str, str], list[tuple[float, int]]]],
) -> None:
    series = [(sorted(ls.items()), samples) for ls, samples in body_series]
    body = wire.encode_request(series)
    raw = wire.decompress(body, 1 << 22)
    parts = wire.split(raw)
    tails = wire.tails(parts, raw)
    for k, (want_labels, want_samples) in enumerate(decoded_by_protobuf(body)):
        if not tails.fast[k]:
            continue
        assert (tails.value[k], int(tails.time_ms[k])) == want_samples[-1]
        block_labels = wire.decode_labels(parts[k][: tails.label_bytes[k]])
        if len(want_samples) == 1:
            assert block_labels == want_labels
        else:
            assert block_labels is None  # the store can never take it for a known block


def test_bodies_that_are_not_remote_write_are_refused_with_400() -> None:
    with pytest.raises(wire.BodyError, match="not a snappy block") as caught:
        wire.decompress(b"\xff\xff\xff\xff\xff\xff", 1 << 20)
    assert caught.value.status == 400
    with pytest.raises(wire.BodyError) as caught:
        wire.decompress(b"\x05\x00garbage", 1 << 20)
    assert caught.value.status == 400
    with pytest.raises(wire.BodyError, match="not a remote-write WriteRequest"):
        wire.split(b"\x0a\x05x")


def test_a_body_that_would_uncompress_past_the_bound_is_not_uncompressed() -> None:
    body = bytes(cramjam.snappy.compress_raw(b"\0" * 100_000))  # 100 kB from a few bytes
    assert len(body) < 10_000
    with pytest.raises(wire.BodyError, match="uncompresses to 100000 bytes") as caught:
        wire.decompress(body, 50_000)
    assert caught.value.status == 413


def test_the_hash_index_finds_what_it_holds() -> None:
    rng = np.random.default_rng(1)
    keys = rng.integers(-(2**63), 2**63 - 1, size=5000, dtype=np.int64)
    keys = np.unique(keys[keys != HashIndex.EMPTY])
    index = HashIndex()
    for slot in range(keys.size):  # one at a time, through every growth of the table
        index.add_many(keys[slot : slot + 1], np.array([slot]))
    assert len(index) == keys.size
    np.testing.assert_array_equal(index.find(keys), np.arange(keys.size))
    np.testing.assert_array_equal(HashIndex.of(keys).find(keys[::-1]), np.arange(keys.size)[::-1])
    others = rng.integers(0, 2**40, size=100, dtype=np.int64)
    assert (index.find(others[~np.isin(others, keys)]) == -1).all()


def test_the_hash_index_places_many_keys_at_once() -> None:
    """Keys added in batches (a body's new series), many sharing their home place: each found,
    through every growth of the table."""
    rng = np.random.default_rng(2)
    spread = rng.integers(-(2**63), 2**63 - 1, size=20_000, dtype=np.int64)
    crowded = (np.arange(3000, dtype=np.int64) << 24) | 5  # the same low bits: one home
    keys = np.unique(np.concatenate([spread, crowded]))
    keys = rng.permutation(keys[keys != HashIndex.EMPTY])
    index = HashIndex()
    for part in np.array_split(np.arange(keys.size), 7):
        index.add_many(keys[part], part)
    assert len(index) == keys.size
    np.testing.assert_array_equal(index.find(keys), np.arange(keys.size))
    assert 2 * len(index) <= index._keys.size  # at most half full
    np.testing.assert_array_equal(HashIndex.of(keys).find(keys), np.arange(keys.size))
    absent = np.setdiff1d(rng.integers(0, 2**40, size=100, dtype=np.int64), keys)
    assert (index.find(absent) == -1).all()


# -- the source ----------------------------------------------------------------------------------


@pytest.fixture
def source() -> Iterator[RemoteWriteSource]:
    found = RemoteWriteSource(
        RemoteWriteConfig(listen="127.0.0.1:0", scrape_interval_s=15, startup_wait_s=0)
    )
    yield found
    found.close()


def post(
    url: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, str]:
    host_port, path = url.split("//", 1)[1].split("/", 1)
    host, port = host_port.rsplit(":", 1)
    conn: http.client.HTTPConnection
    if context is not None:
        conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
    sent = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy"}
    conn.request("POST", f"/{path}", body, {**sent, **(headers or {})})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, text


def write(source: RemoteWriteSource, series: Any) -> None:
    status, text = post(source.url, wire.encode_request(series))
    assert status == 204, text


def test_nothing_received_is_an_outage_not_an_empty_fleet(source: RemoteWriteSource) -> None:
    with pytest.raises(TelemetryError, match="nothing received yet"):
        source.observe(NOW_S)


def test_gpus_fields_and_jobs_from_the_newest_samples(source: RemoteWriteSource) -> None:
    write(
        source,
        [
            (labels(POWER, "node2", 1, job="7"), [(410.5, NOW_MS - 2000)]),
            (labels(POWER, "node1", 0), [(300.0, NOW_MS - 5000)]),
            (labels(TEMP, "node1", 0), [(61.0, NOW_MS - 5000)]),
            (labels("node_cpu_seconds_total", "node1", 0), [(5.0, NOW_MS)]),  # not ours
        ],
    )
    write(source, [(labels(POWER, "node1", 0), [(310.0, NOW_MS - 1000)])])  # newer
    write(source, [(labels(POWER, "node1", 0), [(1.0, NOW_MS - 9000)])])  # older: ignored
    snap = source.observe(NOW_S)
    assert list(snap.node_of()) == ["node1", "node2"] and list(snap.gpu) == [0, 1]
    assert list(snap.job) == ["", "7"] and list(snap.uuid) == ["GPU-node1-0", "GPU-node2-1"]
    np.testing.assert_array_equal(snap.column(Metric.POWER_W)[0], [310.0, 410.5])
    temp, ok = snap.column(Metric.TEMP_C)
    assert temp[0] == 61.0 and ok.tolist() == [True, False]  # missing, never 0
    np.testing.assert_allclose(snap.age_s, [1.0, 2.0])
    assert not snap.stale.any() and snap.errors == ()
    assert source.store.series == 4  # the foreign series is remembered, never read


def test_staleness_from_sample_times_and_markers(source: RemoteWriteSource) -> None:
    write(
        source,
        [
            (labels(POWER, "node1", 0), [(300.0, NOW_MS - 1000)]),
            (labels(POWER, "node1", 1), [(300.0, NOW_MS - 50_000)]),  # older than 3 scrapes
            (labels(POWER, "node1", 2, job="9"), [(300.0, NOW_MS - 1000)]),
            (labels(TEMP, "node1", 2), [(60.0, NOW_MS - 1000)]),
        ],
    )
    snap = source.observe(NOW_S)
    assert snap.stale.tolist() == [False, True, False] and snap.job[2] == "9"
    write(source, [(labels(POWER, "node1", 2, job="9"), [(wire.stale_marker(), NOW_MS - 500)])])
    snap = source.observe(NOW_S)
    assert snap.stale.tolist() == [False, True, True]
    assert snap.job[2] == ""  # no live series: no job known (as the query source says)
    np.testing.assert_allclose(snap.age_s, [1.0, 50.0, 1.0])  # the marker is no sample
    assert np.isnan(snap.column(Metric.POWER_W)[0][1:]).all()  # stale: no values at all
    assert np.isnan(snap.column(Metric.TEMP_C)[0]).all()
    # A sample after the marker: live again. Past the inventory window: forgotten.
    write(source, [(labels(POWER, "node1", 2, job="9"), [(305.0, NOW_MS)])])
    snap = source.observe(NOW_S + 1)
    assert snap.stale.tolist() == [False, True, False] and snap.job[2] == "9"
    snap = source.observe(NOW_S + 601)
    assert snap.n_gpus == 0


def test_a_job_change_leaves_the_old_series_until_its_marker(source: RemoteWriteSource) -> None:
    write(source, [(labels(POWER, job="1"), [(300.0, NOW_MS - 2000)])])
    write(source, [(labels(POWER, job="2"), [(320.0, NOW_MS - 1000)])])
    snap = source.observe(NOW_S)
    # Both series are live (as in PromQL until the marker): the newest names the job, and
    # the value is the largest of the GPU's live series (max by (host, gpu)).
    assert list(snap.job) == ["2"] and snap.column(Metric.POWER_W)[0][0] == 320.0
    write(source, [(labels(POWER, job="1"), [(wire.stale_marker(), NOW_MS - 500)])])
    write(source, [(labels(POWER, job="2"), [(250.0, NOW_MS)])])
    snap = source.observe(NOW_S)
    assert list(snap.job) == ["2"] and snap.column(Metric.POWER_W)[0][0] == 250.0


def test_a_replaced_jobs_series_is_forgotten_at_the_next_sweep(source: RemoteWriteSource) -> None:
    """A series ended by its marker while its GPU has a live one of the same field is dropped
    at the next sweep, not after the whole inventory window (job churn at 100,000 GPUs held
    hundreds of thousands of them); a GPU whose every series ended stays known, stale."""
    write(
        source,
        [
            (labels(POWER, "node1", 0, job="1"), [(300.0, NOW_MS - 2000)]),
            (labels(POWER, "node2", 0, job="5"), [(300.0, NOW_MS - 2000)]),
        ],
    )
    source.observe(NOW_S)  # the first sweep
    write(
        source,
        [
            (labels(POWER, "node1", 0, job="1"), [(wire.stale_marker(), NOW_MS + 1000)]),
            (labels(POWER, "node1", 0, job="2"), [(310.0, NOW_MS + 1000)]),
            (labels(POWER, "node2", 0, job="5"), [(wire.stale_marker(), NOW_MS + 1000)]),
        ],
    )
    assert source.store.series == 3
    before = source.observe(NOW_S + 2)
    snap = source.observe(NOW_S + 160)  # a quarter of the window later: the sweep runs
    assert source.store.series == 2  # node1's job-1 series went; node2's stays (nothing else)
    assert list(snap.node_of()) == list(before.node_of()) == ["node1", "node2"]
    assert list(snap.job) == list(before.job) == ["2", ""]
    assert snap.stale.tolist() == [True, True]  # 159 s old, and ended
    assert source.observe(NOW_S + 1000).n_gpus == 0  # past the window: both forgotten


def test_power_series_without_a_gpu_are_reported(source: RemoteWriteSource) -> None:
    write(
        source,
        [
            ([("__name__", POWER), ("Hostname", "node1")], [(1.0, NOW_MS)]),  # no gpu label
            (labels(POWER), [(2.0, NOW_MS)]),
        ],
    )
    snap = source.observe(NOW_S)
    assert snap.n_gpus == 1
    assert snap.errors == (
        "1 series without a host label (Hostname, hostname) or an integer 'gpu' label were ignored",
    )


def test_bounds_and_formats_are_answered_with_4xx() -> None:
    config = RemoteWriteConfig(
        listen="127.0.0.1:0", startup_wait_s=0, max_body_bytes=4096, max_series=3
    )
    source = RemoteWriteSource(config)
    try:
        body = wire.encode_request([(labels(POWER, gpu=g), [(1.0, NOW_MS)]) for g in range(5)])
        status, text = post(source.url, body)
        assert status == 400 and "2 new series refused" in text and "max_series = 3" in text
        assert source.store.series == 3  # the first three were kept
        assert source.observe(NOW_S).n_gpus == 3
        snap = source.observe(NOW_S)
        assert snap.errors == ()  # said once, in the cycle after the refusal

        big = wire.encode_request(
            [(labels(POWER, gpu=g, pad=os.urandom(100).hex()), [(1.0, NOW_MS)]) for g in range(60)]
        )
        assert len(big) > 4096
        status, text = post(source.url, big)
        assert status == 413 and "over the limit of 4096" in text
        status, text = post(source.url, body, {"Content-Encoding": "gzip"})
        assert status == 415 and "want snappy" in text
        v2 = "application/x-protobuf;proto=io.prometheus.write.v2.Request"
        status, text = post(source.url, body, {"Content-Type": v2})
        assert status == 415 and "only remote write 1.0" in text
        status, text = post(source.url, b"not snappy at all")
        assert status == 400 and "snappy" in text
        status, text = post(source.url.replace("/api/v1/write", "/other"), body)
        assert status == 404
        metrics = http.client.HTTPConnection(*source.url.split("//")[1].split("/")[0].split(":"))
        metrics.request("GET", "/metrics")
        text = metrics.getresponse().read().decode()
        assert 'ooda_remote_write_rejected_total{reason="too_large"} 1.0' in text
        assert 'ooda_remote_write_requests_total{code="400"} 2.0' in text
        assert "ooda_remote_write_series 3.0" in text
    finally:
        source.close()


def _tls_files(tmp: Path) -> tuple[Path, Path]:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_and_a_bearer_token(tmp_path: Path) -> None:
    cert, key = _tls_files(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text("a-token-long-enough-1234\n")
    tokens.chmod(0o600)
    config = RemoteWriteConfig(
        listen="127.0.0.1:0", startup_wait_s=0, tls_cert=cert, tls_key=key, token_file=tokens
    )
    source = RemoteWriteSource(config, tokens=TokenStore(tokens))
    try:
        assert source.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        body = wire.encode_request([(labels(POWER), [(300.0, NOW_MS)])])
        assert post(source.url, body, context=context)[0] == 401
        bad = {"Authorization": "Bearer not-the-token-at-all"}
        assert post(source.url, body, bad, context=context)[0] == 403
        good = {"Authorization": "Bearer a-token-long-enough-1234"}
        assert post(source.url, body, good, context=context)[0] == 204
        assert source.observe(NOW_S).n_gpus == 1
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            post(source.url.replace("https", "http"), body, good)  # plain HTTP: no answer
        tokens.unlink()  # the token file gone: nobody is let in, and the sender retries
        assert post(source.url, body, good, context=context)[0] == 503
    finally:
        source.close()


def test_the_first_cycle_waits_for_the_senders() -> None:
    config = RemoteWriteConfig(listen="127.0.0.1:0", startup_wait_s=3)
    source = RemoteWriteSource(config)
    try:
        import threading

        def later() -> None:
            time.sleep(0.3)
            write(source, [(labels(POWER, gpu=g), [(1.0, NOW_MS)]) for g in range(4)])

        sender = threading.Thread(target=later)
        sender.start()
        started = time.monotonic()
        snap = source.observe(NOW_S)
        sender.join()
        assert snap.n_gpus == 4 and time.monotonic() - started < 3
    finally:
        source.close()


# -- the config ----------------------------------------------------------------------------------


def test_the_config_section_and_its_rules() -> None:
    config = parse_config(
        {"source": {"kind": "remote_write", "remote_write": {"listen": "[::1]:9201"}}}
    )
    assert config.source.remote_write.staleness_limit_s == 45.0
    assert (config.actuators.caps, config.actuators.placement) == ("none", "none")
    with pytest.raises(ConfigError, match=r"needs tls_cert, tls_key, token_file"):
        parse_config({"source": {"kind": "remote_write", "remote_write": {"listen": "0.0.0.0:1"}}})
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        parse_config({"source": {"remote_write": {"tls_cert": "/x"}}})
    with pytest.raises(ConfigError, match=r"listen: .*expected ADDR:PORT"):
        parse_config({"source": {"remote_write": {"listen": "nowhere"}}})
    with pytest.raises(ConfigError, match="PromQL needs a Prometheus"):
        parse_config({"source": {"kind": "remote_write"}, "cluster": {"budget_query": "sum(x)"}})
    with pytest.raises(ConfigError, match="power_w needs a metric name"):
        parse_config({"source": {"remote_write": {"metrics": {"power_w": ""}}}})
    labelled = parse_config(
        {"source": {"kind": "remote_write"}, "cluster": {"group_label": "rack"}}
    )
    assert labelled.cluster.group_label == "rack"


def test_connections_past_the_bound_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from agent.observe.remote_write import server

    monkeypatch.setattr(server, "MAX_CONNECTIONS", 2)
    source = RemoteWriteSource(RemoteWriteConfig(listen="127.0.0.1:0", startup_wait_s=0))
    host, port = source.url.split("//")[1].split("/")[0].split(":")
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(2)]
    try:
        time.sleep(0.3)  # both are being served (each holds a thread)
        third = socket.create_connection((host, int(port)), timeout=5)
        assert third.recv(100) == b""  # closed at once
        third.close()
        assert source.receiver.metrics.rejected.labels("connections")._value.get() == 1
        idle[0].close()
        time.sleep(0.3)
        write(source, [(labels(POWER), [(300.0, NOW_MS)])])  # a slot is free again
    finally:
        for conn in idle:
            conn.close()
        source.close()
