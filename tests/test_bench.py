"""The benchmarks run and report figures that agree with each other: how fast the machine is is not
asserted (speed lives in benchmarks, not tests), only what a broken benchmark would get wrong."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from microturn.model.config import preset
from microturn.model.params import flops_per_turn

SCRIPT = Path(sys.executable).parent / "microturn"
MAX_SESSIONS = 2
# one row of `bench engine`'s table: sessions, batched p50, batched p99, one-by-one p99 (or -), stages
ENGINE_ROW = re.compile(r"\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+|-)\s+(.*)")
TABLE_MS = 0.05 + 1e-9  # the table prints milliseconds to 0.1


def _run(args: list[str]) -> list[str]:
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) >= 3, done.stdout  # a human table before the JSON line
    return lines


def _json_last_line(args: list[str]) -> dict:
    return json.loads(_run(args)[-1])


def _held(rows: list[dict], key: str, budget: float) -> int:
    """The session count a sweep must report from its table: every count measured under the budget is
    at most it, every count over the budget above it (p99s within the table's rounding say nothing)."""
    under = [r["sessions"] for r in rows if r[key] is not None and r[key] < budget - TABLE_MS]
    over = [r["sessions"] for r in rows if r[key] is not None and r[key] > budget + TABLE_MS]
    held = max(under, default=0)
    assert all(n > held for n in over), (key, rows)
    return held


def test_bench_engine_json_agrees_with_its_table_and_its_arithmetic() -> None:
    lines = _run(["bench", "engine", "--preset", "tiny", "--seconds", "0.2", "--max-sessions",
                  str(MAX_SESSIONS), "--device", "cpu"])
    result = json.loads(lines[-1])
    assert result["device"] == "cpu" and result["preset"] == "tiny"
    assert f"budget p99 < {result['budget_ms']} ms" in lines[0]
    rows = []
    for line in lines[2:-1]:
        m = ENGINE_ROW.fullmatch(line)
        assert m, line
        stages = dict(kv.split("=") for kv in m[5].split())
        rows.append({"sessions": int(m[1]), "p50": float(m[2]), "p99": float(m[3]),
                     "one_p99": None if m[4] == "-" else float(m[4]),
                     "stages": {k: float(v) for k, v in stages.items()}})
    sessions = [r["sessions"] for r in rows]
    assert sessions == sorted(set(sessions)) and sessions[0] == 1 and sessions[-1] <= MAX_SESSIONS, sessions
    for r in rows:
        assert r["p50"] <= r["p99"], r
        assert set(r["stages"]) == {"prepare", "dmel", "model", "vocoder"}, r

    # the capacity figures are the ones the table's p99s give against the budget
    budget = result["budget_ms"]
    held = result["sessions_realtime"]
    if all(abs(r["p99"] - budget) > TABLE_MS for r in rows):
        assert held == _held(rows, "p99", budget)
    if all(r["one_p99"] is None or abs(r["one_p99"] - budget) > TABLE_MS for r in rows):
        assert result["one_at_a_time_sessions"] == _held(rows, "one_p99", budget)
    one_held = result["one_at_a_time_sessions"]
    assert result["batch_speedup"] == (round(held / one_held, 2) if one_held else None)

    # the reported tick is the table's row of the sessions held (the first row when none is)
    best = next(r for r in rows if r["sessions"] == max(held, 1))
    assert result["tick_ms_p50"] == pytest.approx(best["p50"], abs=TABLE_MS)
    assert result["tick_ms_p99"] == pytest.approx(best["p99"], abs=TABLE_MS)
    for name, ms in result["stages_ms_p50"].items():
        assert ms == pytest.approx(best["stages"][name], abs=TABLE_MS), name
    # one step's stages are parts of that step
    assert sum(result["stages_ms_p50"].values()) <= result["tick_ms_p99"]

    # model_gflops: the model's FLOPs per micro-turn for those sessions over the median tick
    flops = flops_per_turn(preset("tiny")) * best["sessions"] / (result["tick_ms_p50"] / 1e3)
    assert result["model_gflops"] == pytest.approx(flops / 1e9, rel=1e-3, abs=0.006)
    assert result["peak_gflops"] > 0
    assert result["mfu"] == pytest.approx(result["model_gflops"] / result["peak_gflops"], rel=5e-3, abs=1e-4)


def test_bench_background_reports() -> None:
    result = _json_last_line(["bench", "background", "--sessions", "1", "--tasks", "2", "--seconds", "1",
                              "--device", "cpu"])
    assert result["tasks"] == 2 and result["task_deltas"] > 0
    assert result["tick_ms_p99_base"] > 0 and result["tick_ms_p99_tasks"] > 0


def test_bench_server_reports_both_capacities_and_their_ratio() -> None:
    """Short levels, capped at MAX_SESSIONS: the figures must be consistent with the levels it ran."""
    lines = _run(["bench", "server", "--engine-seconds", "0.5", "--duration", "2", "--ramp", "0.2",
                  "--max-sessions", str(MAX_SESSIONS), "--device", "cpu"])
    result = json.loads(lines[-1])
    engine, server = result["engine_sessions"], result["server_sessions"]
    assert 0 <= engine <= MAX_SESSIONS
    levels = {level["sessions"]: level for level in result["levels"]}
    assert levels, "no load level ran"
    passing = [n for n, level in levels.items() if level["goodput"] >= result["goodput_target"]]
    assert server == max(passing, default=0)
    assert all(n > server for n in levels if n not in passing)  # nothing passed above a failure
    if engine:
        assert result["ratio"] == round(server / engine, 3)
    if server:
        assert result["tick_ms_p50"] == levels[server]["server_tick_ms_p50"]
        assert result["first_audio_ms_p95"] == levels[server]["first_audio_ms_p95"]


def test_bench_renders_reports_every_speech_source_as_its_table_does() -> None:
    done = subprocess.run([sys.executable, "-m", "microturn.benchmarks.renders", "--utterances", "3",
                           "--batches", "2", "--curriculum", "hear-people"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert set(report["sources"]) == {"espeak-ng", "festival english", "festival accented", "change gender"}
    for name, row in report["sources"].items():
        assert 0 < row["ms_p50"] <= row["ms_p90"] and row["realtime_factor"] > 0
        assert any(line.startswith(name) and f"{row['ms_p50']}" in line for line in lines[:-1]), name
    assert report["batch_s_first"] > 0 and report["batch_s_p50_after_first"] > 0
    bad = subprocess.run([sys.executable, "-m", "microturn.benchmarks.renders", "--utterances", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "at least 1" in bad.stderr
