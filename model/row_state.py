"""Every per-row tensor of the runner, as one dataclass with row-wise reset and move.

Contract: each field is a tensor whose first dim is the row (max_slots rows). `reset(mask, first_pos)`
puts the masked rows in the state of a conversation that has not run a turn (fields marked `kept`
excepted, see `carry`); `move_row(src, dst)` copies a row's whole state onto another row. Both write
in place: CUDA graphs captured over these tensors keep reading the same storage. A new per-row field
joins both operations by being a field.

Legend: S rows (max_slots), k frames per audio token, C dMel channels, G grid patches per frame,
P values per patch. This module knows nothing about sessions, the model or the cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .config import ModelConfig


@dataclass
class RowState:
    next_pos: torch.Tensor  # (S,) long: next conversation position (reset to the first one)
    turn: torch.Tensor  # (S,) long: micro-turns run since join
    # (S, k, C) long: the last audio-out token, fed back at the next turn's start. Kept by `reset`: a
    # first turn's carried position writes only to the trash cell, but its value still takes part in
    # the MoE routing of that turn, so a reset here would change a rejoined row's numerics (~1e-7)
    carry: torch.Tensor = field(metadata={"kept": True})
    has_carry: torch.Tensor  # (S,) bool: carry holds a real token (False on a row's first turn)
    patches: torch.Tensor  # (S, G, P) model dtype: patches of the latest camera frame (0 = none yet)
    text_temp: torch.Tensor  # (S,) float: text-out temperature, 0 = greedy
    text_top_k: torch.Tensor  # (S,) long: text-out top-k, 0 = whole vocabulary
    audio_temp: torch.Tensor  # (S,) float: audio-out temperature, 0 = greedy
    audio_top_k: torch.Tensor  # (S,) long: audio-out top-k, 0 = all bins
    seed: torch.Tensor  # (S,) long: the row's sampling seed
    wait_bias: torch.Tensor  # (S,) float: nats added to PAD while idle (checkpoint's default + session's)
    # (S,) float: this turn's extra nats on PAD while idle (SlotInput.wait_bias_offset). A per-turn
    # input, not state: each step writes rows [0, B) before generating. It lives here, in place, so
    # the CUDA graphs captured over these tensors read each turn's values from the same storage
    wait_offset: torch.Tensor
    # (S,) bool: no text-out since the last EPAD; a fresh conversation starts idle
    idle: torch.Tensor = field(metadata={"fresh": True})

    @classmethod
    def allocate(cls, cfg: ModelConfig, slots: int, dtype: torch.dtype, device: torch.device) -> RowState:
        """Rows as after `reset` at position 0 (sampling all zeros: greedy, until set)."""
        grid = (cfg.image_size // cfg.patch_size) ** 2
        long = {"dtype": torch.long, "device": device}
        return cls(
            next_pos=torch.zeros(slots, **long),
            turn=torch.zeros(slots, **long),
            carry=torch.zeros(slots, cfg.frames_per_audio_token, cfg.dmel_channels, **long),
            has_carry=torch.zeros(slots, dtype=torch.bool, device=device),
            patches=torch.zeros(slots, grid, cfg.patch_dim, dtype=dtype, device=device),
            text_temp=torch.zeros(slots, device=device),
            text_top_k=torch.zeros(slots, **long),
            audio_temp=torch.zeros(slots, device=device),
            audio_top_k=torch.zeros(slots, **long),
            seed=torch.zeros(slots, **long),
            wait_bias=torch.zeros(slots, device=device),
            wait_offset=torch.zeros(slots, device=device),
            idle=torch.ones(slots, dtype=torch.bool, device=device),
        )

    def _tensors(self) -> list[tuple[dataclasses.Field, torch.Tensor]]:
        return [(f, getattr(self, f.name)) for f in dataclasses.fields(self)]

    def reset(self, mask: torch.Tensor, first_pos: int) -> None:
        """Rows where mask (S,) bool is True start a conversation at position `first_pos`."""
        for f, t in self._tensors():
            if not f.metadata.get("kept"):
                t.masked_fill_(mask.view(-1, *[1] * (t.dim() - 1)), f.metadata.get("fresh", 0))
        self.next_pos.masked_fill_(mask, first_pos)

    def move_row(self, src: int, dst: int) -> None:
        for _, t in self._tensors():
            t[dst] = t[src]
