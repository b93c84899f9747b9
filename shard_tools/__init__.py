"""shard_tools: the write side of shardflow (pack, verify, inspect, index)."""

__version__ = "0.1.0"
