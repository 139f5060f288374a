"""`microturn bench server`: does the server hold the sessions its own engine holds?

In one run, on one machine, one after the other (never at once, so neither steals the other's
cores): `bench engine` on the checkpoint (sessions the engine steps in real time, with no server
around it), then `microturn serve` on the same checkpoint and the load test's real WebSocket
sessions against it (clients/loadtest: espeak speech in real time, typed text, background tasks).
The server's capacity is the largest session count whose goodput (share of sessions meeting every
latency and continuity target) is at least the load test's `GOODPUT_TARGET`, found by bisection
below the engine's capacity. Prints a table of the levels tried, then one JSON object last:
`engine_sessions`, `server_sessions`, `ratio`, the server's tick p50/p99 and first-audio p95 at
capacity.

Knows nothing about the server's internals: it reads the two commands' JSON lines and /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ..clients.loadtest.cli import GOODPUT_TARGET, load_audio, run_level
from ..clients.loadtest.report import table

MICROTURN = [sys.executable, "-c", "import sys; from microturn.cli import main; sys.exit(main(sys.argv[1:]))"]
DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-demo"
READY_TIMEOUT_S = 300.0  # the server's engine process loads and warms up
STOP_TIMEOUT_S = 60.0  # SIGTERM drains live sessions first
HEADROOM = 2  # session counts tried above the engine bench's capacity when the server holds it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def engine_capacity(args: argparse.Namespace) -> dict:
    cmd = [*MICROTURN, "bench", "engine", "--checkpoint", args.checkpoint, "--device", args.device,
           "--seconds", str(args.engine_seconds)]
    if args.max_sessions:
        cmd += ["--max-sessions", str(args.max_sessions)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    print(done.stdout.rsplit("\n", 2)[0], flush=True)  # its table, without the JSON line
    return _last_json(done.stdout)


class Server:
    """`microturn serve` in a subprocess, as `make serve` runs it, on a free loopback port."""

    def __init__(self, checkpoint: str, device: str, max_sessions: int, env: dict[str, str]) -> None:
        self.port = _free_port()
        self.url = f"ws://127.0.0.1:{self.port}/v1/realtime"
        full_env = {**os.environ, "MICROTURN_MAX_SESSIONS": str(max_sessions),
                    "MICROTURN_BACKGROUND_TEXT_IN": "result", **env}
        cmd = [*MICROTURN, "serve", "--port", str(self.port), "--checkpoint", checkpoint, "--device", device]
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"microturn serve exited with {self.proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise SystemExit("microturn serve did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def server_capacity(url: str, ceiling: int, args: argparse.Namespace) -> tuple[int, list[dict]]:
    """The largest passing session count: bisection in [1, ceiling] when the ceiling fails, else counts
    above it one by one for up to HEADROOM more; -> (capacity, levels tried)."""
    audio = load_audio(args.wav)
    tried: dict[int, dict] = {}

    async def level(n: int) -> bool:
        summary, _ = await run_level(url, n, args.duration, args.ramp, audio, args.cushion_ms / 1000, None)
        tried[n] = summary
        print(table([summary]), flush=True)
        return summary["goodput"] >= GOODPUT_TARGET

    lo, hi = 0, ceiling + 1  # lo passes (0 trivially), hi fails
    if await level(ceiling):
        lo = ceiling
        while lo < ceiling + HEADROOM and await level(lo + 1):
            lo += 1
    else:
        hi = ceiling
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if await level(mid):
                lo = mid
            else:
                hi = mid
    return lo, [tried[n] for n in sorted(tried)]


def main(args: argparse.Namespace) -> int:
    engine = engine_capacity(args)
    engine_sessions = int(engine["sessions_realtime"])
    env = {"MICROTURN_ENGINE_THREADS": str(args.engine_threads)} if args.engine_threads else {}
    if args.engine_cpus:
        env["MICROTURN_ENGINE_CPUS"] = args.engine_cpus
    with Server(args.checkpoint, args.device, max(1, engine_sessions) + HEADROOM + 1, env) as server:
        held, levels = asyncio.run(server_capacity(server.url, max(1, engine_sessions), args))
    at = next((s for s in levels if s["sessions"] == held), None) or {}
    print(f"{'sessions':>8} {'goodput':>8} {'tick p50':>9} {'tick p99':>9} {'first audio p95':>16} "
          f"{'missed':>7}")
    for s in levels:
        print(f"{s['sessions']:>8} {s['goodput']:>8.2f} {s['server_tick_ms_p50'] or 0:>9.1f} "
              f"{s['server_tick_ms_p99'] or 0:>9.1f} {s['first_audio_ms_p95'] or 0:>16.0f} "
              f"{s['server_missed_ticks']:>7.0f}")
    result = {
        "checkpoint": args.checkpoint,
        "device": engine["device"],
        "engine_sessions": engine_sessions,
        "server_sessions": held,
        "ratio": round(held / engine_sessions, 3) if engine_sessions else None,
        "engine_tick_ms_p50": engine["tick_ms_p50"],
        "engine_tick_ms_p99": engine["tick_ms_p99"],
        "tick_ms_p50": at.get("server_tick_ms_p50"),
        "tick_ms_p99": at.get("server_tick_ms_p99"),
        "first_audio_ms_p95": at.get("first_audio_ms_p95"),
        "goodput_target": GOODPUT_TARGET,
        "level_seconds": args.duration,
        "engine_threads": args.engine_threads or "default",
        "engine_cpus": args.engine_cpus or "any",
        "levels": [{k: s[k] for k in ("sessions", "goodput", "server_tick_ms_p50", "server_tick_ms_p99",
                                      "first_audio_ms_p95", "server_missed_ticks")} for s in levels],
    }
    print(json.dumps(result))
    return 0
