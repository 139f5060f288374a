"""The engine in its own process, behind the same calls as the in-process engine (model/engine.py).

`ProcessEngine(spec)` spawns the engine core (model/engine_core.py) and keeps, on this side, what
needs no tensors: the slot table (slot ids <-> rows, input checks, text decoding) and the shared
step block (model/step_shm.py). Per step the packed batch goes into the block and a few integers
down a `multiprocessing` pipe; the result comes back the same way: nothing per session is pickled
per tick. Control (join, leave) uses the same pipe, between steps.

Why a pipe and not pyzmq: one owner, one engine, one request in flight, both ends on one host;
`Connection.poll(timeout)` gives the deadline, and EOF on the pipe is the death notice. Why spawn:
the owner runs threads (the event loop, the tick thread), which fork would copy in whatever state
they hold, and CUDA cannot be re-initialised in a forked child.

Contract
- `start()` blocks until the engine process is warm and attached (or raises `EngineStartError`
  with the process's own reason); `close()` stops it.
- Every call answers within its deadline or raises `EngineDied`: the process exited, or missed the
  deadline (it is then killed). After `EngineDied` every row is gone and every call but `leave` (a
  no-op then) raises it again until `restart()` brings a fresh process up.
- A request the process answers with an error (`EngineCallError`) leaves it serving.
- This module does not import torch; it knows nothing about sessions, clocks or sockets.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from functools import partial

from .config import ModelConfig
from .engine_core import EngineInfo, EngineSpec, run_engine_core
from .patches import image_patches
from .slot_table import SlotTable
from .slots import SamplingParams, SlotInput, SlotOutput
from .step_shm import StepBuffers
from .tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0  # how long a stopping engine may take to exit before it is killed


class EngineDied(RuntimeError):
    """The engine process exited or missed its deadline; every row it held is gone."""


class EngineStartError(RuntimeError):
    """The engine process could not build or warm up its engine (the message says why)."""


class EngineCallError(RuntimeError):
    """The engine process refused one request; it goes on serving."""


class ProcessEngine:
    def __init__(self, spec: EngineSpec, call_timeout_s: float = 2.0, start_timeout_s: float = 600.0) -> None:
        self.spec = spec
        self.call_timeout_s = call_timeout_s  # a step, join or leave unanswered this long = hung
        self.start_timeout_s = start_timeout_s  # loading, warmup and CUDA graph capture
        self.tokenizer = ByteTokenizer()
        self.profile = False  # ask the engine for per-stage times (stage_ms) with each step
        self.stage_ms: dict[str, float] = {}
        self.restarts = 0  # fresh processes brought up after the first
        self._ctx = mp.get_context("spawn")
        self._proc: mp.process.BaseProcess | None = None
        self._conn = None
        self._info: EngineInfo | None = None
        self._table: SlotTable | None = None
        self._buffers: StepBuffers | None = None

    # --- what the server reads ---
    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise EngineDied("the engine process is not running")
        return self._info

    @property
    def config(self) -> ModelConfig:
        return self.info.config

    @property
    def hears(self) -> bool:
        return self.info.hears

    @property
    def max_slots(self) -> int:
        return self.spec.max_slots

    @property
    def device(self) -> str:
        return self.info.device

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._table is not None

    @property
    def rows(self) -> int:
        """Rows each step computes; 0 while the engine is down."""
        return len(self._table) if self._table is not None else 0

    # --- lifetime ---
    def start(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=run_engine_core, args=(self.spec, child), name="microturn-engine", daemon=True
        )
        proc.start()
        child.close()  # so the engine's death reads as EOF here
        self._proc, self._conn = proc, parent
        try:
            kind, value = self._receive(self.start_timeout_s, "start")
            if kind != "ready":
                raise EngineStartError(f"the engine process could not start: {value}")
            info: EngineInfo = value
            buffers = StepBuffers(info.config, info.max_slots)
            self._info, self._buffers = info, buffers
            self._request(("attach", buffers.name), self.call_timeout_s)
        except BaseException:
            self._shutdown(kill=True)
            raise
        self._table = SlotTable(
            info.config, info.max_slots, self.tokenizer, partial(image_patches, cfg=info.config)
        )
        log.info(
            "engine process %d ready: %s, %s, %d thread(s)", info.pid, info.device, info.dtype, info.threads
        )

    def restart(self) -> None:
        self._shutdown(kill=True)
        self.restarts += 1
        self.start()

    def close(self) -> None:
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(("stop",))
            except OSError:
                pass
        self._shutdown(kill=False)

    def warmup(self, turns: int = 2, cuda_graphs: bool = True) -> None:
        """The engine process warms up (and captures graphs) before it says it is ready."""

    # --- slots ---
    def join(self, instructions: str = "", sampling: SamplingParams | None = None) -> int:
        table = self._live_table()
        slot, row = table.join()
        try:
            self._request(
                ("join", row, sampling or SamplingParams(), table.prefix_ids(instructions)),
                self.call_timeout_s,
            )
        except EngineDied:
            raise
        except BaseException:
            self.leave(slot)  # a half-joined row would be stepped every tick with no session behind it
            raise
        return slot

    def leave(self, slot: int) -> None:
        """A no-op while the engine is down: its rows went with it."""
        if self._table is None:
            return
        move = self._table.leave(slot)
        if move is not None:
            self._request(("move", *move), self.call_timeout_s)

    # --- the tick ---
    def step(self, inputs: dict[int, SlotInput]) -> dict[int, SlotOutput]:
        table = self._live_table()
        if not len(table):
            return {}
        batch, controls, errors = table.pack(inputs)
        assert self._buffers is not None
        B, image_rows = self._buffers.write_batch(batch, controls)
        stage_ms = self._request(("step", B, image_rows, self.profile), self.call_timeout_s)
        self.stage_ms = stage_ms
        return table.unpack(self._buffers.read_result(B, stage_ms), errors)

    # --- the pipe ---
    def _live_table(self) -> SlotTable:
        if self._table is None:
            raise EngineDied("the engine process is not running")
        return self._table

    def _request(self, message: tuple, timeout_s: float):
        try:
            self._conn.send(message)
        except OSError as exc:  # BrokenPipe / ConnectionReset: the process is gone
            self._died(f"the engine process is gone ({exc.__class__.__name__})")
        kind, value = self._receive(timeout_s, message[0])
        if kind == "error":
            raise EngineCallError(f"engine {message[0]} failed: {value}")
        return value

    def _receive(self, timeout_s: float, what: str) -> tuple:
        conn, deadline = self._conn, time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                if conn.poll(max(0.0, min(remaining, 0.5))):
                    return conn.recv()
            except (EOFError, OSError):
                self._died(f"the engine process exited during {what} (exit code {self._exitcode()})")
            if not self._proc.is_alive():
                self._died(f"the engine process exited during {what} (exit code {self._exitcode()})")
            if remaining <= 0:
                self._died(f"the engine process did not answer {what} within {timeout_s:g} s")

    def _exitcode(self) -> int | None:
        self._proc.join(0.5)
        return self._proc.exitcode

    def _died(self, reason: str):
        log.error("%s: killing it; every row it held is gone", reason)
        self._shutdown(kill=True)
        raise EngineDied(reason)

    def _shutdown(self, kill: bool) -> None:
        self._table = None
        proc, self._proc = self._proc, None
        if proc is not None:
            if kill:
                proc.kill()
            proc.join(STOP_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join(STOP_TIMEOUT_S)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._buffers is not None:
            self._buffers.close()
            self._buffers = None
