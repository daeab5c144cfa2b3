"""The site: several clusters under shared feeds, one coordinator above their agents.

- `tree`: the limits (site -> feeds or PDUs -> clusters, watts) and the split of what they allow
  among the clusters by marginal throughput per watt (pure).
- `curve`: a cluster's demand curve (what each further watt buys, its floor and ceiling), built
  by its agent from what orient learned (pure).
- `grants`, `demand`: grants with leases, demand-response targets ramped within a rate (pure).
- `store`: the coordination store (etcd through its v3 JSON gateway, or in memory for tests and
  the bench), `election`: leader election on it, `link`: the agent's side (its budget and its
  leadership), `coordinator`: the site coordinator (`ooda site run`).

Like the other edges this package imports only agent.core; the wiring (cli, runtime, daemon)
imports it.
"""
