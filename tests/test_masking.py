"""SpecAugment masks on the user's dMel codes: where they fall, what they hold, and that a curriculum
with them changes nothing but the user's codes inside what the user said."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from microturn.model.config import tiny
from microturn.training.curricula import CURRICULA, Curriculum
from microturn.training.data import DuplexGenerator
from microturn.training.masking import CodeMasks, mask_user_codes

C = 80


def _codes(rows: int, frames: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 16, (rows, frames, C)))


def test_masks_fall_inside_the_utterances_and_hold_each_channels_mean() -> None:
    codes = _codes(2, 200)
    spans = [[(10, 60), (100, 150)], [(0, 40)]]
    masks = CodeMasks(rate=1.0, freq_masks=2, freq_width=16, time_masks=2, time_width=3)
    out = mask_user_codes(codes, spans, masks, np.random.default_rng(1))
    inside = torch.zeros(2, 200, dtype=torch.bool)
    for b, row in enumerate(spans):
        for first, end in row:
            inside[b, first:end] = True
    changed = (out != codes).any(-1)  # (B, F)
    assert changed.any()
    assert not (changed & ~inside).any(), "a mask reached a frame the user said nothing in"
    for b, row in enumerate(spans):
        for first, end in row:
            fill = codes[b, first:end].float().mean(0).round().long()
            diff = out[b, first:end] != codes[b, first:end]  # (frames, C)
            assert torch.equal(out[b, first:end][diff], fill.expand(end - first, C)[diff])
            # a frequency band covers every frame of the utterance; channels masked that way are at
            # most two bands of 16, and a time span at most 3 frames
            whole = (out[b, first:end] == fill).all(0) & diff.any(0)
            assert int(whole.sum()) <= 2 * 16
            assert int((diff & ~whole[None]).any(-1).sum()) <= 2 * 3


def test_no_rate_no_change_and_the_same_draws_either_way() -> None:
    codes = _codes(3, 120, seed=2)
    spans = [[(5, 50)], [(0, 30), (60, 100)], []]
    off, on = np.random.default_rng(7), np.random.default_rng(7)
    assert torch.equal(mask_user_codes(codes, spans, CodeMasks(rate=0.0), off), codes)
    mask_user_codes(codes, spans, CodeMasks(rate=1.0), on)
    assert off.random() == on.random(), "masking moved the generator differently from not masking"


def test_masking_replays_from_its_generator() -> None:
    codes, spans, masks = _codes(2, 100, seed=3), [[(0, 80)], [(20, 90)]], CodeMasks(rate=0.5)
    first = mask_user_codes(codes, spans, masks, np.random.default_rng(11))
    again = mask_user_codes(codes, spans, masks, np.random.default_rng(11))
    assert torch.equal(first, again)


def test_a_masked_curriculum_changes_only_the_users_codes_where_the_user_speaks() -> None:
    cfg = tiny()
    plain = DuplexGenerator(cfg, seed=5, turns=24, curriculum=Curriculum())
    masked = DuplexGenerator(cfg, seed=5, turns=24, curriculum=dataclasses.replace(
        Curriculum(), masks=CodeMasks(rate=1.0)))
    p0, t0, h0 = plain.batch(0, 3)
    p1, t1, h1 = masked.batch(0, 3)
    assert torch.equal(p0, p1) and torch.equal(h0.targets, h1.targets)
    for name in ("ctrl", "patches", "text_in", "text_out", "audio_out"):
        assert torch.equal(getattr(t0, name), getattr(t1, name)), name
    B, shape = t0.audio_in.shape[0], t0.audio_in.shape
    changed = (t0.audio_in != t1.audio_in).view(B, -1, shape[-1]).any(-1)  # (B, frames)
    assert changed.any()
    convs = [plain.conversation(i) for i in range(3)]
    hop = plain.dmel.cfg.hop
    for b, conv in enumerate(convs):
        said = torch.zeros(changed.shape[1], dtype=torch.bool)
        for start, end, _ in conv.user_said:
            said[start // hop : -(-end // hop)] = True
        assert not (changed[b] & ~said).any()


def test_the_hear_masked_curriculum_masks_most_conversations() -> None:
    masks = CURRICULA["hear-masked"].masks
    assert masks.rate >= 0.5 and masks.freq_masks and masks.time_masks
    assert dataclasses.replace(CURRICULA["hear-masked"], masks=CodeMasks()) == CURRICULA["hear-colours"]
