"""The allocator set-up that `skain` does first (skain.runtime_env): which allocator, once, and how to opt out."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from skain import runtime_env
from skain.runtime_env import (
    allocator_mode,
    child_env,
    find_tcmalloc,
    loaded_allocator,
    preload_env,
)

SRC = str(Path(runtime_env.__file__).resolve().parents[1])
LINUX_GLIBC = runtime_env.is_glibc()

# A child that reports what it ended up with: the allocator mapped into it, glibc's thresholds, its pid.
PROBE = r"""
import json, os, sys
from skain.runtime_env import prepare_process, loaded_allocator
pid = os.getpid()
used = prepare_process()
import ctypes
libc = ctypes.CDLL("libc.so.6"); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]
p = libc.malloc(64 << 20)          # above glibc's largest automatic mmap threshold (32 MiB)
heap = [l.split()[0].split("-") for l in open("/proc/self/maps") if l.rstrip().endswith("[heap]")]
in_heap = any(int(lo, 16) <= p < int(hi, 16) for lo, hi in heap)
libc.free(p)
print(json.dumps({"used": used, "loaded": loaded_allocator(), "pid": pid, "final_pid": os.getpid(),
                  "argv": sys.argv[1:], "own_mapping": not in_heap,
                  "preload": os.environ.get("LD_PRELOAD", "")}))
"""


def run_probe(tmp_path: Path, allocator: str | None, *args: str) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", runtime_env.REEXEC_VAR, runtime_env.MODE_VAR)
           and not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = SRC
    if allocator is not None:
        env[runtime_env.MODE_VAR] = allocator
    out = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_mode_defaults_to_auto_and_rejects_unknown_values():
    assert allocator_mode({}) == "auto"
    assert allocator_mode({"SKAIN_ALLOCATOR": " System "}) == "system"
    with pytest.raises(ValueError, match="SKAIN_ALLOCATOR='jemaloc'.*auto, tcmalloc, glibc, system"):
        allocator_mode({"SKAIN_ALLOCATOR": "jemaloc"})


def test_find_tcmalloc_looks_in_library_folders(tmp_path):
    assert find_tcmalloc((str(tmp_path),)) in (None, find_tcmalloc())  # nothing in an empty folder
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    found = find_tcmalloc((str(tmp_path),))
    assert found is not None and found.endswith("libtcmalloc_minimal.so.4")


def test_loaded_allocator_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n")
    assert loaded_allocator(maps) == "tcmalloc"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert loaded_allocator(maps) is None
    assert loaded_allocator(tmp_path / "absent") is None


def test_preload_env_puts_the_library_first_once():
    env = preload_env("/lib/libtcmalloc.so", {"LD_PRELOAD": "/lib/libother.so /lib/libtcmalloc.so"})
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc.so /lib/libother.so"
    assert "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" in env


def test_child_env_system_changes_nothing():
    env, name = child_env({"SKAIN_ALLOCATOR": "system", "PATH": "/bin"})
    assert name == "system" and env == {"SKAIN_ALLOCATOR": "system", "PATH": "/bin"}


@pytest.mark.skipif(not LINUX_GLIBC, reason="glibc malloc tuning applies to Linux with glibc only")
def test_child_env_without_tcmalloc_tunes_glibc(monkeypatch):
    monkeypatch.setattr(runtime_env, "find_tcmalloc", lambda *a: None)
    env, name = child_env({"PATH": "/bin"})
    assert name == "glibc" and env["MALLOC_MMAP_THRESHOLD_"] == str(runtime_env.MMAP_THRESHOLD)


@pytest.mark.skipif(not LINUX_GLIBC, reason="glibc malloc tuning applies to Linux with glibc only")
def test_system_allocator_maps_large_blocks_afresh(tmp_path):
    """The cause: untuned glibc serves a 64 MiB block with its own mmap (freed with munmap every time)."""
    got = run_probe(tmp_path, "system")
    assert got["used"] == "system" and got["own_mapping"]


@pytest.mark.skipif(not LINUX_GLIBC, reason="glibc malloc tuning applies to Linux with glibc only")
def test_glibc_mode_keeps_large_blocks_in_the_heap(tmp_path):
    got = run_probe(tmp_path, "glibc")
    assert got["used"] == "glibc" and got["loaded"] is None
    assert not got["own_mapping"], "a 64 MiB block still got its own mmap after mallopt"


@pytest.mark.skipif(not LINUX_GLIBC or find_tcmalloc() is None,
                    reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
def test_tcmalloc_mode_restarts_once_keeping_pid_and_arguments(tmp_path):
    got = run_probe(tmp_path, "tcmalloc", "--flag", "two words")
    assert got["used"] == got["loaded"] == "tcmalloc"
    assert got["pid"] == got["final_pid"] and got["argv"] == ["--flag", "two words"]
    assert got["preload"].split()[0] == find_tcmalloc()


@pytest.mark.skipif(not LINUX_GLIBC, reason="glibc malloc tuning applies to Linux with glibc only")
def test_no_second_restart_after_one_that_did_not_load_tcmalloc(monkeypatch):
    def execve(*args):
        raise AssertionError("restarted a second time")
    monkeypatch.setattr(runtime_env.os, "execve", execve)
    monkeypatch.setenv(runtime_env.MODE_VAR, "tcmalloc")
    monkeypatch.setenv(runtime_env.REEXEC_VAR, str(os.getpid()))  # this process has restarted once already
    assert runtime_env.prepare_process() in ("glibc", *runtime_env.ALTERNATIVE_ALLOCATORS)


def test_python_m_skain_reports_a_bad_setting(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC, runtime_env.MODE_VAR: "bogus"}
    out = subprocess.run([sys.executable, "-m", "skain", "--help"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "SKAIN_ALLOCATOR='bogus'" in out.stderr


def test_runtime_env_runs_a_command_with_the_allocator(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(PYTHONPATH=SRC, SKAIN_ALLOCATOR="auto")
    code = "import os; print(os.environ.get('LD_PRELOAD', ''), os.environ.get('MALLOC_MMAP_THRESHOLD_', ''))"
    out = subprocess.run([sys.executable, "-m", "skain.runtime_env", sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    expected = str(runtime_env.MMAP_THRESHOLD) if LINUX_GLIBC else ""
    assert expected in out.stdout and "tcmalloc" not in out.stdout  # auto = tuned glibc (OpenVINO aborts under tcmalloc)


@pytest.mark.skipif(not LINUX_GLIBC, reason="glibc malloc tuning applies to Linux with glibc only")
def test_default_tunes_glibc_and_never_preloads_tcmalloc(tmp_path):
    """OpenVINO's compile_model aborted under a preloaded tcmalloc: the default must stay in-process glibc."""
    got = run_probe(tmp_path, None)
    assert got["used"] == "glibc" and got["loaded"] is None and not got["own_mapping"]
