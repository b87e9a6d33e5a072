"""benchmarks/speed/web_load.py's results file: each run adds its figures under its own key and keeps the rest."""
from __future__ import annotations

import json

from benchmarks.speed.web_load import record_run


def test_each_run_is_added_under_its_own_key_and_earlier_runs_stay(tmp_path):
    out = tmp_path / "results" / "web_load.json"
    record_run(out, "fast c8", {"p50_ms": 828.0})
    record_run(out, "fp32 c8", {"p50_ms": 2763.0})
    record_run(out, "fast c8", {"p50_ms": 800.0})          # the same setting again replaces only its own entry
    assert json.loads(out.read_text()) == {"fast c8": {"p50_ms": 800.0}, "fp32 c8": {"p50_ms": 2763.0}}
