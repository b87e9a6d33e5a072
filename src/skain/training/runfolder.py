"""The run folder: the names of the files a run writes (spelled here only), the lock against two runs in one
folder, writing the run's tables, run fingerprints so `--resume` continues only the same run, and `--overwrite`
clearing an old run's files.

last.pt carries three fingerprints: the resolved configuration (only the settings that change what is
trained), the validated data table (image ids, labels, lesion ids, metadata and every image file's content)
and the split (which image is on which side). A resume recomputes them before anything is loaded or written
and refuses, naming what differs, so another --seed, --fold or edited data can never move trained lesions into
validation. Fingerprints are plain lists, strings and numbers: last.pt still loads with weights_only=True.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from skain.data.schema import CLASSES, META_COLUMNS, DataError
from skain.data.split import split_table
from skain.fileio import atomic_json, atomic_write
from skain.modelfile.bundle import BUNDLE_NAME
from skain.training.config import Config
from skain.training.loaders import Prepared

log = logging.getLogger(__name__)
VERSION = 1
KEY = "run_id"  # where the fingerprints live in last.pt

# Settings that do not change what is trained: where files are, how fast and how visibly it runs, and the
# stopping rules a resumed run may extend (--epochs, --patience, --max-minutes). Everything else counts,
# including settings added later (safer to refuse than to mix two runs).
NOT_IDENTITY = frozenset({
    "data.data", "data.csv", "data.images", "data.skip_missing", "data.cache_dir", "data.num_workers",
    "train.output", "train.resume", "train.overwrite", "train.progress", "train.max_minutes", "train.epochs",
    "train.patience", "train.compile", "train.amp", "train.channels_last",
    "train.test_tta", "train.fit_trust"})  # scoring and trust fitting after training, not the training itself
ROW_COLUMNS = ("lesion_id", *META_COLUMNS)  # with dx (kept apart so a changed label is named as such)
SHOW = 3  # example ids named in a message

# --overwrite removes exactly these names (files a training, `skain calibrate` or `skain export` writes into
# the output folder), their leftover atomic-write temporaries, the report folder's files and fold subfolders.
# the files a run folder holds, named here only
LAST_NAME, METRICS_NAME, HISTORY_NAME, SPLIT_NAME = "last.pt", "metrics.json", "train_history.csv", "split.csv"
CONFIG_NAME, LABEL_MAP_NAME, VOCABULARIES_NAME, AGE_STATS_NAME = ("config.json", "label_map.json", "vocabularies.json",
                                                                  "age_stats.json")
TEST_PREDICTIONS, VAL_PREDICTIONS, OOF_NAME = "test_predictions.csv", "val_predictions.csv", "oof_predictions.csv"
CV_REPORT_NAME, TEST_LOGITS, LOCK_NAME = "cv_report.json", "test_logits.npz", ".skain-train.lock"
RUN_FILES = (LAST_NAME, BUNDLE_NAME, "best_model.onnx", METRICS_NAME, HISTORY_NAME, SPLIT_NAME, CONFIG_NAME,
             LABEL_MAP_NAME, VOCABULARIES_NAME, AGE_STATS_NAME, "model_card.md", "reliability.png", TEST_PREDICTIONS,
             VAL_PREDICTIONS, OOF_NAME, CV_REPORT_NAME, TEST_LOGITS)
REPORT_DIR, REPORT_FILES = "report", ("report.md", "metrics.json", "confusion_matrix.png", "roc_curves.png")
FOLD_DIR = re.compile(r"fold[-_]?\d+")


# ----------------------------------------------------------------------------- fingerprints
def _digest(obj: Any, size: int = 16) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=size).hexdigest()


def config_values(cfg: Config) -> dict[str, Any]:
    """The settings that define the run, as JSON-plain values keyed 'section.field'."""
    values = {f"{section}.{k}": v for section in ("data", "model", "train")
              for k, v in asdict(getattr(cfg, section)).items() if f"{section}.{k}" not in NOT_IDENTITY}
    return json.loads(json.dumps(values, default=str))


def _file_digest(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return hashlib.blake2b(fh.read(), digest_size=8).hexdigest()
    except OSError as exc:  # reported properly when the images are checked
        return f"unreadable ({exc.strerror or exc})"


def data_fingerprint(frame: pd.DataFrame) -> dict[str, Any]:
    """Per image (sorted by id): label, a hash of lesion id + metadata, a hash of the file's bytes.

    Content rather than size/mtime: a copied or moved dataset is the same data; paths never count.
    """
    frame = frame.sort_values("image_id", kind="stable")
    cols = [c for c in ROW_COLUMNS if c in frame.columns]
    rows = [_digest([str(v) for v in row], 8) for row in frame[cols].itertuples(index=False, name=None)]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # hashing releases the GIL
        files = list(pool.map(_file_digest, frame["path"].tolist()))
    fp = {"ids": frame["image_id"].astype(str).tolist(), "labels": frame["dx"].astype(str).tolist(),
          "rows": rows, "files": files}
    return {**fp, "digest": _digest(fp)}


def split_fingerprint(frame: pd.DataFrame, parts: Mapping[str, Sequence[int] | np.ndarray]) -> dict[str, Any]:
    """The sorted image ids of each part ('train', 'val', ...), given positional indices into `frame`."""
    ids = frame["image_id"].astype(str).to_numpy()
    sides = {name: sorted(ids[np.asarray(idx, dtype=int)].tolist()) for name, idx in parts.items()}
    return {"parts": sides, "digest": _digest(sides)}


def fingerprints(cfg: Config, frame: pd.DataFrame, parts: Mapping[str, Sequence[int] | np.ndarray]) -> dict[str, Any]:
    """Everything `compare` needs, stored in last.pt under KEY."""
    values = config_values(cfg)
    return {"version": VERSION, "config": {"values": values, "digest": _digest(values)},
            "data": data_fingerprint(frame), "split": split_fingerprint(frame, parts)}


# ----------------------------------------------------------------------------- comparison
def compare(old: dict, new: dict) -> list[str]:
    """What differs between a stored run and this one, in words; empty when it is the same run."""
    if old.get("version") != new.get("version"):
        return [f"fingerprint format {old.get('version')} -> {new.get('version')} (another skAIn version)"]
    diffs = [] if old["config"]["digest"] == new["config"]["digest"] else \
        config_differences(old["config"]["values"], new["config"]["values"])
    if old["data"]["digest"] != new["data"]["digest"]:
        diffs += data_differences(old["data"], new["data"]) or ["data differs"]
    if old["split"]["digest"] != new["split"]["digest"]:
        moved = split_differences(old["split"]["parts"], new["split"]["parts"])
        diffs += [moved] if moved else [] if diffs else ["split differs"]
    return diffs


_MISSING = object()


def _fmt(value: Any) -> str:
    return "(not recorded)" if value is _MISSING else json.dumps(value)


def config_differences(old: dict, new: dict) -> list[str]:
    """'seed 42 -> 7' for each setting that changed; a setting unknown to the old run counts unless default."""
    defaults = config_values(Config())
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a is _MISSING and b == defaults.get(key, _MISSING):
            continue
        if a != b:
            out.append(f"{key.split('.', 1)[1]} {_fmt(a)} -> {_fmt(b)}")
    return out


def _table(fp: dict) -> dict[str, tuple[str, str, str]]:
    return dict(zip(fp["ids"], zip(fp["labels"], fp["rows"], fp["files"])))


def _some(ids: list[str]) -> str:
    return ", ".join(ids[:SHOW]) + (", ..." if len(ids) > SHOW else "")


def data_differences(old: dict, new: dict) -> list[str]:
    """'data: 3 rows added (ISIC_1, ...)', removed rows, changed labels, metadata and image files."""
    a, b = _table(old), _table(new)
    common = sorted(set(a) & set(b))
    groups = [
        ("row(s) added", sorted(set(b) - set(a))),
        ("row(s) removed", sorted(set(a) - set(b))),
        ("label(s) changed", [i for i in common if a[i][0] != b[i][0]]),
        ("row(s) with changed lesion id or metadata", [i for i in common if a[i][1] != b[i][1]]),
        ("image file(s) with different content", [i for i in common if a[i][2] != b[i][2]]),
    ]
    return [f"data: {len(ids)} {what} ({_some(ids)})" for what, ids in groups if ids]


def split_differences(old: dict, new: dict) -> str | None:
    """'split differs: 12 images moved (ISIC_1 train -> val, ...)' for images present in both runs."""
    side_a = {i: part for part, ids in old.items() for i in ids}
    side_b = {i: part for part, ids in new.items() for i in ids}
    moved = sorted(i for i in set(side_a) & set(side_b) if side_a[i] != side_b[i])
    if not moved:
        return None
    shown = ", ".join(f"{i} {side_a[i]} -> {side_b[i]}" for i in moved[:SHOW])
    return f"split differs: {len(moved)} image(s) moved ({shown}{', ...' if len(moved) > SHOW else ''})"


def resume_problem(last: Path, new: dict) -> str | None:
    """Why `last` must not be resumed by the run fingerprinted as `new` (None: resume it, or nothing to resume)."""
    if not last.exists():
        log.info("--resume: no %s yet, so training starts from the beginning", last)
        return None
    try:
        ck = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        return f"cannot resume: {last} is not a readable checkpoint ({exc}); start again with --overwrite"
    old = ck.get(KEY) if isinstance(ck, dict) else None
    if not old:
        return (f"cannot resume: {last} carries no run fingerprints (written by an older skAIn), so nothing shows "
                "it belongs to this configuration, data and split; start again with --overwrite or another --output")
    try:
        diffs = compare(old, new)
    except (KeyError, TypeError, AttributeError) as exc:
        return f"cannot resume: the run fingerprints in {last} are damaged ({exc!r}); start again with --overwrite"
    if not diffs:
        return None
    return (f"cannot resume {last}: this is not the run it saved ({'; '.join(diffs)}). Resume with the original "
            "settings and data, or start a new run with --overwrite or another --output")


# ----------------------------------------------------------------------------- --overwrite
def clear_run(out: Path) -> list[Path]:
    """Remove a previous run's files from `out` (never the folder itself, never any other file); returns them."""
    removed = [p for name in RUN_FILES for p in _remove(out / name)]
    removed += _remove_temporaries(out)
    report = out / REPORT_DIR
    if report.is_dir() and not report.is_symlink():
        removed += [p for name in REPORT_FILES for p in _remove(report / name)]
        _rmdir_if_empty(report)
    for sub in sorted(out.iterdir()):
        if FOLD_DIR.fullmatch(sub.name) and sub.is_dir() and not sub.is_symlink():
            removed += clear_run(sub)
            _rmdir_if_empty(sub)
    if removed:
        log.info("--overwrite: removed %d file(s) of the previous run in %s: %s", len(removed), out,
                 ", ".join(str(p.relative_to(out)) for p in removed))
    return removed


