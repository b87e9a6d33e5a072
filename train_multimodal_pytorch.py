"""The seed's training command, kept working: same as `skain train` (flags pass through)."""
import sys

from skain.runtime_env import run_cli  # allocator set-up first, then skain.cli (see skain.runtime_env)

if __name__ == "__main__":
    sys.exit(run_cli(["train", *sys.argv[1:]]))
