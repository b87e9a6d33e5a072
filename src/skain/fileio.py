"""Files written whole: a temporary file in the same folder, fsync, then a rename over the target (standard
library only, so light commands such as `skain download` use it without importing torch)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over the target.

    The result gets the mode a plain `open(path, "w")` would give: an existing file's own mode, else
    0666 minus the umask (0644 by default), so a model written by one user can be served by another."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask is set-and-return)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_json(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda fh: fh.write((json.dumps(obj, indent=2, allow_nan=True) + "\n").encode("utf-8")))
