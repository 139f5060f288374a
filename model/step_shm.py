"""A step's host arrays in one shared-memory block, so a batch crosses to the engine process unpickled.

`StepBuffers` lays out, for up to S rows, every array of a `StepBatch`, its `RowControls`
(model/slots.py) and a `StepResult` (model/step_io.py) at fixed offsets of one
`multiprocessing.shared_memory` block. The server side creates the block (and unlinks it); the
engine process attaches by name. Per tick the server writes rows [0, B) of the batch and controls,
sends a few integers on the control pipe, the engine reads views of those rows, steps, and writes
the result rows back; the server copies them out before the next step. Only one step is in flight
at a time, so the two sides never touch the block at once.

This module knows nothing about pipes, processes, sessions or torch.

Legend: S rows allocated, B rows in the step, N samples per turn, Ti text-in slots, To text-out slots,
A audio tokens per turn, G grid patches per frame, P values per patch.
"""

from __future__ import annotations

from multiprocessing import shared_memory

import numpy as np

from .config import ModelConfig
from .slots import TURN_SAMPLES, RowControls
from .step_io import StepBatch, StepResult

ALIGN = 64  # each array starts on a cache line


def _fields(cfg: ModelConfig, rows: int) -> list[tuple[str, tuple[int, ...], type]]:
    grid = (cfg.image_size // cfg.patch_size) ** 2
    return [
        ("audio_in", (rows, TURN_SAMPLES), np.float32),  # (S, N)
        ("text_in", (rows, cfg.text_in_slots), np.int64),  # (S, Ti)
        ("source", (rows, cfg.text_in_slots), np.int64),  # (S, Ti)
        ("forced", (rows, cfg.text_out_slots), np.int64),  # (S, To)
        ("images", (rows, grid, cfg.patch_dim), np.float32),  # (S, G, P): only the I changed frames
        ("wait_offset", (rows,), np.float32),  # (S,) RowControls.wait_bias_offset
        ("voiced", (rows,), np.bool_),  # (S,) RowControls.audio_out
        ("audio_out", (rows, TURN_SAMPLES), np.float32),  # (S, N)
        ("text_out", (rows, cfg.text_out_slots), np.int64),  # (S, To)
        ("heard", (rows, cfg.audio_tokens), np.int64),  # (S, A)
        ("turn_index", (rows,), np.int64),  # (S,)
    ]


def _layout(cfg: ModelConfig, rows: int) -> tuple[dict[str, tuple[int, tuple[int, ...], type]], int]:
    offsets, size = {}, 0
    for name, shape, dtype in _fields(cfg, rows):
        offsets[name] = (size, shape, dtype)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        size += -(-nbytes // ALIGN) * ALIGN
    return offsets, size


class StepBuffers:
    def __init__(self, cfg: ModelConfig, rows: int, name: str | None = None) -> None:
        """`name=None` creates the block (the owner); a name attaches to the owner's block."""
        offsets, size = _layout(cfg, rows)
        self.rows = rows
        self.owner = name is None
        self._shm = shared_memory.SharedMemory(name=name, create=self.owner, size=size if self.owner else 0)
        self.name = self._shm.name
        buf = self._shm.buf
        self._arrays = {
            key: np.ndarray(shape, dtype, buffer=buf, offset=offset)
            for key, (offset, shape, dtype) in offsets.items()
        }

    def close(self) -> None:
        self._arrays.clear()  # the views pin the mapping: drop them before closing it
        self._shm.close()
        if self.owner:
            self._shm.unlink()

    # --- the server side ---
    def write_batch(self, batch: StepBatch, controls: RowControls) -> tuple[int, list[int]]:
        """-> (B, image_rows): what the engine needs besides the block to read the batch back."""
        a, B, n_img = self._arrays, len(batch.audio), len(batch.image_rows)
        a["audio_in"][:B] = batch.audio
        a["text_in"][:B] = batch.text_in
        a["source"][:B] = batch.source
        a["forced"][:B] = batch.forced
        a["images"][:n_img] = batch.images
        a["wait_offset"][:B] = controls.wait_bias_offset
        a["voiced"][:B] = controls.audio_out
        return B, list(batch.image_rows)

    def read_result(self, B: int, stage_ms: dict[str, float]) -> StepResult:
        """Copies, not views: the next step overwrites the block while these are still being delivered."""
        a = self._arrays
        return StepResult(
            audio=a["audio_out"][:B].copy(),
            text_tokens=a["text_out"][:B].tolist(),
            heard_tokens=a["heard"][:B].tolist(),
            turn_index=a["turn_index"][:B].tolist(),
            stage_ms=stage_ms,
        )

    # --- the engine side ---
    def read_batch(self, B: int, image_rows: list[int]) -> tuple[StepBatch, RowControls]:
        """Views into the block, valid until the result is written."""
        a = self._arrays
        batch = StepBatch(
            a["audio_in"][:B],
            a["text_in"][:B],
            a["source"][:B],
            a["forced"][:B],
            list(image_rows),
            a["images"][: len(image_rows)],
        )
        return batch, RowControls(a["wait_offset"][:B], a["voiced"][:B])

    def write_result(self, result: StepResult) -> None:
        a, B = self._arrays, len(result.audio)
        a["audio_out"][:B] = result.audio
        a["text_out"][:B] = result.text_tokens
        a["heard"][:B] = result.heard_tokens
        a["turn_index"][:B] = result.turn_index
