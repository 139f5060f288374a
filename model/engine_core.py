"""The engine core: the process that owns torch, the model and the runner, and steps on request.

`run_engine_core(spec, conn)` is the process's entry point (spawned by model/engine_process.py). It
builds the engine from an `EngineSpec`, warms it up (capturing CUDA graphs here, in the process that
replays them), and announces `("ready", EngineInfo)`. The owner then names its shared step block
(`("attach", name)`, model/step_shm.py) and sends, one at a time, each answered on the pipe:

- `("join", row, SamplingParams, prefix_ids)`: a fresh conversation on `row` with that prefix;
- `("move", src, dst)`: copy row `src` onto row `dst` (a leave's hole filled by the last row);
- `("step", B, image_rows, profile)`: one micro-turn of rows [0, B), its batch and row controls
  read from the block and its result written back; the answer carries the stage times;
- `("stop",)`: exit.

Answers are `("ok", value)` or `("error", message)`; a failed request leaves the process serving.
Which row holds which session is the owner's bookkeeping (model/slot_table.py): this module knows
nothing about slots, validation, text decoding, clocks or sockets.
"""

from __future__ import annotations

import logging
import os
import signal
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from .config import ModelConfig
from .slots import SamplingParams
from .step_shm import StepBuffers

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSpec:
    """What to build in the engine process (picklable: it crosses the spawn)."""

    checkpoint: str | None  # checkpoint directory; None = the preset with seeded weights
    preset: str  # model preset when no checkpoint is given
    seed: int  # seed of the preset's random weights
    device: str  # auto, cpu, cuda or cuda:N
    dtype: str  # auto, float32 or bfloat16
    max_slots: int  # rows the engine allocates
    threads: int  # torch intra-op threads; 0 = torch's default
    cpus: tuple[int, ...] = ()  # CPUs the process is pinned to; empty = wherever the OS likes


@dataclass(frozen=True)
class EngineInfo:
    """What the engine process reports once it is ready."""

    config: ModelConfig
    hears: bool  # the text head transcribes the user's speech (model/engine.py Engine.hears)
    max_slots: int
    device: str
    dtype: str
    threads: int  # torch intra-op threads it runs with
    pid: int


def build_engine(spec: EngineSpec) -> Engine:
    import torch

    from .engine import Engine, resolve_device, resolve_dtype  # here, not at the top: torch comes with it

    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    dtype = resolve_dtype(spec.dtype, resolve_device(spec.device))
    if spec.checkpoint:
        return Engine.from_checkpoint(
            spec.checkpoint, max_slots=spec.max_slots, device=spec.device, dtype=dtype
        )
    return Engine.from_preset(
        spec.preset, max_slots=spec.max_slots, device=spec.device, seed=spec.seed, dtype=dtype
    )


def _pin(spec: EngineSpec) -> None:
    """Pin the process before torch sizes its thread pool (it counts the CPUs it may run on)."""
    if spec.cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec.cpus)


def run_engine_core(spec: EngineSpec, conn: Connection) -> None:
    # Ctrl-C reaches the whole process group; the owner decides when the engine stops (it drains first)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine-core: %(message)s")
    try:
        _pin(spec)
        import torch

        engine = build_engine(spec)
        engine.warmup()
        info = EngineInfo(
            engine.config,
            engine.hears,
            engine.max_slots,
            str(engine.device),
            str(engine.dtype).removeprefix("torch."),
            torch.get_num_threads(),
            os.getpid(),
        )
    except Exception as exc:  # a bad checkpoint, an unknown preset: the owner shows the reason and gives up
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", info))
    buffers: StepBuffers | None = None
    runner = engine.runner
    try:
        while True:
            try:
                request = conn.recv()
            except EOFError:  # the owner is gone
                return
            kind = request[0]
            if kind == "stop":
                return
            try:
                if kind == "attach":
                    buffers = StepBuffers(engine.config, engine.max_slots, name=request[1])
                    value = None
                elif kind == "join":
                    _, row, sampling, prefix_ids = request
                    _join(engine, row, sampling, prefix_ids)
                    value = None
                elif kind == "move":
                    runner.move_row(request[1], request[2])
                    value = None
                elif kind == "step":
                    _, B, image_rows, profile = request
                    assert buffers is not None, "step before attach"
                    batch, controls = buffers.read_batch(B, image_rows)
                    result = runner.step(batch, controls, profile=profile)
                    buffers.write_result(result)
                    value = result.stage_ms
                else:
                    raise ValueError(f"unknown request {kind!r}")
            except Exception as exc:
                log.error("%s failed:\n%s", kind, traceback.format_exc())
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
                continue
            conn.send(("ok", value))
    finally:
        if buffers is not None:
            buffers.close()


def _join(engine: Engine, row: int, sampling: SamplingParams, prefix_ids: list[int]) -> None:
    runner = engine.runner
    runner.reset_row(row)
    runner.set_sampling(row, engine.row_sampling(sampling))
    runner.prefill_prefix(row, prefix_ids)
