"""Benchmarks behind ``chunkcache bench``: quality, store, precompute, redis, ttft."""
