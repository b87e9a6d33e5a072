"""The seed's prediction command, kept working: same as `skain predict` (flags pass through).

    python predict_test.py                      # ./dataset_test with ./outputs -> outputs/test_predictions.csv
    python predict_test.py --data DIR --model outputs --format isic2018
"""
import sys

from skain.launch import run_cli  # allocator set-up first, then skain.cli (see skain.launch)

if __name__ == "__main__":
    sys.exit(run_cli(["predict", *sys.argv[1:]]))
