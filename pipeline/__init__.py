"""pipeline: the read side of shardflow."""
