"""`python app.py [--model outputs] [--port 5000]`: the same as `skain serve`."""
import sys

from skain.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
