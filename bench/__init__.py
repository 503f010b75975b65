"""Benchmarks of lazycluster against its floor and its alternatives, run with `nox -s bench`.

`python -m bench.run` starts three SSH hosts in Docker once, runs every
measurement module on them and on the simulator, prints the table and writes
docs/benchmarks.md. Each figure is the median of repeated runs with min and
max; ratios compare figures of the same run only.
"""
