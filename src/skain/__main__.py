"""`python -m skain`: the same as the `skain` console script (allocator set-up first, see runtime_env)."""
from .runtime_env import run_cli

raise SystemExit(run_cli())
