"""Prometheus remote-write 1.0 bodies: a protobuf `WriteRequest` in snappy's block format, as
Prometheus, vmagent and the OpenTelemetry collector send it (the spec:
https://prometheus.io/docs/specs/prw/remote_write_spec/; the messages: prometheus/prompb
types.proto and remote.proto). Snappy is cramjam's; protobuf is the `protobuf` package, with the
messages declared here from those files (no generated module to keep in step).

Decoding a whole `WriteRequest` into message objects costs a Python object per series, label and
sample: at 100,000 GPUs (about 1.2 million samples every 15 s) that alone is seconds of CPU. So a
body is read in two steps:

1. protobuf splits it into its series, each still encoded (`SplitRequest` declares
   `timeseries` as `repeated bytes`, the same wire format as the message);
2. each series' one-sample tail (`samples` after `labels`, as every sender above writes them) is
   read by numpy for all series at once: its value, its timestamp and where its labels end.
   A series' labels, still encoded, are its identity: a store keeps the hash of every label block
   it has seen (`hash()` of the bytes, keyed per process by Python) and what it stands for.

A series whose tail has another shape (several samples, exemplars, fields in another order) or
whose labels are new is decoded by protobuf in full (`decode_series`); the label block the store
remembers is protobuf's own encoding of the labels, so a block it later meets again in a body is
known to be exactly those labels.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, cast

import cramjam
import numpy as np
import numpy.typing as npt
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# Prometheus's staleness marker: a sample with this NaN's exact bits says the series ended
# (its target went away or stopped exporting it); prometheus/model/value.StaleNaN.
STALE_NAN_BITS = 0x7FF0000000000002

# The longest one-sample tail: samples (tag 0x12, length), value (tag 0x09, 8 bytes), timestamp
# (tag 0x10, a varint of up to 10 bytes).
_TAIL = 24  # (the reads below go this far back from a series' end)
_TAG_SERIES = 0x0A  # WriteRequest.timeseries
_TAG_SAMPLES = 0x12
_TAG_VALUE = 0x09
_TAG_TIMESTAMP = 0x10
_MAX_TS_VARINT = 9  # a positive int64: a 10-byte varint is a negative timestamp (slow path)
_PAD = bytes(_TAIL)


class BodyError(ValueError):
    """A body the receiver refuses, with the HTTP status the sender gets (4xx: not retried)."""

    def __init__(self, status: int, problem: str) -> None:
        super().__init__(problem)
        self.status = status


def _declare() -> dict[str, type[message.Message]]:
    """The remote-write messages (prompb), declared field by field. `TimeSeries` keeps exemplars
    and histograms as encoded bytes: their presence is all the source needs to know."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="ooda/remote_write.proto", package="ooda.prompb", syntax="proto3"
    )
    field = descriptor_pb2.FieldDescriptorProto
    one, many = field.LABEL_OPTIONAL, field.LABEL_REPEATED

    def declare(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        msg = fdp.message_type.add(name=name)
        for fname, number, kind, label, type_name in fields:
            f = msg.field.add(name=fname, number=number, type=kind, label=label)
            if type_name:
                f.type_name = f".ooda.prompb.{type_name}"

    declare(
        "Label", ("name", 1, field.TYPE_STRING, one, ""), ("value", 2, field.TYPE_STRING, one, "")
    )
    declare(
        "Sample",
        ("value", 1, field.TYPE_DOUBLE, one, ""),
        ("timestamp", 2, field.TYPE_INT64, one, ""),
    )
    declare(
        "TimeSeries",
        ("labels", 1, field.TYPE_MESSAGE, many, "Label"),
        ("samples", 2, field.TYPE_MESSAGE, many, "Sample"),
        ("exemplars", 3, field.TYPE_BYTES, many, ""),
        ("histograms", 4, field.TYPE_BYTES, many, ""),
    )
    declare("WriteRequest", ("timeseries", 1, field.TYPE_MESSAGE, many, "TimeSeries"))
    declare("SplitRequest", ("timeseries", 1, field.TYPE_BYTES, many, ""))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"ooda.prompb.{m.name}"))
        for m in fdp.message_type
    }


