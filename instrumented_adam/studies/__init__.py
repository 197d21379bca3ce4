"""Branching studies (layer between analysis and demo): the training protocol, branch specs,
sweeps, executors (local processes, Ray) and the merge of per-branch store shards."""
