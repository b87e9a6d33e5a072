#!/usr/bin/env bash
# The 5 folds of the cross-validation at once on one GPU (no trust fitting: measured separately), then the
# out-of-fold report. Reuses /tmp/skain from run.sh on a warm machine, else unpacks .gpu/ again.
set -u
OUT=${OUT:-/tmp/skain-out}; W=/tmp/skain; G=${G:-.gpu}; MIN=${MIN:-1.5}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
if [ ! -d "$W/cache" ]; then
  mkdir -p "$W/images"
  G=$G python3 - <<'PY'
import io, os, zipfile, torch
from concurrent.futures import ProcessPoolExecutor
from PIL import Image
from skain.data.images import ImageLoader
def to_png(item):
    name, data = item
    path = f"/tmp/skain/images/{name[:-5]}.png"
    Image.open(io.BytesIO(data)).convert("RGB").save(path, compress_level=1)
    ImageLoader(256, "/tmp/skain/cache")(path)
with zipfile.ZipFile(os.environ["G"] + "/images.zip") as z:
    items = [(n, z.read(n)) for n in z.namelist()]
with ProcessPoolExecutor(16) as pool:
    list(pool.map(to_png, items, chunksize=64))
sd = torch.load(os.environ["G"] + "/tf_efficientnet_lite0_fp16.pt", weights_only=True)
torch.save({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, "/tmp/skain/lite0.pt")
PY
fi
for k in 0 1 2 3 4; do
  timeout 175 python3 -m skain train --csv "$G/HAM10000_metadata.csv" --images "$W/images" --preset cpu \
    --pretrained-file "$W/lite0.pt" --cache-dir "$W/cache" --no-progress --epochs 30 --patience 8 --overwrite \
    --holdout --fold $k --no-trust --max-minutes "$MIN" --workers 3 --output "$W/cvp/fold$k" >"$W/cvp$k.log" 2>&1 &
done
wait
python3 -c "from pathlib import Path; from skain.training.crossval import write_report; write_report(Path('$W/cvp'), 5)" 2>&1 | tail -n 3
for k in 0 1 2 3 4; do grep -v "Warn\|warn" "$W/cvp$k.log" | grep "epoch\|test fold" | tail -n 3; done
cp "$W"/cvp*.log "$W/cvp/" 2>/dev/null
(cd "$W" && tar czf "$OUT/cvp.tgz" --exclude='*.pt' cvp)
ls -la "$OUT"
