"""The ear: a small convolutional front-end over the user's dMel codes, added to their embedding.

Contract: `Ear(cfg)(codes)` maps the user's audio-in codes (B, T, k, C) to (B, T, D), to be added to
`InteractionModel.embed_audio(codes)` on the audio-in positions only (the model's own speech keeps the
plain embedding). Its output projection starts at zero, so a checkpoint grown an ear computes exactly
what it computed before, and fine-tuning decides how much the ear adds.

Why: the audio embedding is a linear map of one-hot codes, which must learn a sound again at every
mel position a speaker puts it. A new voice moves formants along the mel axis (a longer or shorter
vocal tract) and tilts the spectrum; convolutions along the mel axis see a formant pattern wherever it
sits, and each frame's levels are taken relative to that frame's mean, so the microphone's gain is
gone before the first layer. The convolutions stay inside one audio token (k frames): a token's
embedding depends on its own codes only, as `embed_audio`'s does, so streaming needs no state.

This module knows nothing about sessions, training or signal processing beyond the code grid.

Legend: B batch rows, T audio tokens, k dMel frames per token, C dMel channels, E ear channels,
D d_model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

KERNEL = (3, 5)  # (frames, mel channels) of every convolution
PADDING = (1, 2)  # keeps the frame count, and the mel count at stride 1
MEL_STRIDES = (1, 2, 2)  # mel-axis stride of each convolution: 80 -> 80 -> 40 -> 20
LEVEL_SCALE = 0.25  # codes relative to their frame's mean, scaled to about unit spread


def ear_mel_out(channels: int) -> int:
    """Mel positions left after the strided convolutions."""
    for stride in MEL_STRIDES:
        channels = (channels + 2 * PADDING[1] - KERNEL[1]) // stride + 1
    return channels


class Ear(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E = cfg.ear_channels
        self.convs = nn.ModuleList(
            nn.Conv2d(1 if i == 0 else E, E, KERNEL, stride=(1, s), padding=PADDING)
            for i, s in enumerate(MEL_STRIDES))
        self.proj = nn.Linear(E * cfg.frames_per_audio_token * ear_mel_out(cfg.dmel_channels), cfg.d_model,
                              bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T, k, C) in [0, L) -> (B, T, D)"""
        B, T, k, C = codes.shape
        levels = codes.to(self.proj.weight.dtype)
        x = (levels - levels.mean(-1, keepdim=True)) * LEVEL_SCALE  # (B, T, k, C), gain removed
        x = x.reshape(B * T, 1, k, C)
        for conv in self.convs:
            x = F.gelu(conv(x))  # (B*T, E, k, C')
        return self.proj(x.reshape(B, T, -1))
