"""`microturn loadtest`: N real-time sessions against one server URL; `--sweep` finds capacity.

One asyncio process drives every session (its own pacing lag is reported as
`client_send_lag_ms_p99`, so a client that cannot keep up is visible). Sessions
start staggered over `--ramp` seconds; every fourth sends typed text and every
fourth (offset by two) a background task. Around each load level the server's
`/metrics` (same host as the URL) is scraped for tick time, missed ticks and
underruns. Output: a table per level, a PNG plot, and one JSON line last. `--sweep`
doubles N from `--sessions` until goodput drops below `GOODPUT_TARGET` or N would
pass `--max-sessions`; the capacity is the largest N that met it. The URL may be a load
balancer's in front of replicas: each session's `session.created` names the replica that
served it, and the summary counts sessions per replica (`replicas`); the server figures are
then one replica's, whichever answered the scrape. Its load is bounded
(`MAX_SESSIONS`, `MAX_DURATION_S`, `MAX_SWEEP_LEVELS`) and it only contacts the URL's
host. This module knows nothing about the server's internals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np

from .report import Targets, parse_metrics, plot, summarize, table
from .session import RATE, SessionPlan, SessionResult, run_session

GOODPUT_TARGET = 0.99  # share of sessions meeting every target for a load level to pass
MAX_SESSIONS = 4096  # hard bound on concurrent sessions, whatever the flags say
MAX_DURATION_S = 3600.0  # hard bound on one level's duration
MAX_SWEEP_LEVELS = 10  # sweep doublings at most
SETTLE_S = 5.0  # between sweep levels: longest wait for the server to free the last level's slots
START_SLACK_S = 0.3  # first session starts this long after the plan is made
HTTP_TIMEOUT_S = 10.0
TEXT_EVERY = 4  # every 4th session types a message
TASK_EVERY = 4  # every 4th (offset 2) starts a background task
TYPED_TEXT = "Hello! Can you hear me?"
TASK_TEXT = "what is 17 times 23?"
SPEECH_TEXT = (
    "Hello there. I would like to know the weather tomorrow, and then "
    "please remind me what seventeen times twenty three is."
)
DEFAULT_PLOT = "loadtest.png"
API_KEY_ENV = "MICROTURN_API_KEY"
CLIENT_MODE = "asyncio, 1 process"


def metrics_url(ws_url: str) -> str:
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme in ("wss", "https") else "http"
    return urlunsplit((scheme, parts.netloc, "/metrics", "", ""))


def load_audio(path: str | None) -> np.ndarray:
    if path:
        from ..python.cli import read_mono

        return read_mono(path, RATE)
    from ...training.espeak import speak

    return speak(SPEECH_TEXT, rate=RATE)


def plans(n: int, duration_s: float, ramp_s: float) -> list[SessionPlan]:
    return [
        SessionPlan(
            index=i,
            start_s=ramp_s * i / n,
            duration_s=duration_s,
            text=TYPED_TEXT if i % TEXT_EVERY == 0 else None,
            task=TASK_TEXT if i % TASK_EVERY == 2 else None,
        )
        for i in range(n)
    ]


async def _scrape(http: httpx.AsyncClient, url: str) -> dict[str, float]:
    response = await http.get(url)
    response.raise_for_status()
    return parse_metrics(response.text)


async def _settle(http: httpx.AsyncClient, url: str) -> None:
    """Wait (bounded) until the server holds no sessions and its engine no rows, so levels do not overlap
    (a closed session leaves the admission count before its engine row is given back)."""
    ready = url.replace("/metrics", "/readyz")
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        try:
            body = (await http.get(ready)).json()
            if body.get("sessions", 0) == 0 and body.get("engine_rows", 0) == 0:
                return
        except (httpx.HTTPError, ValueError):
            return
        await asyncio.sleep(0.1)


async def run_level(
    url: str,
    n: int,
    duration_s: float,
    ramp_s: float,
    audio: np.ndarray,
    cushion_s: float,
    api_key: str | None,
) -> tuple[dict, list[SessionResult]]:
    murl = metrics_url(url)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as http:
        await _settle(http, murl)
        before = await _scrape(http, murl)
        t0 = time.monotonic() + START_SLACK_S
        results = await asyncio.gather(
            *(run_session(url, plan, audio, t0, cushion_s, api_key) for plan in plans(n, duration_s, ramp_s))
        )
        await _settle(http, murl)
        after = await _scrape(http, murl)
    return summarize(results, duration_s, before, after, Targets(jitter_ms_p99=cushion_s * 1000)), list(
        results
    )


async def run(args: argparse.Namespace) -> dict:
    audio = load_audio(args.wav)
    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    cushion_s = args.cushion_ms / 1000
    levels: list[tuple[dict, list[SessionResult]]] = []
    n = args.sessions
    for _ in range(MAX_SWEEP_LEVELS if args.sweep else 1):
        summary, results = await run_level(
            url=args.url,
            n=n,
            duration_s=args.duration,
            ramp_s=args.ramp,
            audio=audio,
            cushion_s=cushion_s,
            api_key=api_key,
        )
        levels.append((summary, results))
        print(table([summary]), flush=True)
        if summary["goodput"] < GOODPUT_TARGET or n * 2 > min(args.max_sessions, MAX_SESSIONS):
            break
        n *= 2
    plot_path = args.plot or DEFAULT_PLOT
    plot(levels, plot_path)
    passing = [s for s, _ in levels if s["goodput"] >= GOODPUT_TARGET]
    headline = dict(passing[-1] if passing else levels[0][0])
    headline.update({"client": CLIENT_MODE, "cushion_ms": args.cushion_ms, "plot": plot_path})
    if args.sweep:
        headline["capacity"] = passing[-1]["sessions"] if passing else 0
        headline["levels"] = [s for s, _ in levels]
    return headline


def _check(args: argparse.Namespace) -> str | None:
    if not 1 <= args.sessions <= MAX_SESSIONS:
        return f"--sessions must be 1..{MAX_SESSIONS}"
    if not 0 < args.duration <= MAX_DURATION_S:
        return f"--duration must be in (0, {MAX_DURATION_S:g}] seconds"
    if args.ramp < 0 or args.cushion_ms < 0:
        return "--ramp and --cushion-ms must not be negative"
    if urlsplit(args.url).scheme not in ("ws", "wss"):
        return "--url must be a ws:// or wss:// realtime URL"
    return None


def main(args: argparse.Namespace) -> int:
    problem = _check(args)
    if problem:
        print(f"microturn loadtest: {problem}", file=sys.stderr)
        return 2
    try:
        headline = asyncio.run(run(args))
    except httpx.HTTPError as exc:
        print(f"microturn loadtest: cannot read the server's metrics: {exc}", file=sys.stderr)
        return 1
    print(f"plot: {headline['plot']}")
    print(json.dumps(headline))
    return 0
