"""The benchmarks run and report (their figures are not asserted: speed lives in benchmarks, not tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "microturn"


def _json_last_line(args: list[str]) -> dict:
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) >= 3, done.stdout  # a human table before the JSON line
    return json.loads(lines[-1])


def test_bench_engine_reports() -> None:
    result = _json_last_line(
        ["bench", "engine", "--preset", "tiny", "--seconds", "0.2", "--max-sessions", "2", "--device", "cpu"]
    )
    keys = ("preset", "device", "sessions_realtime", "tick_ms_p50", "tick_ms_p99", "one_at_a_time_sessions",
            "batch_speedup", "model_gflops", "peak_gflops")
    for key in keys:
        assert key in result, key
    assert result["device"] == "cpu" and 0 <= result["sessions_realtime"] <= 2
    assert result["peak_gflops"] > 0 and result["tick_ms_p50"] <= result["tick_ms_p99"]
    assert set(result["stages_ms_p50"]) == {"prepare", "dmel", "model", "vocoder"}


def test_bench_background_reports() -> None:
    result = _json_last_line(["bench", "background", "--sessions", "1", "--tasks", "2", "--seconds", "1",
                              "--device", "cpu"])
    assert result["tasks"] == 2 and result["task_deltas"] > 0
    assert result["tick_ms_p99_base"] > 0 and result["tick_ms_p99_tasks"] > 0