def _remove(path: Path) -> list[Path]:
    """Unlink a file (a symlink itself, not its target); leave a directory with that name alone."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return [path]
    if path.exists():
        log.warning("--overwrite: %s is not a file; left as it is", path)
    return []


def _remove_temporaries(out: Path) -> list[Path]:
    """`.NAME.XXXX.tmp` files an interrupted atomic write of one of RUN_FILES left behind."""
    names = "|".join(re.escape(n) for n in RUN_FILES)
    pattern = re.compile(rf"\.({names})\..+\.tmp")
    stale = [p for p in sorted(out.glob(".*.tmp")) if pattern.fullmatch(p.name)]
    return [removed for p in stale for removed in _remove(p)]


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty: it holds the user's own files
        pass




MIN_FREE_BYTES = 300 * 2**20


def check_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse before any work: unwritable folder, full disk, or someone else's run in the folder."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise DataError(f"output folder {out} is not writable ({exc.strerror or exc}); choose another with --output") from exc
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise DataError(f"only {free / 2**20:.0f} MiB free on the disk of {out}; need at least "
                        f"{MIN_FREE_BYTES / 2**20:.0f} MiB for checkpoints")
    if resume and overwrite:
        raise DataError("--resume continues the run in the output folder and --overwrite replaces it; pass one")
    existing = [n for n in (BUNDLE_NAME, LAST_NAME) if (out / n).exists()]
    if existing and not (resume or overwrite):
        raise DataError(f"{out} already holds a training run ({', '.join(existing)}); pass --resume to continue "
                        "it, --overwrite to replace it, or choose another --output")


class RunLock:
    """A pid file that stops two trainings writing into one folder at the same time."""

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME

    def __enter__(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # umask applies: 0644
        except FileExistsError:
            pid = self._pid()
            if pid and _alive(pid):
                raise DataError(f"another training (pid {pid}) is writing into {self.path.parent}; "
                                "wait for it or choose another --output") from None
            self.path.unlink(missing_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return self

    def _pid(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return pid != os.getpid()
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def write_history(out: Path, history: list) -> None:
    atomic_write(out / HISTORY_NAME, lambda fh: fh.write(pd.DataFrame(history).to_csv(index=False).encode()))


def write_run_files(out: Path, cfg: Config, prep: Prepared, pre: dict) -> None:
    """The seed's side files plus the resolved config and the split, before training starts."""
    atomic_json({c: i for i, c in enumerate(CLASSES)}, out / LABEL_MAP_NAME)
    atomic_json(prep.encoder.vocabularies(), out / VOCABULARIES_NAME)
    atomic_json(prep.encoder.age_stats(), out / AGE_STATS_NAME)
    atomic_json({**cfg.to_dict(), "preprocess": pre}, out / CONFIG_NAME)
    table = split_table(prep.frame, prep.train_idx, prep.val_idx, prep.test_idx)
    atomic_write(out / SPLIT_NAME, lambda fh: fh.write(table.to_csv(index=False).encode()))


