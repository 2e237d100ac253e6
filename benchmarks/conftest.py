"""Benchmarks run apart from the tests: ``pytest benchmarks --benchmark-disable-gc``."""
