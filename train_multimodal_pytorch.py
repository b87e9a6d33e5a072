"""The seed's training command, kept working: same as `skain train` (flags pass through)."""
import sys

from skain.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
