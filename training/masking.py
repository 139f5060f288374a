"""SpecAugment-style masks on the user's dMel codes (Park et al., 2019), for training batches only.

Contract: `mask_user_codes(codes, spans, masks, rng)` returns a copy of the user's codes
(B, frames, C) where, within each user utterance's frames, `masks.freq_masks` bands of up to
`masks.freq_width` mel channels and `masks.time_masks` spans of up to `masks.time_width` frames hold
the utterance's own mean code of each channel instead of its values. The mean keeps the channel's
level (a hole at the silence code would read as a band-stop filter or a pause), and time masks are
far shorter than the pauses the model must wait through, so turn-taking cues stay. It makes the
model hear words from more than one spectral cue, the way a held-out speaker needs it to: a new
vocal tract moves the cues one speaker's words are learnt by.
The draws come from the caller's generator, a fixed number per utterance whatever is masked.
Written by hand: torchaudio's FrequencyMasking / TimeMasking fill with one constant and know nothing
of utterance spans or integer codes. This module knows nothing of conversations, models or audio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CodeMasks:
    """Which training conversations' user codes are masked, and how (0 rate: never)."""

    rate: float = 0.0  # conversations whose user utterances are masked
    freq_masks: int = 2  # mel-channel bands masked per utterance
    freq_width: int = 16  # widest band, in mel channels (of 80)
    time_masks: int = 2  # frame spans masked per utterance
    time_width: int = 3  # widest span, in 12.5 ms frames (shorter than any pause the model waits through)


def mask_user_codes(codes: torch.Tensor, spans: list[list[tuple[int, int]]], masks: CodeMasks,
                    rng: np.random.Generator) -> torch.Tensor:
    """codes (B, F, C) long; spans[b] = that row's utterances as (first, end) frames -> masked copy."""
    out = codes.clone()
    B, F, C = codes.shape
    for b in range(B):
        hit = rng.random() < masks.rate
        for first, end in spans[b]:
            first, end = max(0, first), min(F, end)
            draws = rng.random((masks.freq_masks + masks.time_masks, 2))  # fixed draws per utterance
            if not hit or end - first < 2:
                continue
            fill = out[b, first:end].float().mean(0).round().long()  # (C,) the utterance's mean code
            for u, v in draws[: masks.freq_masks]:
                width = int(u * (masks.freq_width + 1))
                lo = int(v * (C - width + 1))
                out[b, first:end, lo : lo + width] = fill[lo : lo + width]
            for u, v in draws[masks.freq_masks :]:
                width = min(int(u * (masks.time_width + 1)), end - first)
                lo = first + int(v * (end - first - width + 1))
                out[b, lo : lo + width] = fill
    return out
