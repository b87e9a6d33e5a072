"""The seed's GPU check, kept working: same as `skain check-gpu`."""
import sys

from skain.cli import main

if __name__ == "__main__":
    sys.exit(main(["check-gpu"]))
