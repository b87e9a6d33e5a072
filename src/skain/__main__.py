"""`python -m skain`: the same as the `skain` console script (allocator set-up first, see skain.launch)."""
from skain.launch import run_cli

raise SystemExit(run_cli())
