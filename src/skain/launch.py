"""The `skain` console script, `python -m skain` and the seed's root scripts all start here.

The allocator is chosen (and the process possibly re-executed with tcmalloc, `skain.runtime_env`) before
torch is imported, so the command-line module, which imports torch, is imported only after that step: an
ordering requirement of `LD_PRELOAD`, not a way around an import circle (this module is the top layer).
"""
from __future__ import annotations

import sys

from skain.runtime_env import prepare_process


def run_cli(argv: list[str] | None = None) -> int:
    """Allocator first, then the heavy command-line module."""
    try:
        prepare_process()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from skain.cli import main
    return main(argv)
