"""Benchmarks (not tests): our trainer against the baselines a user would pick instead.

Run them from the repository root as modules, e.g. `python -m bench.accuracy`; see bench/README.md.
"""
