"""What a model or a policy reads of the telemetry, declared where it is read (as krr's strategies
declare their metrics), so the source reads those fields and no others, each as often as its
most demanding reader needs it.

Each field comes with how old a reading may be: 0 for this cycle's (the default), or a number of
seconds for a field read less often (a source may read it only that often and keep or leave out
its value in between). A field may also be read only in place of another (`stand_ins`: the
enforced limit where a GPU does not export its power management limit).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.core.snapshot import Metric


@dataclass(frozen=True)
class Reads:
    # field -> how old a reading may be (s; 0: this cycle's)
    fields: Mapping[Metric, float] = field(default_factory=dict)
    # field -> the field it is read only in place of
    stand_ins: Mapping[Metric, Metric] = field(default_factory=dict)

    @staticmethod
    def every_cycle(*metrics: Metric) -> Reads:
        return Reads(dict.fromkeys(metrics, 0.0))

    def __or__(self, other: Reads) -> Reads:
        """Both readers' fields, each as fresh as the more demanding one needs it; a stand-in
        stays one only while nobody reads it for itself."""
        fields = dict(self.fields)
        for metric, age_s in other.fields.items():
            fields[metric] = min(age_s, fields.get(metric, age_s))
        stand_ins = {**self.stand_ins, **other.stand_ins}
        own = set(self.fields) | set(other.fields)
        return Reads(fields, {s: p for s, p in stand_ins.items() if s not in own})

    @staticmethod
    def union(reads: Iterable[Reads]) -> Reads:
        out = Reads()
        for r in reads:
            out = out | r
        return out

    def metrics(self) -> frozenset[Metric]:
        """Every field read, for itself or in place of another."""
        return frozenset(self.fields) | frozenset(self.stand_ins)

    def slow(self) -> dict[Metric, float]:
        """The fields read less often than every cycle: field -> seconds between reads."""
        return {m: age_s for m, age_s in self.fields.items() if age_s > 0}
