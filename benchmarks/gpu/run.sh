#!/usr/bin/env bash
# One call on a lent GPU machine (16 cores, one H100/H200, no internet), from the repository root, with
# `.gpu/` made by benchmarks/gpu/pack.py carried along. Four trainings of the `cpu` recipe run at once:
#   cv      5-fold cross-validation, each fold's test set choosing nothing   (--all-folds)
#   img0    the image-only ablation on fold 0 of the same split             (--holdout --image-only)
#   nodrop0 fold 0 without metadata dropout, to measure what dropout does    (--holdout --meta-dropout 0)
#   final   the model skAIn ships: 90% train / 10% validation               (--folds 10 --fold 0)
# --max-minutes makes each cosine schedule follow the clock, so every run ends annealed in its budget.
set -u
OUT=${OUT:-/tmp/skain-out}
W=/tmp/skain
G=${G:-.gpu}
JOBS=${JOBS:-16}
WK=${WK:-}   # set WK=0 for a dry run on a small CPU machine (workers per run otherwise 6/3/3/4)
CV_MIN=${CV_MIN:-0.75}
FINAL_MIN=${FINAL_MIN:-4}
mkdir -p "$W/images" "$W/runs" "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, PIL; print('torch', torch.__version__, 'timm', timm.__version__, 'pillow', PIL.__version__, torch.cuda.get_device_name())"
G=$G JOBS=$JOBS python3 - <<'PY'
import io, os, time, zipfile
from concurrent.futures import ProcessPoolExecutor
from PIL import Image
import torch
t = time.time()
def to_png(item):
    name, data = item
    Image.open(io.BytesIO(data)).convert("RGB").save(f"/tmp/skain/images/{name[:-5]}.png", compress_level=1)
with zipfile.ZipFile(os.environ["G"] + "/images.zip") as z:
    items = [(name, z.read(name)) for name in z.namelist()]
with ProcessPoolExecutor(int(os.environ["JOBS"])) as pool:
    list(pool.map(to_png, items, chunksize=64))
sd = torch.load(os.environ["G"] + "/tf_efficientnet_lite0_fp16.pt", weights_only=True)
torch.save({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, "/tmp/skain/lite0.pt")
print(f"unpacked {len(items)} images in {time.time() - t:.1f} s")
PY
common=(--csv "$G/HAM10000_metadata.csv" --images "$W/images" --preset cpu --pretrained-file "$W/lite0.pt"
        --cache-dir "$W/cache" --no-progress --epochs 30 --patience 8 --overwrite)
# fill the image cache once (skAIn's own ImageLoader, resize 256 for Lite0 @ 224), so the four runs do not
# all decode the same files
JOBS=$JOBS python3 - <<'PY'
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from skain.data.images import ImageLoader
loader = ImageLoader(256, "/tmp/skain/cache")
with ProcessPoolExecutor(int(os.environ["JOBS"])) as pool:
    list(pool.map(loader, sorted(Path("/tmp/skain/images").glob("*.png")), chunksize=64))
PY
echo "cache warm: $(ls "$W/cache" | wc -l) entries"
start=$(date +%s)
timeout 480 python3 -m skain train "${common[@]}" --all-folds --folds 5 --max-minutes "$CV_MIN" --workers "${WK:-6}" \
  --output "$W/runs/cv" >"$W/runs/cv.log" 2>&1 &
timeout 480 python3 -m skain train "${common[@]}" --holdout --fold 0 --image-only --max-minutes "$CV_MIN" \
  --workers "${WK:-3}" --output "$W/runs/img0" >"$W/runs/img0.log" 2>&1 &
timeout 480 python3 -m skain train "${common[@]}" --holdout --fold 0 --meta-dropout 0 --max-minutes "$CV_MIN" \
  --workers "${WK:-3}" --output "$W/runs/nodrop0" >"$W/runs/nodrop0.log" 2>&1 &
timeout 480 python3 -m skain train "${common[@]}" --folds 10 --fold 0 --max-minutes "$FINAL_MIN" --workers "${WK:-4}" \
  --output "$W/runs/final" >"$W/runs/final.log" 2>&1 &
while [ "$(jobs -r | wc -l)" -gt 0 ]; do
  sleep 20; echo "$(( $(date +%s) - start )) s: $(grep -h 'epoch\|cross-validated' "$W"/runs/*.log | grep -c 'img/s') epochs done"
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
done
wait
echo "all runs ended after $(( $(date +%s) - start )) s"
for f in "$W"/runs/*.log; do echo "== $f"; grep -v "Warning\|warnings.warn" "$f" | tail -4; done
(cd "$W/runs" && tar czf "$OUT/runs.tgz" --exclude='*.pt' --exclude='warm' .)
[ -f "$W/runs/final/best_model.pt" ] && split -b 15m "$W/runs/final/best_model.pt" "$OUT/final_best_model.pt.part-"
ls -la "$OUT"
