"""skAIn's benchmark scripts, run from the repository root as modules: `python -m benchmarks.speed.NAME` and
`python -m benchmarks.accuracy.NAME`. The index (script, question, results file, the doc that cites it) is
benchmarks/README.md; shared helpers are in benchmarks.common."""
