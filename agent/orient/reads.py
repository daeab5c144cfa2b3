"""What orient's models read of the telemetry (see agent.core.reads), each model's own entry, so
the fields the loop queries follow from what is read, not from a hand-kept list.

The cost of reading a field a cycle is Prometheus's: a selection of every GPU's series, about
0.8 s of its CPU at 100,000 GPUs. A field no model and no policy reads (the energy counter, the
clocks-event reasons: the recorders and replay read them) is not queried by the loop at all.
"""

from __future__ import annotations

from agent.core.reads import Reads
from agent.core.snapshot import Metric

M = Metric

# orienter.cap_bounds: the cap in force and the settable range. The enforced limit is the cap in
# force only where a GPU does not export its power management limit.
CAP_BOUNDS = Reads(
    dict.fromkeys((M.POWER_LIMIT_W, M.MIN_LIMIT_W, M.MAX_LIMIT_W, M.DEFAULT_LIMIT_W), 0.0),
    stand_ins={M.ENFORCED_LIMIT_W: M.POWER_LIMIT_W},
)
# orienter: the fleet's draw against its budget, the node forecasts (power, temperature).
FLEET = Reads.every_cycle(M.POWER_W, M.TEMP_C)
# natural.py: each job's uncapped draw.
NATURAL = Reads.every_cycle(M.POWER_W, M.UTIL_PCT, M.POWER_LIMIT_W, M.MAX_LIMIT_W)
# anomaly.py: peers compared on these, every cycle.
ANOMALY = Reads.every_cycle(M.POWER_W, M.TEMP_C, M.UTIL_PCT, M.SM_CLOCK_MHZ)
# curvefit.py: power against clock under each cap; memory utilization tells a job's workload
# class once, so a minute's delay costs nothing.
CURVES = Reads({M.POWER_W: 0.0, M.SM_CLOCK_MHZ: 0.0, M.POWER_LIMIT_W: 0.0, M.MEM_UTIL_PCT: 60.0})
# health.py: the XID every cycle; the ECC and row-remap counters each come with an XID (48: a
# double-bit error; 63, 64: a row remap recorded, failed), so they back it up (the XID gauge
# holds only the last XID) and a minute-old reading does.
HEALTH = Reads(
    {
        M.XID: 0.0,
        M.ECC_DBE_TOTAL: 60.0,
        M.REMAPPED_ROWS_UNCORRECTABLE: 60.0,
        M.ROW_REMAP_FAILURE: 60.0,
    }
)

ORIENT_READS = Reads.union((CAP_BOUNDS, FLEET, NATURAL, ANOMALY, CURVES, HEALTH))
