"""Host-side bookkeeping of the engine's session slots: slot ids <-> rows, input checks, text decoding.

Contract
- Slot ids are stable handles in [0, max_slots); `join` takes the lowest free one (raises
  `EngineFull`), `leave` frees it.
- Joined slots always occupy rows [0, n) in join order, so a step computes exactly n rows;
  `leave` moves the last row into the hole and returns that move as (src, dst) rows, which
  whoever holds per-row state must mirror.
- `pack` turns the sessions' `SlotInput`s into one `StepBatch` and the rows' per-tick
  `RowControls` (wait bias offset, audio on/off) for the n rows: a missing input is silence, and
  a bad one (wrong shape, non-finite samples, bad token ids, bad image, an offset beyond
  MAX_WAIT_BIAS_OFFSET) is replaced by silence with default controls and reported as that slot's
  error; other rows are untouched.
- `unpack` turns the runner's `StepResult` back into a `SlotOutput` per slot, decoding each slot's
  text-out with its own streaming decoder.

This module holds no tensors and does not import torch: it knows nothing about the model, the
cache or devices, and sees camera frames only through the `patchify` function it is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .slots import MAX_WAIT_BIAS_OFFSET, TURN_SAMPLES, RowControls, SlotInput, SlotOutput
from .step_io import StepBatch, StepResult
from .tokenizer import ByteTokenizer, TextOutDecoder


class EngineFull(RuntimeError):
    """Every slot is taken."""


@dataclass
class _SlotMeta:
    """Host-side bookkeeping of one joined slot."""

    slot: int  # the session's stable handle
    decoder: TextOutDecoder  # streaming decoder of this slot's text-out (holds partial UTF-8, markers)


class SlotTable:
    def __init__(
        self,
        cfg: ModelConfig,
        max_slots: int,
        tokenizer: ByteTokenizer,
        patchify: Callable[[np.ndarray], np.ndarray],  # RGB uint8 (H, W, 3) -> (G, P) float32 patches
    ) -> None:
        self.cfg = cfg
        self.max_slots = max_slots
        self.tokenizer = tokenizer
        self._patchify = patchify
        self._rows: list[_SlotMeta] = []  # row -> slot
        self._row_of: dict[int, int] = {}  # slot -> row

    @property
    def slots(self) -> list[int]:
        """Joined slot ids in row order."""
        return [m.slot for m in self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, slot: int) -> int:
        return self._row_of[slot]

    def join(self) -> tuple[int, int]:
        """-> (slot, row) of a newly joined slot; the row is the first free one, n."""
        if len(self._rows) >= self.max_slots:
            raise EngineFull(f"all {self.max_slots} slots are taken")
        slot = min(set(range(self.max_slots)) - set(self._row_of))
        row = len(self._rows)
        self._rows.append(_SlotMeta(slot, TextOutDecoder(self.tokenizer)))
        self._row_of[slot] = row
        return slot, row

    def leave(self, slot: int) -> tuple[int, int] | None:
        """Free `slot`; -> the row move (src, dst) that keeps rows contiguous, None if it was last."""
        row = self._row_of.pop(slot)
        last = len(self._rows) - 1
        move = None
        if row != last:
            self._rows[row] = self._rows[last]
            self._row_of[self._rows[row].slot] = row
            move = (last, row)
        self._rows.pop()
        return move

    def prefix_ids(self, instructions: str) -> list[int]:
        """The pinned prefix: INSTR + instruction bytes, truncated to prefix_len."""
        return [self.tokenizer.special.INSTR, *self.tokenizer.encode(instructions)][: self.cfg.prefix_len]

    # --- the tick ---
    def pack(self, inputs: dict[int, SlotInput]) -> tuple[StepBatch, RowControls, list[str | None]]:
        """The joined slots' inputs as one batch and its rows' controls in row order, and each row's
        refusal reason."""
        cfg, sp = self.cfg, self.tokenizer.special
        checked = [self._validate(inputs.get(m.slot)) for m in self._rows]
        B = len(checked)
        audio = np.stack([inp.audio for inp, _ in checked]).astype(np.float32)
        text_in = np.full((B, cfg.text_in_slots), sp.PAD, dtype=np.int64)
        source = np.zeros((B, cfg.text_in_slots), dtype=np.int64)
        forced = np.full((B, cfg.text_out_slots), -1, dtype=np.int64)
        image_rows, images, errors = [], [], [error for _, error in checked]
        for b, (inp, _) in enumerate(checked):
            if inp.text_in:
                text_in[b, : len(inp.text_in)] = inp.text_in
                source[b] = int(inp.text_in_background)
            if inp.force_text_out:
                forced[b, : len(inp.force_text_out)] = inp.force_text_out
            if inp.image is not None:
                try:
                    patches = self._patchify(inp.image)
                except Exception as exc:  # one row's frame must not cost the whole batch its step
                    errors[b] = f"image could not be patchified: {exc}"
                else:
                    image_rows.append(b)
                    images.append(patches)
        grid = (cfg.image_size // cfg.patch_size) ** 2
        stacked = np.stack(images) if images else np.zeros((0, grid, cfg.patch_dim), np.float32)
        batch = StepBatch(audio, text_in, source, forced, image_rows, stacked)
        controls = RowControls(
            np.array([inp.wait_bias_offset for inp, _ in checked], np.float32).reshape(B),  # (B,)
            np.array([inp.audio_out for inp, _ in checked], np.bool_).reshape(B),  # (B,)
        )
        return batch, controls, errors

    def unpack(self, result: StepResult, errors: list[str | None]) -> dict[int, SlotOutput]:
        outputs = {}
        for b, meta in enumerate(self._rows):
            tokens = result.text_tokens[b]
            decoded = meta.decoder.feed(tokens)
            outputs[meta.slot] = SlotOutput(
                audio=result.audio[b], text_tokens=tokens, text=decoded.text, task_texts=decoded.task_texts,
                turn_index=result.turn_index[b], error=errors[b], heard_tokens=result.heard_tokens[b],
            )
        return outputs

    def _validate(self, inp: SlotInput | None) -> tuple[SlotInput, str | None]:
        """The row's input, or silence and the reason it was refused (other rows are unaffected)."""
        silence = SlotInput(audio=np.zeros(TURN_SAMPLES, np.float32))
        if inp is None:
            return silence, None
        try:
            return self._check(inp, silence)
        except (TypeError, ValueError, AttributeError) as exc:  # non-numeric audio, ids not ints
            return silence, f"malformed slot input: {exc}"

    def _check(self, inp: SlotInput, silence: SlotInput) -> tuple[SlotInput, str | None]:
        audio = np.asarray(inp.audio)
        if audio.shape != (TURN_SAMPLES,) or not np.isfinite(audio).all():
            return silence, f"audio must be {TURN_SAMPLES} finite samples, got shape {audio.shape}"
        vocab = self.tokenizer.vocab_size
        if len(inp.text_in) > self.cfg.text_in_slots or any(not 0 <= t < vocab for t in inp.text_in):
            return silence, f"text_in must be at most {self.cfg.text_in_slots} valid token ids"
        if len(inp.force_text_out) > self.cfg.text_out_slots or any(
            not 0 <= t < vocab for t in inp.force_text_out
        ):
            return silence, f"force_text_out must be at most {self.cfg.text_out_slots} valid token ids"
        if inp.image is not None:
            img = inp.image
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
                return silence, "image must be an (H, W, 3) uint8 RGB array"
        limit = f"a finite number of nats within +-{MAX_WAIT_BIAS_OFFSET:g}"
        try:
            offset = float(inp.wait_bias_offset)
        except (TypeError, ValueError):
            return silence, f"wait_bias_offset must be {limit}, got {type(inp.wait_bias_offset).__name__}"
        if not math.isfinite(offset) or abs(offset) > MAX_WAIT_BIAS_OFFSET:
            return silence, f"wait_bias_offset must be {limit}, got {offset}"
        if not isinstance(inp.audio_out, bool | np.bool_):  # "no" or 0.0 would read as a setting
            return silence, f"audio_out must be a bool, got {type(inp.audio_out).__name__}"
        return inp, None
