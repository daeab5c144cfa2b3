"""Fault injection for the twin: `KIND[=PARAM]:TARGET@START[+DURATION]`.

TARGET is `nodeK` (every GPU of the node; for `dropout`, its exporter) or `nodeK/gpuI`; START and
DURATION are seconds of twin time (a suffix s, m or h is accepted). Without a duration a fault
lasts to the end of the run. Examples: `dropout:node2@30+60`, `xid=79:node2/gpu1@60`,
`fan:node1/gpu0@600+900`, `spike=300:node3/gpu2@120+20`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from agent.core.errors import BadInputError


class FaultKind(StrEnum):
    DROPOUT = "dropout"  # the node's exporter stops answering
    XID = "xid"  # PARAM: the XID code (default 79)
    ECC = "ecc"  # double-bit ECC errors and a row-remap failure
    FAN = "fan"  # a fan fails: thermal resistance x PARAM (1.6) within seconds; temperature rises
    STRAGGLER = "straggler"  # PARAM: clock (throughput) factor (0.7); its draw drops a little
    SPIKE = "spike"  # PARAM: extra watts (default 40% of TDP) that pass the cap, up to the max


DEFAULT_PARAM: dict[FaultKind, float] = {
    FaultKind.DROPOUT: 0.0,
    FaultKind.XID: 79.0,
    FaultKind.ECC: 1.0,
    FaultKind.FAN: 1.6,
    FaultKind.STRAGGLER: 0.7,
    FaultKind.SPIKE: float("nan"),  # resolved against the GPU model's TDP
}

_SPEC = re.compile(
    r"^(?P<kind>[a-z_]+)(?:=(?P<param>[^:]+))?:(?P<target>node\d+(?:/gpu\d+)?)"
    r"@(?P<start>[0-9.]+[smh]?)(?:\+(?P<duration>[0-9.]+[smh]?))?$"
)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_seconds(text: str) -> float:
    """`90`, `90s`, `15m`, `2h` -> seconds."""
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([smhd]?)", text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90, 90s, 15m, 2h)")
    unit = {"": 1.0, "d": 86400.0, **_UNITS}[m.group(2)]
    return float(m.group(1)) * unit


@dataclass(frozen=True, slots=True)
class FaultSpec:
    kind: FaultKind
    node: int  # 1-based, as in `node2`
    gpu: int | None  # None: every GPU of the node
    start_s: float
    duration_s: float | None  # None: until the end of the run
    param: float

    @property
    def end_s(self) -> float:
        return float("inf") if self.duration_s is None else self.start_s + self.duration_s

    @property
    def target(self) -> str:
        return f"node{self.node}" if self.gpu is None else f"node{self.node}/gpu{self.gpu}"

    def active(self, t_s: float) -> bool:
        return self.start_s <= t_s < self.end_s

    def __str__(self) -> str:
        param = "" if self.param == DEFAULT_PARAM[self.kind] else f"={self.param:g}"
        dur = "" if self.duration_s is None else f"+{self.duration_s:g}"
        return f"{self.kind}{param}:{self.target}@{self.start_s:g}{dur}"


def parse_fault(text: str) -> FaultSpec:
    """Parse one fault spec; a bad one raises BadInputError naming the spec and the problem."""
    m = _SPEC.match(text.strip())
    if not m:
        raise BadInputError(
            f"fault {text!r}: expected KIND[=PARAM]:nodeK[/gpuI]@START[+DURATION], "
            f"e.g. dropout:node2@30+60 or xid=79:node2/gpu1@60"
        )
    try:
        kind = FaultKind(m.group("kind"))
    except ValueError:
        known = ", ".join(k.value for k in FaultKind)
        raise BadInputError(
            f"fault {text!r}: unknown kind {m.group('kind')!r} (known: {known})"
        ) from None
    target = m.group("target")
    node_part, _, gpu_part = target.partition("/")
    node = int(node_part.removeprefix("node"))
    gpu = int(gpu_part.removeprefix("gpu")) if gpu_part else None
    if node < 1:
        raise BadInputError(f"fault {text!r}: nodes are numbered from node1")
    if kind is FaultKind.DROPOUT and gpu is not None:
        raise BadInputError(f"fault {text!r}: dropout targets a node's exporter (nodeK), not a GPU")
    try:
        param = float(m.group("param")) if m.group("param") else DEFAULT_PARAM[kind]
        start = parse_seconds(m.group("start"))
        duration = parse_seconds(m.group("duration")) if m.group("duration") else None
    except ValueError as exc:
        raise BadInputError(f"fault {text!r}: {exc}") from None
    if kind is FaultKind.XID and not (param >= 1 and float(param).is_integer()):
        raise BadInputError(f"fault {text!r}: an XID code is a positive integer")
    if duration is not None and duration <= 0:
        raise BadInputError(f"fault {text!r}: the duration must be positive")
    return FaultSpec(kind, node, gpu, start, duration, param)
