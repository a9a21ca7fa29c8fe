"""Benchmarks for GPU machines (not tests, not part of CI); see bench/README.md."""
