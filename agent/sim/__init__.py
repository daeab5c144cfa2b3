"""The digital twin: GPU physics, jobs, faults; serves DCGM-style /metrics and the node API."""
