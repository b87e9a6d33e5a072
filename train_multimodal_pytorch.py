"""The seed's training command, kept working: same as `skain train` (flags pass through)."""
import sys

from skain.launch import run_cli  # allocator set-up first, then skain.cli (see skain.launch)

if __name__ == "__main__":
    sys.exit(run_cli(["train", *sys.argv[1:]]))