MESSAGES = _declare()
TimeSeries = MESSAGES["TimeSeries"]
WriteRequest = MESSAGES["WriteRequest"]
Label = MESSAGES["Label"]
Sample = MESSAGES["Sample"]
_SplitRequest = MESSAGES["SplitRequest"]


Raw = bytes | bytearray | memoryview


def decompress(body: bytes, max_decoded_bytes: int, into: bytearray | None = None) -> Raw:
    """A snappy block (what remote write sends) uncompressed; BodyError when it is not one, or
    when it says it would be larger than `max_decoded_bytes` (checked before allocating).
    `into`: a buffer to reuse (grown as needed): the answer is a view of it, good until the
    next call."""
    try:
        size = int(cramjam.snappy.decompress_raw_len(body))
    except cramjam.DecompressionError as exc:
        raise BodyError(400, f"not a snappy block ({exc})") from None
    if size > max_decoded_bytes:
        raise BodyError(
            413,
            f"body uncompresses to {size} bytes, over the limit of {max_decoded_bytes} "
            "(max_decoded_bytes; send smaller batches: queue_config.max_samples_per_send)",
        )
    if into is None:
        into = bytearray(size)
    elif len(into) < size:
        into.extend(bytes(size - len(into)))
    out = memoryview(into)[:size]
    try:
        written = int(cramjam.snappy.decompress_raw_into(body, out))
    except cramjam.DecompressionError as exc:
        raise BodyError(400, f"corrupt snappy block ({exc})") from None
    if written != size:
        raise BodyError(400, f"corrupt snappy block ({written} bytes, {size} announced)")
    return out


def split(raw: Raw) -> list[bytes]:
    """The body's series, each as it was encoded; BodyError when it is not a WriteRequest."""
    request = _SplitRequest()
    try:
        request.ParseFromString(raw)
    except message.DecodeError as exc:
        raise BodyError(400, f"not a remote-write WriteRequest ({exc})") from None
    return list(cast(Any, request).timeseries)


@dataclass(frozen=True, eq=False)
class Tails:
    """Per series of a body: whether its tail is one sample in the usual shape, and if so its
    value, its timestamp (ms) and the length of its label block."""

    fast: BoolArray
    value: FloatArray
    time_ms: IntArray
    label_bytes: IntArray


def tails(series: list[bytes], raw: Raw) -> Tails:
    """Every series' one-sample tail, read for all series at once (see the module's doc), from
    `raw`, the request they were split from."""
    n = len(series)
    lengths = np.fromiter(map(len, series), dtype=np.int64, count=n)
    buf, ends = _series_ends(raw, lengths)
    if buf is None:  # the request holds more than its series (metadata): copy them out
        # Zeros in front: every series' last _TAIL bytes lie in the buffer, however short.
        ends = _TAIL + np.cumsum(lengths)
        buf = np.frombuffer(b"".join(itertools.chain((_PAD,), series)), dtype=np.uint8)
    out = _common_tails(buf, ends, lengths)
    rest = np.flatnonzero(~out.fast)
    if rest.size:
        other = _other_tails(buf, ends[rest], lengths[rest])
        for name in ("fast", "value", "time_ms", "label_bytes"):
            getattr(out, name)[rest] = getattr(other, name)
    return out


_VARINT_STEPS = np.array([1 << 7, 1 << 14, 1 << 21, 1 << 28, 1 << 35], dtype=np.int64)


def _series_ends(raw: Raw, lengths: IntArray) -> tuple[npt.NDArray[np.uint8] | None, IntArray]:
    """Where each series ends in `raw` when the request is its series and nothing else (each
    one's tag, its length as a varint, its bytes), as senders write it; (None, ...) otherwise."""
    header = 2 + np.searchsorted(_VARINT_STEPS, lengths, side="right")
    ends = np.cumsum(header + lengths)
    if len(raw) < 4 * _TAIL or int(ends[-1] if ends.size else 0) != len(raw):
        return None, ends
    buf = np.frombuffer(raw, dtype=np.uint8)
    if not (buf[ends - lengths - header] == _TAG_SERIES).all():
        return None, ends
    return buf, ends


