"""Speed, latency and memory benchmarks: `python -m benchmarks.speed.NAME --help` (index: benchmarks/README.md)."""
