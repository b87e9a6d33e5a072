"""Accuracy experiments and k-fold report builders: `python -m benchmarks.accuracy.NAME --help` (index:
benchmarks/README.md)."""
