"""Contracts with no Ray: scenario schema, errors, artifacts, registry, ledger and metrics."""
