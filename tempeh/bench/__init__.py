"""Benchmarks: each module exposes run(quick=False) -> dict; `python -m tempeh.bench` runs them all."""
