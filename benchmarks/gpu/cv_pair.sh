#!/usr/bin/env bash
# The fair metadata comparison (issue 11) and the longer cross-validation (issue 12) in one call on a lent GPU
# machine (16 cores, one H100/H200, no internet), with `.gpu/` from benchmarks/gpu/pack.py carried along
# (`--quality 65`: 33 MiB of images, so that they, the weights and the repository with its 22 MB shipped model stay
# under the 64 MiB a call may carry).
# Ten trainings at once, the cpu recipe with --max-minutes $MIN each (the cosine schedule follows the clock):
#   mm/fold<k>   multimodal (metadata dropout 0.2), --holdout --fold k     k = 0..4
#   img/fold<k>  image-only, the same split, the same recipe              k = 0..4
# Or any two settings on the same folds: A="--balance sqrt" B="--balance none" (runs a/ and b/).
# Other backbones: every <backbone>_fp16.pt in the pack becomes $W/<backbone>.pt, and RESIZES names the cache sizes
# to fill (the resize of each input size: round(size / 0.875)), e.g. for Lite2 @ 288 against Lite0 @ 224 from a
# 329 px pack: RESIZES="329 256" A="--backbone tf_efficientnet_lite2 --input-size 288
# --pretrained-file /tmp/skain/tf_efficientnet_lite2.pt" B=" ".
# Every test fold is scored with metadata present / each field blank / all blank, and with 8 TTA views for present
# and all blank (test_logits.npz), so the reports, the paired differences and the ensembles are computed back home
# (the measured run used MIN=6.5 LIMIT=520):
#   python -m skain cv-report /tmp/gpu/mm ...
# Dry run on a small CPU machine: SUBSET=300 FOLDS="0 1" MIN=0.3 WK=0 bash benchmarks/gpu/cv_pair.sh
# Budget the call (timeout_s) for unpacking + LIMIT + the copy back. Measured on an H200 machine on 2026-11-27:
# unpacking the 329 px pack (41.8 MiB) into PNGs and two cache sizes took 201 s (the 256 px pack alone is about
# half the pixels), training 330 s (MIN=5.5), scoring the ten test folds at once 8-24 s. A run cut off during its
# scoring is finished, on the same warm machine, by its own command with --resume in place of --overwrite.
set -u
OUT=${OUT:-/tmp/skain-out}; W=${W:-/tmp/skain}; G=${G:-.gpu}; MIN=${MIN:-6}; FOLDS=${FOLDS:-0 1 2 3 4}
WK=${WK:-2}; SUBSET=${SUBSET:-0}; LIMIT=${LIMIT:-500}; TTA=${TTA:-8}; RESIZES=${RESIZES:-256}
A=${A:-}; B=${B:---image-only}; NA=${A:+a}; NB=${A:+b}; NA=${NA:-mm}; NB=${NB:-img}
mkdir -p "$W/images" "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
t0=$(date +%s)
G=$G W=$W SUBSET=$SUBSET RESIZES=$RESIZES python3 - <<'PY'
import glob, io, os, zipfile
from concurrent.futures import ProcessPoolExecutor
import pandas as pd, torch
from PIL import Image
from skain.data.images import ImageLoader
W, G, subset = os.environ["W"], os.environ["G"], int(os.environ["SUBSET"])
meta = pd.read_csv(f"{G}/HAM10000_metadata.csv")
if subset:  # dry run: the first lesions' images only
    meta = meta[meta["lesion_id"].isin(meta["lesion_id"].drop_duplicates().iloc[:subset])]
meta.to_csv(f"{W}/metadata.csv", index=False)
wanted = {f"{i}.webp" for i in meta["image_id"]}
def to_png(item):
    name, data = item
    path = f"{W}/images/{name[:-5]}.png"
    Image.open(io.BytesIO(data)).convert("RGB").save(path, compress_level=1)
    for size in os.environ["RESIZES"].split():
        ImageLoader(int(size), f"{W}/cache")(path)
with zipfile.ZipFile(f"{G}/images.zip") as z:
    items = [(n, z.read(n)) for n in z.namelist() if n in wanted]
with ProcessPoolExecutor(os.cpu_count()) as pool:
    list(pool.map(to_png, items, chunksize=64))
for packed in glob.glob(f"{G}/*_fp16.pt"):  # float16 to travel light, widened again here
    sd = torch.load(packed, weights_only=True)
    name = os.path.basename(packed)[:-len("_fp16.pt")]
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, f"{W}/{name}.pt")
    print("weights", name)
print(f"{len(items)} images unpacked and cached, {len(meta)} metadata rows")
PY
echo "unpacked in $(( $(date +%s) - t0 )) s"
common=(--csv "$W/metadata.csv" --images "$W/images" --preset cpu --pretrained-file "$W/tf_efficientnet_lite0.pt"
        --cache-dir "$W/cache" --no-progress --epochs 30 --patience 8 --overwrite --holdout --no-trust
        --test-tta "$TTA" --max-minutes "$MIN" --workers "$WK")
start=$(date +%s)
for k in $FOLDS; do
  timeout "$LIMIT" python3 -m skain train "${common[@]}" --fold "$k" $A --output "$W/runs/$NA/fold$k" \
    >"$W/$NA$k.log" 2>&1 &
  timeout "$LIMIT" python3 -m skain train "${common[@]}" --fold "$k" $B --output "$W/runs/$NB/fold$k" \
    >"$W/$NB$k.log" 2>&1 &
done
while [ "$(jobs -r | wc -l)" -gt 0 ]; do
  sleep 30
  echo "$(( $(date +%s) - start )) s: $(cat "$W"/*.log | grep -c 'img/s') epochs done;" \
       "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
done
echo "all trainings ended after $(( $(date +%s) - start )) s"
for f in "$W/$NA"*.log "$W/$NB"*.log; do
  echo "== $f"; grep -v "Warn\|warn" "$f" | grep "epoch\|test fold\|scored\|Error\|error" | tail -n 3
done
for k in $FOLDS; do cp "$W/$NA$k.log" "$W/runs/$NA/fold$k/train.log"; cp "$W/$NB$k.log" "$W/runs/$NB/fold$k/train.log"; done
(cd "$W/runs" && tar czf "$OUT/runs.tgz" --exclude='*.pt' --exclude='*.onnx' .)
ls -la "$OUT"
