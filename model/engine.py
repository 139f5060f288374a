"""The resident engine: one model, a static batch of session slots, one step per tick.

Contract
- `join(instructions, sampling) -> slot` takes a free slot (raises `EngineFull`),
  resets its state and prefills its pinned prefix; `leave(slot)` frees it. A join
  that raises holds no slot afterwards.
- `step(inputs) -> outputs` runs one micro-turn for every joined slot in one
  batched forward: dMel-encode each slot's 200 ms of input audio, prefill the
  input positions (plus the previous turn's last output token), decode the
  text-out then audio-out tokens one position at a time, vocode the audio.
  Each output also carries `heard_tokens`: the text head's greedy reading
  of the turn's audio-in positions (CTC ids, PAD = blank), a transcript of
  the user's speech for checkpoints trained with `--heard-weight`
  (`Engine.hears`); noise for others.
  Slots missing from `inputs` get silence. Bad input in one slot (wrong
  shape, non-finite samples, bad token ids, a wait bias offset out of
  range) is replaced by silence and reported in that slot's
  `SlotOutput.error`; other slots are untouched. Per tick, a slot's
  `SlotInput.wait_bias_offset` shifts its turn-taking and `audio_out=False`
  skips its vocoder (zeros out), without touching its conversation.
- join/leave/step are not thread-safe against each other: the caller runs
  them on one thread (the tick thread), never on an asyncio loop.

A facade over two parts: the slot table (model/slot_table.py: slot ids <-> rows,
validation, text decoding; host data only) and the runner (model/runner.py: model,
cache, streams and per-row tensors). Between them each step passes plain host arrays
(model/step_io.py), so the runner could live in another process. This module knows
nothing about clocks, sockets, protocol events or background work.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from functools import partial

import torch

from .config import ModelConfig, preset
from .patches import image_patches
from .precision import slow_bf16_warning
from .runner import Runner
from .slot_table import EngineFull, SlotTable
from .slots import SamplingParams, SlotInput, SlotOutput
from .tokenizer import ByteTokenizer
from .transformer import InteractionModel, build_model
from .vocoder import Vocoder

__all__ = ["DTYPES", "Engine", "EngineFull", "default_dtype", "resolve_device", "resolve_dtype"]

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA; fp32 on CPU, where it keeps a session's output bit-identical whatever batch it
    shares (bf16 CPU kernels round differently with the batch size). bf16 on a CPU with native bf16
    matmuls is ~20% faster for tiny: pass dtype=torch.bfloat16 (`--dtype bfloat16`)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return default_dtype(device)
    try:
        dtype = DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose auto, float32 or bfloat16") from None
    if dtype == torch.bfloat16 and (warning := slow_bf16_warning(device)):
        log.warning(warning)
    return dtype


class Engine:
    def __init__(
        self,
        model: InteractionModel,
        max_slots: int = 64,
        device: str = "auto",
        vocoder: Vocoder | None = None,
        dtype: torch.dtype | None = None,
        hears: bool = False,
        wait_bias: float = 0.0,
    ) -> None:
        dev = resolve_device(device)
        self.hears = hears  # the text head transcribes the audio-in positions (training/heard.py)
        self.wait_bias_default = wait_bias  # the checkpoint's calibrated turn-taking bias; slots add theirs
        self.tokenizer = ByteTokenizer()
        dtype = dtype or default_dtype(dev)
        self.runner = Runner(model, max_slots, dev, dtype, self.tokenizer.special, vocoder)
        self.table = SlotTable(model.cfg, max_slots, self.tokenizer, partial(image_patches, cfg=model.cfg))
        # Per-stage times of the last step (ms); filled only when `profile` is on (it adds device syncs).
        self.profile = False
        self.stage_ms: dict[str, float] = {}
        # Debug trace: when a list, each step appends its inputs, outputs and logits (host copies).
        self.trace: list[dict] | None = None

    @classmethod
    def from_preset(cls, name: str = "tiny", max_slots: int = 64, device: str = "auto", seed: int = 0,
                    **kw) -> Engine:
        return cls(build_model(preset(name), seed=seed), max_slots=max_slots, device=device, **kw)

    @classmethod
    def from_checkpoint(cls, path: str, max_slots: int = 64, device: str = "auto", **kw) -> Engine:
        from .checkpoint import load_checkpoint, read_config

        model, _ = load_checkpoint(path, lambda cfg: InteractionModel(cfg), "cpu")
        extra = read_config(path)[1]
        recipe = extra.get("recipe") or {}  # the last training stage's flags
        return cls(model, max_slots=max_slots, device=device, hears=bool(recipe.get("heard_weight")),
                   wait_bias=float(extra.get("wait_bias", 0.0)), **kw)

    @property
    def config(self) -> ModelConfig:
        return self.runner.config

    @property
    def model(self) -> InteractionModel:
        return self.runner.model

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    @property
    def max_slots(self) -> int:
        return self.table.max_slots

    @property
    def rows(self) -> int:
        """Rows each step computes (joined slots)."""
        return len(self.table)

    def close(self) -> None:
        """Nothing to release: the engine lives and dies with this process."""

    # --- slots ---
    @property
    def active_slots(self) -> list[int]:
        return self.table.slots

    def join(self, instructions: str = "", sampling: SamplingParams | None = None) -> int:
        slot, row = self.table.join()
        try:
            self.runner.reset_row(row)
            self.set_sampling(slot, sampling or SamplingParams())
            self.set_instructions(slot, instructions)
        except BaseException:
            # a half-joined row would be stepped every tick with no session behind it: give it back
            self.leave(slot)
            raise
        return slot

    def leave(self, slot: int) -> None:
        move = self.table.leave(slot)
        if move is not None:
            self.runner.move_row(*move)

    def set_sampling(self, slot: int, p: SamplingParams) -> None:
        self.runner.set_sampling(self.table.row(slot), self.row_sampling(p))

    def row_sampling(self, p: SamplingParams) -> SamplingParams:
        """A session's params as its row runs them: its wait_bias adds to the checkpoint's calibrated one."""
        return dataclasses.replace(p, wait_bias=self.wait_bias_default + p.wait_bias)

    def set_instructions(self, slot: int, instructions: str) -> None:
        """Prefill the pinned prefix: INSTR + instruction bytes, truncated to prefix_len."""
        self.runner.prefill_prefix(self.table.row(slot), self.table.prefix_ids(instructions))

    # --- the tick ---
    def step(self, inputs: dict[int, SlotInput]) -> dict[int, SlotOutput]:
        t0 = time.perf_counter()
        if not len(self.table):
            return {}
        batch, controls, errors = self.table.pack(inputs)
        packed = time.perf_counter()
        result = self.runner.step(batch, controls, profile=self.profile, trace=self.trace is not None)
        if self.profile:
            # host-side packing is part of preparing the step, as is the runner's upload
            self.stage_ms = {**result.stage_ms, "prepare": result.stage_ms["prepare"] + (packed - t0) * 1e3}
        if self.trace is not None and result.trace is not None:
            self.trace.append({"slots": self.table.slots, **result.trace})
        return self.table.unpack(result, errors)

    def moe_backend_for(self, rows: int) -> str:
        return self.runner.moe_backend_for(rows)

    def warmup(self, turns: int = 2, cuda_graphs: bool = True) -> None:
        """Pay first-call costs before serving; on CUDA, capture the tick per batch bucket."""
        if cuda_graphs and self.device.type == "cuda" and self.runner.graphs is None and not len(self.table):
            self.runner.capture_graphs()
        slot = self.join("warmup")
        try:
            for _ in range(turns):
                self.step({})
        finally:
            self.leave(slot)
        # Everything alive now (model, caches, graphs) lives for the process: keep it out of the
        # cyclic GC's full collections, whose pauses otherwise land in random ticks' p99.
        gc.collect()
        gc.freeze()
