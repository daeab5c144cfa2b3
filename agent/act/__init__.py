"""The guard, the actuators and the audit log."""