def validation_ids(run: str | Path) -> frozenset[str]:
    """The images a finished run folder's split.csv puts in its validation split."""
    split = pd.read_csv(Path(run) / SPLIT_NAME, dtype=str)
    return frozenset(split.loc[split["split"] == "val", "image_id"])


def share_validation(runs: Sequence[str | Path]) -> bool:
    """Every run folder validated on the same images (runs on one split with different seeds or backbones), so
    that split is held out from all of them; the folds of a k-fold run are not."""
    ids = [validation_ids(run) for run in runs]
    return all(v == ids[0] for v in ids[1:])


def save_logits(path: Path, frame: pd.DataFrame, logits: dict[str, np.ndarray]) -> None:
    """image_id, dx and one (n, classes) float32 array per scored variant."""
    import io

    def write(fh) -> None:
        buf = io.BytesIO()
        # the ignore below: numpy's stub has allow_pickle: bool beside **kwds, which mypy says a dict could fill
        np.savez_compressed(buf, image_id=np.asarray(frame["image_id"], dtype=str),
                            dx=np.asarray(frame["dx"], dtype=str),
                            **{k: np.asarray(v, dtype=np.float32) for k, v in logits.items()})  # type: ignore[arg-type]
        fh.write(buf.getvalue())
    atomic_write(path, write)
