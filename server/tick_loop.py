"""The tick loop: one dedicated thread owns the engine and steps it once per 200 ms tick.

Ticks sit on an absolute grid (t0 + n * 200 ms), so every session's clock is
phase-locked to it. Between ticks the thread runs queued engine calls (join, leave,
re-join) submitted from the event loop with `call`; the event loop never touches the
engine and never waits on a step. Each tick it takes every session's input, steps the
engine once for all of them, and hands the outputs back to the event loop with
`loop.call_soon_threadsafe`. A step that overruns by more than a whole tick skips the
missed grid points and counts them.

An engine in another process can die or hang (model/engine_process.py raises `EngineDied`
from any call). Then every live session is closed with `engine_restarting` (1012), the
engine is restarted on this thread (`engine_up` is false meanwhile: /readyz and admission
read it), and calls queued in between run against the fresh engine. This module knows
nothing about sockets or protocol.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..model.engine_process import EngineDied
from .engine_api import EngineAPI
from .errors import ErrorCode
from .metrics import Metrics
from .session import TURN_MS, Session

log = logging.getLogger(__name__)

TICK_S = TURN_MS / 1000.0
STEP_HISTORY = 100_000  # step durations kept for exact percentiles (benchmarks)
STOP_TIMEOUT_S = 10.0  # longest wait for the thread to finish its step on shutdown
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)  # waits between failed engine restarts, the last repeated
# consecutive whole-batch step failures after which the engine counts as lost: one failed tick is
# dropped, but a step that keeps failing would otherwise silence every session for good
MAX_STEP_FAILURES = 3


class TickLoop:
    def __init__(self, engine: EngineAPI, metrics: Metrics, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self._metrics = metrics
        self._loop = loop
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future] | None] = queue.SimpleQueue()
        self._sessions: dict[int, Session] = {}  # slot -> session; tick thread only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="microturn-tick", daemon=True)
        self.ticks = 0  # ticks stepped (with sessions)
        self.step_ms: deque[float] = deque(maxlen=STEP_HISTORY)  # recent step durations, for benchmarks
        self._restarted = False  # set by a restart for _run to start the grid again
        self._step_failures = 0  # consecutive steps that raised
        self.engine_up = True  # false while a dead engine is being replaced; read from the event loop
        self._metrics.engine_up.set(1)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Leave every slot and end the thread (call from the event loop at shutdown)."""
        self._stop.set()
        self._calls.put(None)
        self._thread.join(STOP_TIMEOUT_S)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the tick thread between steps; returns its result or raises its exception."""
        return await self.submit(fn)

    def submit(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Queue `fn` now (calls run in the order they are queued); the future resolves when it ran."""
        future = self._loop.create_future()
        self._calls.put((fn, future))
        return future

    async def join(self, session: Session) -> int:
        def op() -> int:
            slot = self.engine.join(instructions=session.instructions, sampling=session.sampling)
            self._sessions[slot] = session
            return slot

        session.slot = await self.call(op)
        return session.slot

    async def rejoin(self, session: Session) -> None:
        """New prefix or sampling: restart the slot's conversation without giving the slot up.

        A failed join raises with the session holding no slot (the engine gave the row back), so
        the caller closes it; rows stepped stay equal to live sessions either way."""
        slot, session.slot = session.slot, None  # slot ids are reused: never leave a stale one behind

        def op() -> int:
            if self._sessions.pop(slot, None) is not None:
                self.engine.leave(slot)
            new = self.engine.join(instructions=session.instructions, sampling=session.sampling)
            self._sessions[new] = session
            return new

        session.slot = await self.call(op)

    async def leave(self, session: Session) -> None:
        await self.leave_soon(session)

    def leave_soon(self, session: Session) -> asyncio.Future:
        """Queue the session's leave at once: any join queued after it finds the row already free."""
        session.slot = None

        def op() -> None:
            # by identity, not session.slot: a join or rejoin whose awaiting coroutine was cancelled
            # still ran here (calls run in order), and its row must go too
            for slot in [s for s, owner in self._sessions.items() if owner is session]:
                del self._sessions[slot]
                self.engine.leave(slot)

        return self.submit(op)

    # --- the thread ---
    def _run(self) -> None:
        t0 = time.monotonic()
        n = 0
        while not self._stop.is_set():
            self._serve_calls(until=t0 + n * TICK_S)
            if self._stop.is_set():
                break
            self._tick()
            n += 1
            if self._restarted:  # the grid starts again after a restart: its wait is not missed ticks
                self._restarted = False
                t0, n = time.monotonic(), 0
                continue
            behind = time.monotonic() - (t0 + n * TICK_S)
            if behind > TICK_S:
                missed = math.floor(behind / TICK_S)
                n += missed
                if not self._sessions:
                    continue  # an idle grid point is missed by no one (a GIL-heavy burst between sessions)
                self._metrics.missed_ticks.inc(missed)
                for session in self._sessions.values():
                    session.skip_input(missed)
                log.warning("tick overran: %d tick(s) missed", missed)
        for slot in list(self._sessions):
            try:
                self.engine.leave(slot)
            except EngineDied:
                break  # nothing left to give back
        self._sessions.clear()

    def _serve_calls(self, until: float) -> None:
        while True:
            remaining = until - time.monotonic()
            try:
                item = self._calls.get(timeout=remaining) if remaining > 0 else self._calls.get_nowait()
            except queue.Empty:
                return
            if item is None:
                return
            fn, future = item
            try:
                result, error = fn(), None
            except Exception as exc:  # handed to the awaiting coroutine
                result, error = None, exc
            self._loop.call_soon_threadsafe(_resolve, future, result, error)
            if isinstance(error, EngineDied):
                self._engine_lost(error)
            self._metrics.engine_rows.set(self.engine.rows)

    def _tick(self) -> None:
        sessions = list(self._sessions.items())
        self._metrics.batch_size.set(len(sessions))
        self._metrics.engine_rows.set(self.engine.rows)
        if not sessions:
            return
        now = time.monotonic()
        inputs, underruns, queued_ms = {}, 0, 0
        for slot, session in sessions:
            if session.failed:
                continue  # closing; the engine gives its row silence until the leave lands
            try:
                inputs[slot], underrun = session.take_input(now)
            except Exception:
                log.exception("session %s: taking its input failed; closing it", session.id)
                self._loop.call_soon_threadsafe(session.fail, "its input could not be prepared")
                session.failed = True  # set here too, so later ticks skip it before the loop runs fail
                continue
            underruns += underrun
            queued_ms += session.input_buffered_ms
        started = time.perf_counter()
        try:
            outputs = self.engine.step(inputs)
        except EngineDied as exc:
            self._engine_lost(exc)
            return
        except Exception as exc:
            self._step_failures += 1
            log.exception("engine step failed (%d in a row); its output is dropped", self._step_failures)
            if self._step_failures >= MAX_STEP_FAILURES:
                self._engine_lost(EngineDied(f"{self._step_failures} steps in a row failed: {exc}"))
            return
        self._step_failures = 0
        elapsed = time.perf_counter() - started
        self._metrics.tick_seconds.observe(elapsed)
        self.step_ms.append(elapsed * 1e3)
        self._metrics.ticks.inc()
        self._metrics.underruns.inc(underruns)
        self._metrics.input_queue_seconds.set(queued_ms / 1e3)
        self.ticks += 1
        batch = [
            (session, outputs[slot], inputs[slot]) for slot, session in sessions
            if slot in outputs and slot in inputs
        ]
        self._loop.call_soon_threadsafe(self._deliver, batch)

    def _engine_lost(self, exc: EngineDied) -> None:
        """Close every live session, then bring a fresh engine up (blocking this thread: no rows to step)."""
        self.engine_up = False
        self._metrics.engine_up.set(0)
        lost = list(self._sessions.items())
        self._sessions.clear()
        log.error("engine lost (%s): closing %d session(s) and restarting it", exc, len(lost))
        reason = f"the engine stopped ({exc}); reconnect in a moment"
        for _, session in lost:
            session.failed = True
            self._loop.call_soon_threadsafe(session.fail, reason, ErrorCode.ENGINE_RESTARTING)
        self._step_failures = 0
        attempt = 0
        restart = getattr(self.engine, "restart", None)
        if restart is None:  # an in-process engine cannot be replaced: it gives the closed rows back
            for slot, _ in lost:
                self.engine.leave(slot)
        while restart is not None and not self._stop.is_set():
            try:
                restart()
                break
            except Exception:
                log.exception("engine restart failed")
                self._stop.wait(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
                attempt += 1
        self._metrics.engine_restarts.inc()
        self._restarted = True
        self._metrics.engine_rows.set(self.engine.rows)
        self.engine_up = True
        self._metrics.engine_up.set(1)

    def _deliver(self, batch: list) -> None:
        for session, out, inp in batch:
            if session.failed:
                continue  # failed in an earlier delivery whose tick overlapped this one
            try:
                session.deliver(out, inp)
            except Exception:
                # one session's bug must not cost the rest of the batch its micro-turn
                log.exception("session %s: delivering its output failed; closing it", session.id)
                session.fail("its output could not be delivered")
        self._metrics.output_queue_turns.set(sum(s.queued_turns for s, _, _ in batch))


def _resolve(future: asyncio.Future, result: Any, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
