"""`python app.py [--model outputs] [--port 5000]`: the same as `skain serve`."""
import sys

from skain.launch import run_cli  # allocator set-up first, then skain.cli (see skain.launch)

if __name__ == "__main__":
    sys.exit(run_cli(["serve", *sys.argv[1:]]))
