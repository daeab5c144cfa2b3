"""The privileged per-node daemon that applies power caps through NVML, with leases."""
