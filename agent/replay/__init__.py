"""Record traces, replay them through policies, KPIs and the report."""
