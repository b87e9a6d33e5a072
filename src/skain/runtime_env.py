"""Process set-up before the first tensor: a memory allocator that keeps large buffers between steps.

Why: glibc's malloc serves every block above its mmap threshold (128 KiB, raised on the fly to at most 32 MiB)
with a fresh mmap and gives it back with munmap on free. A CPU training step at batch 32 and 224 px allocates
activations and gradients of 25-100 MiB each, so every step maps them, page-faults them in page by page and
unmaps them again: on 2 cores 20-38% of the CPU time went to the kernel (munmap, page faults). Measured in
benchmarks/speed/kernel_time.py.

What `prepare_process()` does, once, first thing in `skain` (console script, `python -m skain`, root scripts):

- ``SKAIN_ALLOCATOR=auto`` (default) = ``glibc``: no re-exec; ``mallopt`` raises the mmap threshold and the
  trim threshold so freed activations stay in the heap and are reused by the next step (within 2-3% of tcmalloc
  in benchmarks/speed/kernel_time.py).
- ``tcmalloc``: opt-in; re-executes the process once with tcmalloc preloaded when the system has it
  (Debian/Ubuntu: ``apt-get install libtcmalloc-minimal4``), else tuned glibc with a warning. Not the default:
  OpenVINO (``--precision fast``, ``--backend openvino``) aborts in ``compile_model`` under a preloaded tcmalloc
  (seen 2026-11-26 with OpenVINO's ensemble graph), and a crash in the fast path costs more than 2%.
- ``system``: changes nothing.

``python -m skain.runtime_env CMD [ARGS...]`` runs another command (the test suite) with the same allocator,
passed through the environment so its subprocesses get it too.
"""
from __future__ import annotations

import ctypes
import glob
import logging
import os
import platform
import sys
from pathlib import Path

log = logging.getLogger(__name__)

MODE_VAR = "SKAIN_ALLOCATOR"
MODES = ("auto", "tcmalloc", "glibc", "system")
REEXEC_VAR = "_SKAIN_ALLOCATOR_REEXEC"  # pid of the process that re-executed itself (exec keeps the pid)
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
            "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")
ALTERNATIVE_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")

# glibc mallopt parameters (malloc.h) and the values set: blocks up to 1 GiB come from the heap, and up to 2 GiB
# of free heap is kept instead of trimmed (mallopt takes an int). The environment form is glibc's own.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1
OLD_GLIBC_MMAP_CAP = 32 << 20  # glibc before 2.35 refuses thresholds above HEAP_MAX_SIZE / 2
GLIBC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
# tcmalloc prints a line for every block above 1 GiB unless told otherwise
TCMALLOC_ENV = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def allocator_mode(environ: dict | None = None) -> str:
    value = (environ if environ is not None else os.environ).get(MODE_VAR, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_VAR}={value!r} is not a known allocator setting; choose one of {', '.join(MODES)}")
    return value


def find_tcmalloc(dirs: tuple[str, ...] = LIB_DIRS) -> str | None:
    """Path of a tcmalloc shared library installed on this system, or None."""
    multiarch = getattr(sys.implementation, "_multiarch", None)
    search = ((f"/usr/lib/{multiarch}",) if multiarch else ()) + tuple(dirs)
    for name in TCMALLOC_NAMES:
        for folder in search:
            hits = sorted(glob.glob(os.path.join(folder, name)))
            if hits:
                return hits[0]
    return None


def loaded_allocator(maps: str | Path = "/proc/self/maps") -> str | None:
    """'tcmalloc', 'jemalloc' or 'mimalloc' when one is already mapped into this process (preloaded)."""
    try:
        text = Path(maps).read_text(errors="replace")
    except OSError:
        return None
    for name in ALTERNATIVE_ALLOCATORS:
        if f"lib{name}" in text:
            return name
    return None


def is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def tune_glibc() -> bool:
    """Keep large freed blocks in glibc's heap for reuse; True when glibc accepted the settings."""
    if not is_glibc():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) or libc.mallopt(M_MMAP_THRESHOLD, OLD_GLIBC_MMAP_CAP)
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mmap_ok and trim_ok)


def preload_env(lib: str, environ: dict | None = None) -> dict:
    """A copy of the environment with `lib` first in LD_PRELOAD (kept once) and tcmalloc's report line off."""
    env = dict(os.environ if environ is None else environ)
    rest = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p and p != lib]
    env["LD_PRELOAD"] = " ".join([lib, *rest])
    for key, value in TCMALLOC_ENV.items():
        env.setdefault(key, value)
    return env


def child_env(environ: dict | None = None) -> tuple[dict, str]:
    """The environment that gives another process the allocator `prepare_process` would pick -> (env, name)."""
    env = dict(os.environ if environ is None else environ)
    mode = allocator_mode(env)
    lib = find_tcmalloc() if mode == "tcmalloc" and sys.platform.startswith("linux") else None
    if lib:
        return preload_env(lib, env), "tcmalloc"
    if mode != "system" and is_glibc():
        return {**GLIBC_ENV, **env}, "glibc"
    return env, "system"


def prepare_process(reexec: bool = True) -> str:
    """Give this process the allocator chosen by SKAIN_ALLOCATOR; returns the one in use.

    With `reexec` and tcmalloc installed, this does not return: the process restarts itself (same pid,
    arguments and environment plus LD_PRELOAD) before anything large is allocated. Call it before importing
    torch; it imports only the standard library.
    """
    mode = allocator_mode()
    if mode == "system" or not sys.platform.startswith("linux"):
        return "system"
    loaded = loaded_allocator()
    if loaded:
        return loaded
    if mode == "tcmalloc" and reexec and os.environ.get(REEXEC_VAR) != str(os.getpid()):
        lib = find_tcmalloc()
        if lib:
            _reexec(preload_env(lib))
    if mode == "tcmalloc":
        log.warning("SKAIN_ALLOCATOR=tcmalloc but tcmalloc is %s; using tuned glibc malloc (Debian/Ubuntu: "
                    "apt-get install libtcmalloc-minimal4)", "not loaded" if find_tcmalloc() else "not installed")
    return "glibc" if tune_glibc() else "system"


def _reexec(env: dict) -> None:
    env[REEXEC_VAR] = str(os.getpid())
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError as exc:  # e.g. the interpreter is gone; carry on without tcmalloc
        log.warning("could not restart with tcmalloc (%s); using tuned glibc malloc", exc)


def main(argv: list[str] | None = None) -> int:
    """`python -m skain.runtime_env CMD [ARGS...]`: run CMD with the allocator skain would use."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        env, name = child_env()
        print(f"usage: python -m skain.runtime_env CMD [ARGS...]\nallocator here: {name}"
              + (f" ({env['LD_PRELOAD'].split()[0]})" if name == "tcmalloc" else ""))
        return 0 if args else 2
    try:
        env, _ = child_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    try:
        os.execvpe(args[0], args, env)
    except OSError as exc:
        print(f"error: cannot run {args[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    raise SystemExit(main())
