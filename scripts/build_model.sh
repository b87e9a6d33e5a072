#!/usr/bin/env bash
# Rebuild the model skAIn ships (src/skain/models/ham10000.safetensors) from HAM10000 with skAIn's own commands.
#   make model CSV=path/HAM10000_metadata.csv IMAGES="path/HAM10000_images_part_1 path/HAM10000_images_part_2"
# Steps (recorded in src/skain/models/README.md with the figures of the shipped file):
#   1. the decision rule: cross-validation (5 lesion-grouped folds, each test fold chooses nothing) -> out-of-fold
#      predictions -> skain decide; or, with RULE_FROM=MODEL, that model's rule taken over unchanged (no CV)
#   2. the networks: one cpu-preset run per seed in SEEDS on one 90% train / 10% validation split (--folds 10
#      --fold 0, split seed 42), trained on the original images with re-saved copies mixed in (--photo-augment)
#   3. skain ensemble: the runs as one network (mean probability); they share the validation split, so it is held
#      out from every member and the ensemble's calibration, OOD check and triage are fit on it
#   4. skain calibrate --tta 8 --default: 8 TTA views become the model's default inference, with the temperature,
#      triage threshold and rule figures of exactly that inference
#   5. float16 safetensors, written only if it agrees with float32 on the >= 500 validation images
# Times: on 2 CPU cores each network takes about 45 minutes (7 epochs of 9,013 images at ~27 images/s plus its
# trust fit); the cross-validation of step 1 takes hours there (minutes on a GPU).
set -euo pipefail
CSV=${CSV:?CSV=path to HAM10000_metadata.csv}
IMAGES=${IMAGES:?IMAGES=the image folder(s)}
OUT=${OUT:-outputs/ship}
SKAIN=${SKAIN:-skain}
SEEDS=${SEEDS:-42 7}              # one network per seed; two Lite0 networks fit the 25 MB file
EPOCHS=${EPOCHS:-6}               # fine-tuning epochs per network (cosine schedule), after 1 frozen epoch
PHOTO=${PHOTO:-0.5}               # share of training images re-saved like a phone would (issue 24)
RULE_FROM=${RULE_FROM:-}          # e.g. src/skain/models/ham10000.safetensors: skip step 1's cross-validation
CV_MINUTES=${CV_MINUTES:-}        # e.g. 1.5 on a GPU; empty = no budget (epochs and early stopping decide)
TRIAGE_CONFIDENCE=${TRIAGE_CONFIDENCE:-}  # e.g. 0.9: triage threshold with margin (skain calibrate --triage-confidence)
TARGET=${TARGET:-src/skain/models/ham10000.safetensors}
data=(--csv "$CSV" --images $IMAGES --preset cpu --split-seed 42)

# 1. the decision rule's source
if [ -z "$RULE_FROM" ]; then
  budget=(); [ -n "$CV_MINUTES" ] && budget=(--max-minutes "$CV_MINUTES")
  $SKAIN train "${data[@]}" --seed 42 --all-folds --folds 5 --no-trust --photo-augment "$PHOTO" "${budget[@]}" \
    --output "$OUT/cv"
fi
# 2. the networks
runs=()
for seed in $SEEDS; do
  $SKAIN train "${data[@]}" --seed "$seed" --folds 10 --fold 0 --epochs "$EPOCHS" --photo-augment "$PHOTO" \
    --no-progress --output "$OUT/m$seed"
  runs+=("$OUT/m$seed")
done
# 3.-4. one model, its rule, 8 views by default
if [ "${#runs[@]}" -gt 1 ]; then
  $SKAIN ensemble --runs "${runs[@]}" --output "$OUT/final"
else
  rm -rf "$OUT/final" && cp -r "${runs[0]}" "$OUT/final"
fi
if [ -z "$RULE_FROM" ]; then
  $SKAIN decide --oof "$OUT/cv/oof_predictions.csv" --model "$OUT/final"
else
  $SKAIN decide --rule-from "$RULE_FROM" --model "$OUT/final"
fi
$SKAIN calibrate --model "$OUT/final" --tta 8 --default ${TRIAGE_CONFIDENCE:+--triage-confidence "$TRIAGE_CONFIDENCE"}
# 5. the validation images as a folder (for the parity check and the evaluation), then the file
python - "$OUT/${runs[0]##*/}" "$OUT/final" "$CSV" $IMAGES <<'PY'
import sys
from pathlib import Path
import pandas as pd
run, out, csv, folders = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
val = set(pd.read_csv(run / "split.csv").query("split == 'val'")["image_id"])
meta = pd.read_csv(csv)
meta[meta["image_id"].isin(val)].to_csv(out / "val_metadata.csv", index=False)
links = out / "val_images"
links.mkdir(exist_ok=True)
for folder in folders:
    for image in Path(folder).glob("*.jpg"):
        if image.stem in val and not (links / image.name).exists():
            (links / image.name).symlink_to(image.resolve())
PY
$SKAIN export --model "$OUT/final" --format safetensors --dtype float16 --check-images "$OUT/final/val_images" \
  --check-csv "$OUT/final/val_metadata.csv" --check-n 1002 --output "$TARGET"
$SKAIN evaluate --model "$TARGET" --csv "$OUT/final/val_metadata.csv" --images "$OUT/final/val_images" \
  --report "$OUT/final/shipped_report"
