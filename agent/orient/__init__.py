"""Models: natural draws, anomalies, health, forecasts, power curves -> Situation (pure)."""