# The usual tails, byte by byte from 18 before the timestamp's first byte to its last, for a
# timestamp of 6 varint bytes (milliseconds from 1971 to 2109): (mask, expected) per byte. 24
# bytes: three 64-bit words, compared at once.
_ANY, _MORE, _LAST = (0x00, 0x00), (0x80, 0x80), (0x80, 0x00)
_TS_BYTES = (_MORE,) * 5 + (_LAST,)
_WITH_VALUE = (
    (_ANY,) * 6
    + ((0xFF, _TAG_SAMPLES), (0xFF, 16), (0xFF, _TAG_VALUE))
    + (_ANY,) * 8
    + ((0xFF, _TAG_TIMESTAMP),)
    + _TS_BYTES
)
_WITHOUT_VALUE = (
    (_ANY,) * 15 + ((0xFF, _TAG_SAMPLES), (0xFF, 7), (0xFF, _TAG_TIMESTAMP)) + _TS_BYTES
)
_WIDTH = 24
_VALUE_AT = 9  # the value's 8 bytes (after samples tag, length, value tag)


def _template(spec: tuple[tuple[int, int], ...]) -> tuple[npt.NDArray[np.uint8], ...]:
    return (np.array([m for m, _ in spec], np.uint8), np.array([v for _, v in spec], np.uint8))


_WITH_MASK, _WITH_BYTES = _template(_WITH_VALUE)
_WITHOUT_MASK, _WITHOUT_BYTES = _template(_WITHOUT_VALUE)


def _matches(
    block: npt.NDArray[np.uint8], mask: npt.NDArray[np.uint8], want: npt.NDArray[np.uint8]
) -> BoolArray:
    """Rows of `block` (n x 24 bytes) whose masked bytes are `want`'s: three words a row."""
    words = ((block & mask) ^ want).view("<u8")
    return np.asarray((words[:, 0] | words[:, 1] | words[:, 2]) == 0, dtype=bool)


def _varint6(word: npt.NDArray[np.uint64]) -> IntArray:
    """The value of the 6-byte varint in the top 6 bytes of each word: 7 bits from each."""
    x = word >> np.uint64(16)
    out = x & np.uint64(0x7F)
    for k in range(1, 6):
        out |= (x >> np.uint64(k)) & np.uint64(0x7F << (7 * k))
    return out.astype(np.int64)


def _common_tails(buf: npt.NDArray[np.uint8], ends: IntArray, lengths: IntArray) -> Tails:
    """The tails of the usual shape (a 6-byte timestamp), a few numpy calls for all series."""
    # Each series' last 24 bytes, as rows of a window over the buffer (no index per byte).
    block = np.lib.stride_tricks.sliding_window_view(buf, _WIDTH)[ends - _WIDTH]
    room = lengths - 6
    with_value = _matches(block, _WITH_MASK, _WITH_BYTES) & (room >= 12)
    without = _matches(block, _WITHOUT_MASK, _WITHOUT_BYTES) & (room >= 3) & ~with_value
    fast = with_value | without
    time_ms = _varint6(block.view("<u8")[:, 2])
    value = np.ascontiguousarray(block[:, _VALUE_AT : _VALUE_AT + 8]).view("<f8")[:, 0]
    return Tails(
        fast=fast,
        value=np.where(with_value, value, 0.0),
        time_ms=np.where(fast, time_ms, 0),
        label_bytes=lengths - np.where(with_value, 18, np.where(without, 9, 0)),
    )


