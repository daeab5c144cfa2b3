"""Metering: energy, cost and carbon per job, user, account and partition, in a SQLite ledger.

An edge of its own: it reads Snapshots (core) and writes the ledger; Slurm's accounting and any
PromQL price or carbon signal reach it through protocols the wiring fills.
"""
