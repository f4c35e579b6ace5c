"""Test harnesses shared by gpud's integration tests and benchmarks."""