def _other_tails(buf: npt.NDArray[np.uint8], ends: IntArray, lengths: IntArray) -> Tails:
    """The tails of series whose timestamp is not 6 bytes long (or that are not one sample),
    byte by byte."""
    n = ends.size
    varint = np.ones(n, dtype=np.int64)  # the timestamp's bytes: the last, and those before it
    going = (buf[ends - 1] & 0x80) == 0
    for k in range(2, _MAX_TS_VARINT + 2):
        going &= (k <= lengths) & ((buf[ends - k] & 0x80) != 0)
        varint += going
    first = ends - varint  # the timestamp's first byte
    room = lengths - varint  # bytes before it
    ok = (varint <= _MAX_TS_VARINT) & (room >= 3) & ((buf[ends - 1] & 0x80) == 0)
    ok &= buf[first - 1] == _TAG_TIMESTAMP
    with_value = (
        ok
        & (room >= 12)
        & (buf[first - 12] == _TAG_SAMPLES)
        & (buf[first - 11] == 10 + varint)
        & (buf[first - 10] == _TAG_VALUE)
    )
    without = ok & ~with_value & (buf[first - 3] == _TAG_SAMPLES) & (buf[first - 2] == 1 + varint)
    fast = with_value | without
    time_ms = np.zeros(n, dtype=np.int64)
    for k in range(_MAX_TS_VARINT):
        digit = buf[np.minimum(first + k, ends - 1)].astype(np.int64) & 0x7F
        time_ms |= np.where(k < varint, digit << (7 * k), 0)
    value = np.zeros(n)
    if with_value.any():
        value[with_value] = buf[(first[with_value] - 9)[:, None] + np.arange(8)].view("<f8")[:, 0]
    return Tails(
        fast=fast,
        value=value,
        time_ms=np.where(fast, time_ms, 0),
        label_bytes=lengths - np.where(with_value, 12 + varint, np.where(without, 3 + varint, 0)),
    )


def label_hashes(series: list[bytes], label_bytes: IntArray, rows: IntArray) -> IntArray:
    """The hash of each listed series' label block (its first `label_bytes` bytes). Python's
    hash of bytes is SipHash with a key drawn per process; it is never -1."""
    cut = label_bytes[rows].tolist()
    picked = series if rows.size == len(series) else [series[i] for i in rows.tolist()]
    blocks = map(bytes.__getitem__, picked, map(slice, cut))
    return np.fromiter(map(hash, blocks), dtype=np.int64, count=rows.size)


@dataclass(frozen=True)
class DecodedSeries:
    """One series decoded in full by protobuf."""

    labels: dict[str, str]
    label_block: bytes  # protobuf's encoding of the labels alone: the identity the store keeps
    values: FloatArray
    time_ms: IntArray


def decode_labels(block: bytes) -> dict[str, str] | None:
    """A label block (a TimeSeries' labels alone, as the fast path cuts them) decoded; None when
    it is not labels alone (it holds a sample: a series of several) or does not parse."""
    series = cast(Any, TimeSeries())
    try:
        series.ParseFromString(block)
    except message.DecodeError:
        return None
    if series.samples or series.exemplars or series.histograms:
        return None
    return {label.name: label.value for label in series.labels}


def decode_series(encoded: bytes) -> DecodedSeries:
    """One series in full (the slow path: new series, unusual shapes); BodyError if malformed."""
    series = cast(Any, TimeSeries())
    try:
        series.ParseFromString(encoded)
    except message.DecodeError as exc:
        raise BodyError(400, f"a malformed TimeSeries in the WriteRequest ({exc})") from None
    block = cast(Any, TimeSeries(labels=series.labels)).SerializeToString()
    return DecodedSeries(
        labels={label.name: label.value for label in series.labels},
        label_block=block,
        values=np.array([s.value for s in series.samples], dtype=np.float64),
        time_ms=np.array([s.timestamp for s in series.samples], dtype=np.int64),
    )


def encode_request(series: list[tuple[list[tuple[str, str]], list[tuple[float, int]]]]) -> bytes:
    """A snappy-compressed WriteRequest of (labels, samples) per series, encoded by protobuf as
    any sender does (for tests and the benchmark)."""
    request = cast(Any, WriteRequest())
    for labels, samples in series:
        ts = request.timeseries.add()
        for name, value in labels:
            ts.labels.add(name=name, value=value)
        for sample, time_ms in samples:
            ts.samples.add(value=sample, timestamp=time_ms)
    return bytes(cramjam.snappy.compress_raw(request.SerializeToString()))


def stale_marker() -> float:
    """Prometheus's staleness marker as a float (compare bits, never values: it is a NaN)."""
    return float(np.array([STALE_NAN_BITS], dtype=np.uint64).view(np.float64)[0])
