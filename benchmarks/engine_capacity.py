"""`microturn bench engine`: sessions held in real time by one batched engine.

For 1, 2, 4, 8, ... sessions, steps the engine with real dMel input (espeak-ng
speech, a different offset per session) for `--seconds` of wall time and
records each tick's compute (dMel + model + vocoder). A level holds in real
time when its p99 tick stays under `REALTIME_BUDGET_MS` (150 ms of the 200 ms
micro-turn, leaving room for I/O and jitter). The same sweep is run the way
one-conversation-per-lock servers work: every session stepped alone in turn,
so a tick costs the sum of single-session steps. A matmul measured in the same
run gives the device's peak for the efficiency ratio.

Prints a table, then one JSON object as the last line. Knows nothing about
servers or sockets.
"""

from __future__ import annotations

import argparse
import json
import time
import wave

import numpy as np
import torch

from ..model.engine import Engine, resolve_device, resolve_dtype
from ..model.params import flops_per_turn
from ..model.slots import SAMPLE_RATE, TURN_SAMPLES, SamplingParams, SlotInput
from ..model.transformer import InteractionModel, build_model

REALTIME_BUDGET_MS = 150.0  # p99 compute per 200 ms micro-turn that still counts as real time
MIN_TICKS = 8  # ticks measured per level even when --seconds is short
BISECT_RESOLUTION = 16  # bisection stops within held/16 sessions of the true capacity
SPEECH = (
    "Hello there. Could you tell me what seventeen times twenty three is, and then what colour the sky is?"
)


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def load_speech(path: str | None) -> np.ndarray:
    """16 kHz mono PCM16 WAV (stdlib reader, so the GPU box needs no audio libraries) or espeak-ng speech."""
    if path is None:
        from ..training.espeak import speak

        return speak(SPEECH)
    with wave.open(path, "rb") as w:
        if w.getframerate() != SAMPLE_RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise SystemExit(f"{path}: need 16 kHz mono PCM16")
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Feeder:
    """Real speech, a different offset per session, looped."""

    def __init__(self, speech: np.ndarray) -> None:
        self.speech = np.concatenate([speech, np.zeros(SAMPLE_RATE // 2, np.float32)])

    def chunk(self, session: int, tick: int) -> SlotInput:
        n = len(self.speech) - TURN_SAMPLES
        start = (session * 7919 + tick * TURN_SAMPLES) % n
        return SlotInput(audio=self.speech[start : start + TURN_SAMPLES])


def _percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _measure(tick, seconds: float) -> list[float]:
    tick(-1)  # first tick after a join pays allocation costs; not a steady-state tick
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_TICKS or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        tick(len(times))
        times.append((time.perf_counter() - t) * 1e3)
    return times


def batched_level(engine: Engine, feeder: _Feeder, n: int, seconds: float) -> tuple[list[float], dict]:
    slots = [engine.join("You are a friendly assistant.", SamplingParams(seed=i)) for i in range(n)]
    stages: dict[str, list[float]] = {}

    def tick(t: int) -> None:
        engine.step({s: feeder.chunk(i, t) for i, s in enumerate(slots)})
        for k, v in engine.stage_ms.items():
            stages.setdefault(k, []).append(v)

    try:
        times = _measure(tick, seconds)
    finally:
        for s in slots:
            engine.leave(s)
    return times, {k: float(np.median(v)) for k, v in stages.items()}


def one_at_a_time_level(
    model: InteractionModel, device: str, dtype: torch.dtype, feeder: _Feeder, n: int, seconds: float
) -> list[float]:
    engines = [Engine(model, max_slots=1, device=device, dtype=dtype) for _ in range(n)]
    for e in engines:
        e.warmup()  # same CUDA-graph capture as the batched engine: a fair peer
    slots = [e.join("You are a friendly assistant.", SamplingParams(seed=i)) for i, e in enumerate(engines)]

    def tick(t: int) -> None:
        for i, (e, s) in enumerate(zip(engines, slots, strict=True)):
            e.step({s: feeder.chunk(i, t)})

    return _measure(tick, seconds)


def _sweep(run_level, max_sessions: int) -> tuple[int, list[dict]]:
    """Double the session count until the budget breaks, then bisect between the last two counts."""
    rows: list[dict] = []

    def holds(n: int) -> bool:
        times, stages = run_level(n)
        p50, p99 = _percentiles(times)
        rows.append({"sessions": n, "p50": p50, "p99": p99, "stages": stages})
        return p99 < REALTIME_BUDGET_MS

    held, n = 0, 1
    while n <= max_sessions and holds(n):
        held, n = n, n * 2
    fail = min(n, max_sessions + 1)
    while fail - held > max(1, held // BISECT_RESOLUTION):
        mid = (held + fail) // 2
        held, fail = (mid, fail) if holds(mid) else (held, mid)
    return held, sorted(rows, key=lambda r: r["sessions"])


def main(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    dev = resolve_device(args.device or "auto")
    max_sessions = args.max_sessions or (4096 if dev.type == "cuda" else 256)
    if args.checkpoint:
        from ..model.checkpoint import load_checkpoint

        model, _ = load_checkpoint(args.checkpoint, lambda cfg: InteractionModel(cfg), "cpu")
        preset_name = f"{args.preset} ({args.checkpoint})"
    else:
        from ..model.config import preset

        model = build_model(preset(args.preset))
        preset_name = args.preset
    dtype = resolve_dtype(args.dtype, dev)
    engine = Engine(model, max_slots=max_sessions, device=str(dev), dtype=dtype)
    engine.warmup()
    engine.profile = True
    feeder = _Feeder(load_speech(args.wav))

    held, batched = _sweep(lambda n: batched_level(engine, feeder, n, args.seconds), max_sessions)
    engine.profile = False
    one_held, single = _sweep(
        lambda n: (one_at_a_time_level(engine.model, str(dev), dtype, feeder, n, args.seconds), {}),
        max_sessions,
    )
    peak = matmul_peak_gflops(dev, engine.dtype)
    cfg = engine.config
    best = next((r for r in batched if r["sessions"] == held), batched[0])
    achieved = flops_per_turn(cfg) * best["sessions"] / (best["p50"] / 1e3) / 1e9

    print(f"device: {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), "
          f"dtype {engine.dtype}, threads {torch.get_num_threads()}, budget p99 < {REALTIME_BUDGET_MS} ms")
    print(f"{'sessions':>8} {'batched p50':>12} {'batched p99':>12} {'one-by-one p99':>15}   stages p50 (ms)")
    for r in batched:
        s = next((x for x in single if x["sessions"] == r["sessions"]), None)
        stages = " ".join(f"{k}={v:.1f}" for k, v in r["stages"].items())
        one = f"{s['p99']:15.1f}" if s else f"{'-':>15}"
        print(f"{r['sessions']:>8} {r['p50']:12.1f} {r['p99']:12.1f} {one}   {stages}")
    result = {
        "preset": preset_name,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(engine.dtype).removeprefix("torch."),
        "sessions_realtime": held,
        "tick_ms_p50": round(best["p50"], 2),
        "tick_ms_p99": round(best["p99"], 2),
        "one_at_a_time_sessions": one_held,
        "batch_speedup": round(held / one_held, 2) if one_held else None,
        "model_gflops": round(achieved, 2),
        "peak_gflops": round(peak, 2),
        "mfu": round(achieved / peak, 4),
        "stages_ms_p50": {k: round(v, 2) for k, v in best["stages"].items()},
        "budget_ms": REALTIME_BUDGET_MS,
    }
    print(json.dumps(result))
    return 0
