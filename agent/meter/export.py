"""The ledger's rows as CSV or Parquet (pyarrow): one row per time bucket and (job, partition),
with the job's user, account and QoS; energies in joules, times in the clock's seconds."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from agent.meter.ledger import EXPORT_COLUMNS

_TEXT = frozenset({"job", "user", "account", "partition", "qos"})


def write_csv(rows: Sequence[Sequence[Any]], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(EXPORT_COLUMNS)
        writer.writerows(rows)
    return len(rows)


def write_parquet(rows: Sequence[Sequence[Any]], path: Path) -> int:
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in EXPORT_COLUMNS]
    arrays = [
        pa.array(list(values), type=pa.string() if name in _TEXT else pa.float64())
        for name, values in zip(EXPORT_COLUMNS, columns, strict=True)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_arrays(arrays, names=list(EXPORT_COLUMNS)), path)
    return len(rows)
