"""Training: per-worker loop, batching, checkpoints, Ray Train launch."""
