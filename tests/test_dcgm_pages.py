"""Recorded dcgm-exporter pages (tests/fixtures/dcgm; make_pages.py says how they were made): the
layout NVIDIA documents, healthy and degraded, and the twin's. The twin must serve what
dcgm-exporter serves, and the agent must read both alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from agent.core.dcgm import DCGM_FIELDS, FIELD_BY_NAME
from agent.core.snapshot import Metric, build_snapshot, screen_implausible

PAGES = Path(__file__).parent / "fixtures" / "dcgm"
IDENTITY = {
    "gpu",
    "UUID",
    "pci_bus_id",
    "device",
    "modelName",
    "Hostname",
    "DCGM_FI_DRIVER_VERSION",
}


def families(page: str) -> dict[str, tuple[str, list[tuple[dict[str, str], float]]]]:
    """Family name -> (type, [(labels, value)]), as prometheus-client's parser reads the page
    (it names counter samples with _total; the family keeps dcgm-exporter's name)."""
    text = (PAGES / page).read_text()
    return {
        f.name: (f.type, [(dict(s.labels), s.value) for s in f.samples])
        for f in text_string_to_metric_families(text)
    }


def test_the_twin_serves_what_dcgm_exporter_serves() -> None:
    nvidia, twin = families("healthy.prom"), families("twin-node1.prom")
    ours = {f.name for f in DCGM_FIELDS}
    # Every field the agent reads from dcgm-exporter, named and typed as the exporter does.
    for name in ours & set(nvidia):
        assert twin[name][0] == nvidia[name][0] == FIELD_BY_NAME[name].kind, name
    assert set(twin) >= ours & set(nvidia)
    # Each sample labelled alike: the identity labels, and the job where one runs.
    for page in (nvidia, twin):
        for _kind, samples in page.values():
            for labels, _value in samples:
                assert IDENTITY <= set(labels) <= IDENTITY | {"hpc_job"}, labels


def test_blank_values_of_a_degraded_page_are_missing_never_believed() -> None:
    """dcgm-exporter exports a field DCGM cannot read as one of DCGM's blank values: gpu1's ECC
    counter (ECC off: not supported) and every field of gpu3 (fallen off the bus: not found).
    Believed, 9.2e18 double-bit errors would drain gpu1's node."""
    page = families("degraded.prom")
    rows = sorted({int(labels["gpu"]) for _k, samples in page.values() for labels, _ in samples})
    assert rows == [0, 1, 2, 3, 4, 5, 6]  # gpu7 dropped out of the page
    values: dict[Metric, np.ndarray] = {}
    for field in DCGM_FIELDS:
        if field.name not in page:
            continue
        column = np.full(len(rows), np.nan)
        for labels, value in page[field.name][1]:
            column[rows.index(int(labels["gpu"]))] = value * field.to_metric
        values[field.metric] = column
    snap = screen_implausible(
        build_snapshot(
            time_s=0.0,
            node_of_gpu=["dgx-a17"] * len(rows),
            gpu=rows,
            uuid=[f"GPU-{k}" for k in rows],
            model=["NVIDIA H100 80GB HBM3"] * len(rows),
            job=[""] * len(rows),
            values=values,
            age_s=np.zeros(len(rows)),
            stale=np.zeros(len(rows), dtype=bool),
        )
    )
    ecc, ecc_ok = snap.column(Metric.ECC_DBE_TOTAL)
    assert ecc_ok.tolist() == [True, False, True, False, True, True, True]
    assert ecc[5] == 2.0
    power, power_ok = snap.column(Metric.POWER_W)
    assert not power_ok[3] and np.isnan(power[3]) and power_ok[[0, 1, 2, 4, 5, 6]].all()
    xid, _ = snap.column(Metric.XID)
    assert xid[3] == 79.0  # the one field of gpu3 that still reads
    assert any("implausible ecc_dbe_total" in e for e in snap.errors)
