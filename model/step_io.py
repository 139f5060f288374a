"""What crosses the runner boundary each step: the B active rows' inputs and outputs as host data.

The slot table (model/slot_table.py) packs validated session inputs into a `StepBatch`, the runner
(model/runner.py) computes the step and answers a `StepResult`. Row b of every array is row b of
the runner's state; nothing here names a session slot. Arrays are fixed-shape numpy, so a batch can
cross a process boundary through shared memory; only `StepResult.trace` (a debug path) holds
torch CPU tensors. This module knows nothing about sessions, validation or devices.

Legend: B rows, N samples per turn, Ti text-in slots, To text-out slots, A audio tokens per turn,
I rows that sent a new camera frame, G grid patches per frame, P values per patch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepBatch:
    audio: np.ndarray  # (B, N) float32 input audio of the turn (silence where a row sent none)
    text_in: np.ndarray  # (B, Ti) int64 text-in ids, PAD where unused
    source: np.ndarray  # (B, Ti) int64 text-in source: 1 = background result, 0 = user
    forced: np.ndarray  # (B, To) int64 text-out ids to force, -1 = sample
    image_rows: list[int]  # the I rows whose camera frame changed this turn
    images: np.ndarray  # (I, G, P) float32 patches of those frames (model/patches.py image_patches)


@dataclass
class StepResult:
    audio: np.ndarray  # (B, N) float32 output audio in [-1, 1], after the vocoder
    text_tokens: list[list[int]]  # (B, To) text-out ids sampled (or forced) this turn
    heard_tokens: list[list[int]]  # (B, A) greedy text-head ids at the audio-in positions
    turn_index: list[int]  # (B,) micro-turns each row had run before this one
    # per-stage wall times in ms (prepare, dmel, model, vocoder); empty unless profiling was asked
    stage_ms: dict[str, float] = field(default_factory=dict)
    # host copies of the turn's model inputs, outputs and logits (row b = batch row b); when asked
    trace: dict | None = None
