"""What content-based cache keys cost per image, next to the old path/mtime key and to what a key saves.

    python -m benchmarks.speed.cache_key [--images 500] [--data ../shared/ham10000/images]

Times, per image, on files already in the page cache (what every epoch after the first sees): the old key (stat +
hash of path, size, mtime), the content key with a cold per-process memo (read + sha256 of the file), the same
with a warm memo (stat + dict lookup: later epochs in one process), a cache hit (np.load of the entry) and a
miss (JPEG decode + resize). Prints microseconds per image and the content key's share of a cache hit; writes no
results file (docs/performance.md, "Input pipeline", quotes the printed figures).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.common import DATA_ROOT, best_of
from skain.data.cache import ImageCache
from skain.data.images import ImageLoader, load_resized


def old_key(path: Path, short_side: int) -> str:
    """The v1 key: absolute path, size, mtime and size target."""
    st = os.stat(path)
    raw = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{short_side}|v1"
    return hashlib.sha1(raw.encode()).hexdigest()


def per_image_us(fn, paths: list[Path], repeats: int = 3) -> float:
    """Microseconds per image of fn over all paths, best of `repeats` passes."""
    def one_pass() -> None:
        for p in paths:
            fn(p)
    return best_of(one_pass, repeats) / len(paths) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA_ROOT / "images"))
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--size", type=int, default=256, help="resize target (cpu preset: 256)")
    args = ap.parse_args()
    paths = sorted(Path(args.data).glob("*.jpg"))[:args.images]
    if not paths:
        raise SystemExit(f"no JPEGs in {args.data}")
    for p in paths:
        p.read_bytes()  # into the page cache
    with tempfile.TemporaryDirectory() as tmp:
        cold = lambda p: ImageCache(tmp).key(p, args.size)  # noqa: E731 - a fresh memo each call
        warm_cache = ImageCache(tmp)
        loader = ImageLoader(args.size, tmp)
        for p in paths:
            loader(p)  # fills the cache (and the loader's memo)
        rows = {
            "old key (stat + path hash)": per_image_us(lambda p: old_key(p, args.size), paths),
            "content key, cold memo (read + sha256)": per_image_us(cold, paths),
            "content key, warm memo (stat + lookup)": per_image_us(lambda p: warm_cache.key(p, args.size), paths),
            "cache hit (content key + np.load)": per_image_us(loader, paths),
            "miss (decode + resize)": per_image_us(lambda p: load_resized(p, args.size), paths[:100], 1),
        }
    size_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
    print(f"{len(paths)} images from {args.data} (mean {size_kb:.0f} kB), resize {args.size}")
    for name, us in rows.items():
        print(f"  {name:42s} {us:9.1f} us/image")
    extra = rows["content key, cold memo (read + sha256)"] - rows["old key (stat + path hash)"]
    print(f"content key costs {extra:.1f} us/image more than the old key when cold "
          f"({extra / rows['cache hit (content key + np.load)'] * 100:.0f}% of a cache hit, "
          f"{extra / rows['miss (decode + resize)'] * 100:.1f}% of a miss)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
