"""The micro-turn layout: which token sits in which of the fixed positions.

One micro-turn per session is `positions_per_turn` positions:

    [CTRL][video x V][audio-in x A][text-in x Ti] | [text-out x To][audio-out x A]

The token in output slot o is predicted by the position before it (the last
text-in slot predicts text-out 0). Text comes before audio, so text leads
speech. Each position's embedding = token embedding + slot-type embedding
(+ source embedding on text-in: user or background). The pinned prefix
(instructions) sits at positions 0..L-1; conversation positions start at
`prefix_len`, one micro-turn after another.

This module is the one place that lays tokens out, used alike by the engine
(one micro-turn at a time) and by offline forwards (training, reference
tests), so the two can only agree. It knows nothing about caches or sessions.

Legend: B rows, N micro-turns, V video patches, A audio tokens, k frames per
audio token, C dMel channels, Ti/To text-in/out slots, P positions per turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .kv_cache import sequence_mask
from .transformer import InteractionModel


@dataclass
class Turns:
    """N micro-turns of B rows, every stream as ids/values."""

    ctrl: torch.Tensor  # (B, N) long: BOS on a session's first turn, CTRL after
    patches: torch.Tensor  # (B, N, V, 3*p*p) float in [0, 1]
    patch_idx: torch.Tensor  # (B, N, V) long: grid index of each patch
    audio_in: torch.Tensor  # (B, N, A, k, C) long dMel codes
    text_in: torch.Tensor  # (B, N, Ti) long
    source: torch.Tensor  # (B, N, Ti) long: 0 user, 1 background
    text_out: torch.Tensor  # (B, N, To) long
    audio_out: torch.Tensor  # (B, N, A, k, C) long


def embed_inputs(
    model: InteractionModel,
    ctrl: torch.Tensor,  # (B,)
    patches: torch.Tensor,  # (B, V, 3*p*p)
    patch_idx: torch.Tensor,  # (B, V)
    audio_in: torch.Tensor,  # (B, A, k, C)
    text_in: torch.Tensor,  # (B, Ti)
    source: torch.Tensor,  # (B, Ti)
) -> torch.Tensor:
    """The input positions of one micro-turn -> (B, 1 + V + A + Ti, D)."""
    parts = [model.embed_text(ctrl[:, None])]
    if patches.shape[1]:
        parts.append(model.embed_video(patches, patch_idx))
    parts.append(model.embed_heard(audio_in))
    parts.append(model.embed_text(text_in) + model.source_embed(source))
    x = torch.cat(parts, dim=1)
    return x + model.slot_embed[: x.shape[1]]


def embed_output(model: InteractionModel, slot: int, token: torch.Tensor) -> torch.Tensor:
    """Token in output slot `slot` (0..To+A-1): text ids (B, T) or audio codes (B, T, k, C) -> (B, T, D)."""
    cfg = model.cfg
    e = model.embed_text(token) if slot < cfg.text_out_slots else model.embed_audio(token)
    return e + model.slot_embed[cfg.input_positions + slot]


def embed_outputs(model: InteractionModel, text_out: torch.Tensor, audio_out: torch.Tensor) -> torch.Tensor:
    """text_out (B, To), audio_out (B, A, k, C) -> (B, To + A, D)."""
    cfg = model.cfg
    x = torch.cat([model.embed_text(text_out), model.embed_audio(audio_out)], dim=1)
    return x + model.slot_embed[cfg.input_positions :]


def embed_sequence(
    model: InteractionModel, prefix: torch.Tensor, turns: Turns
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefix ids (B, L) + N whole turns -> x (B, L + N*P, D), pos (B, L + N*P), is_prefix (B, L + N*P)."""
    cfg = model.cfg
    B, L = prefix.shape
    N = turns.ctrl.shape[1]
    # every turn of every row at once, as B*N rows of one turn (per-turn calls cost ~200 small ops)
    rows = {k: v.flatten(0, 1) for k, v in vars(turns).items()}  # (B*N, ...)
    inputs = embed_inputs(model, rows["ctrl"], rows["patches"], rows["patch_idx"], rows["audio_in"],
                          rows["text_in"], rows["source"])  # (B*N, Pin, D)
    outputs = embed_outputs(model, rows["text_out"], rows["audio_out"])  # (B*N, Pout, D)
    body = torch.cat([inputs, outputs], dim=1).view(B, N * cfg.positions_per_turn, -1)
    x = torch.cat([model.embed_text(prefix), body], dim=1) if L else body
    conv = cfg.prefix_len + torch.arange(N * cfg.positions_per_turn, device=x.device)
    pos = torch.cat([torch.arange(L, device=x.device), conv])[None].expand(B, -1)
    is_prefix = (pos < L) & (torch.arange(pos.shape[1], device=x.device) < L)
    return x, pos, is_prefix


def sequence_hidden(model: InteractionModel, prefix: torch.Tensor, turns: Turns) -> tuple[torch.Tensor, list]:
    """Offline (teacher-forced) forward over whole turns with the inference mask.

    -> final hidden states of the conversation positions (B, N, P, D), router losses.
    """
    cfg = model.cfg
    x, pos, is_prefix = embed_sequence(model, prefix, turns)
    h, losses = model(x, pos, sequence_mask(pos, is_prefix, cfg.window))
    B, L = prefix.shape
    return h[:, L:].view(B, turns.ctrl.shape[1], cfg.positions_per_turn, -1), losses


def output_logits(model: InteractionModel, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (B, N, P, D) -> text-out logits (B, N, To, vocab), audio-out (B, N, A, k, C, L)."""
    cfg = model.cfg
    pred = h[:, :, cfg.input_positions - 1 : cfg.positions_per_turn - 1]  # (B, N, To + A, D)
    To = cfg.text_out_slots
    return model.text_logits(pred[:, :, :To]), model.audio_logits(pred[:, :, To:])


def audio_in_hidden(cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, N, P, D) -> those of the audio-in positions in time order (B, N*A, D)."""
    first = 1 + cfg.video_patches
    return h[:, :, first : first + cfg.audio_tokens].flatten(1, 2)


def sequence_logits(
    model: InteractionModel, prefix: torch.Tensor, turns: Turns
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Offline forward -> text logits (B, N, To, vocab), audio logits (B, N, A, k, C, L), router losses."""
    h, losses = sequence_hidden(model, prefix, turns)
    return *output_logits(model, h), losses


def patch_indices(turn_index: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Which grid patches micro-turn t shows: turn_index (B,) -> (B, V); a large grid is swept over turns."""
    grid = (cfg.image_size // cfg.patch_size) ** 2
    v = torch.arange(cfg.video_patches, device=turn_index.device)
    return (turn_index[:, None] * cfg.video_patches + v) % grid
