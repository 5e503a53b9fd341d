"""Baselines run on the same edges and shards: FedAvg."""
