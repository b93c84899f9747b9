"""shardflow benchmarks: `python -m benchmarks <suite> [--quick]`."""
