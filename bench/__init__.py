"""Benchmarks of gpud against the budgets in DESIGN.md; see bench/README.md."""
