"""Model configuration and presets.

A `ModelConfig` fully determines the network's shapes and the micro-turn
layout; it is what a checkpoint's config JSON holds. Presets are plain
functions returning configs. This module knows nothing about devices,
sessions or servers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    # --- transformer ---
    d_model: int = 256  # residual width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 2  # key/value heads (GQA: n_heads % n_kv_heads == 0)
    rope_theta: float = 10000.0  # RoPE base; angles are computed in float64
    norm_eps: float = 1e-5  # RMSNorm epsilon
    # --- mixture of experts FFN ---
    n_experts: int = 8  # routed experts per layer
    top_k: int = 2  # experts chosen per token (weights renormalised over the k)
    d_expert: int = 640  # hidden width of one routed expert (SwiGLU)
    n_shared_experts: int = 0  # always-on shared experts (0 = none)
    d_shared: int = 512  # hidden width of the shared expert
    aux_loss_coef: float = 0.01  # Switch load-balancing loss weight (training)
    z_loss_coef: float = 0.001  # router z-loss weight (training)
    # --- vocabularies and streams ---
    text_vocab: int = 272  # 256 bytes + specials (see model/tokenizer.py)
    dmel_channels: int = 80  # mel channels per dMel frame
    dmel_bins: int = 16  # discrete levels per channel
    frames_per_audio_token: int = 4  # k: dMel frames per audio token (4 x 12.5 ms = 50 ms)
    d_channel_embed: int = 8  # per-channel embedding width before the audio projection
    ear_channels: int = 0  # channels of the user-audio conv front-end (model/ear.py); 0 = none
    # --- video (encoder-free patches of the latest camera frame) ---
    video_patches: int = 4  # patches per micro-turn (0 = audio only)
    image_size: int = 32  # the frame is resized to image_size x image_size
    patch_size: int = 16  # square patch side; (image_size / patch_size)^2 >= video_patches
    # --- micro-turn layout (fixed positions per session per tick) ---
    text_in_slots: int = 4  # user text / background results per micro-turn
    text_out_slots: int = 4  # text tokens generated per micro-turn (before the audio)
    audio_tokens: int = 4  # audio tokens per micro-turn each side (4 x 50 ms = 200 ms)
    # --- attention memory ---
    window: int = 512  # sliding attention window in tokens (~4.9 s for tiny; KV reads dominate CPU decode)
    prefix_len: int = 64  # pinned prefix (instructions) capacity in tokens, never evicted

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be a multiple of n_heads")
        if self.ear_channels < 0:
            raise ValueError("ear_channels must be 0 (no ear) or more")
        if self.top_k > self.n_experts:
            raise ValueError("top_k must not exceed n_experts")
        grid = self.image_size // self.patch_size
        if self.video_patches > grid * grid:
            raise ValueError("video_patches exceeds the patch grid of one frame")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def input_positions(self) -> int:
        """CTRL + video + audio-in + text-in."""
        return 1 + self.video_patches + self.audio_tokens + self.text_in_slots

    @property
    def output_positions(self) -> int:
        """text-out + audio-out."""
        return self.text_out_slots + self.audio_tokens

    @property
    def positions_per_turn(self) -> int:
        return self.input_positions + self.output_positions

    @property
    def dmel_frames_per_turn(self) -> int:
        return self.audio_tokens * self.frames_per_audio_token

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size

    @property
    def audio_logits(self) -> int:
        return self.frames_per_audio_token * self.dmel_channels * self.dmel_bins

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {unknown}")
        return cls(**data)


def tiny() -> ModelConfig:
    """~19M params, the CPU default: 16+ sessions in real time on 2 cores.

    Shallow on purpose: a CPU decode step is bound by per-layer call overhead and weight
    bandwidth (8 sequential forwards per micro-turn), so 4 wide layers beat 6 narrow ones.
    """
    return ModelConfig()


def small() -> ModelConfig:
    """~750M total, ~150M active params: one GPU, hundreds of sessions."""
    return ModelConfig(
        d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, n_experts=16, top_k=2,
        d_expert=1536, n_shared_experts=1, d_shared=1536, video_patches=16, image_size=128,
        text_in_slots=8, text_out_slots=8, window=2048, prefix_len=256,
    )


def base() -> ModelConfig:
    """~7.9B total, ~1.5B active params: a product-size model on one large GPU."""
    return ModelConfig(
        d_model=1536, n_layers=24, n_heads=16, n_kv_heads=4, n_experts=32, top_k=4,
        d_expert=2048, n_shared_experts=1, d_shared=4096, video_patches=16, image_size=128,
        text_in_slots=8, text_out_slots=8, window=4096, prefix_len=1024, d_channel_embed=16,
    )


def interaction_small() -> ModelConfig:
    """The paper shape, on paper only: ~276B total, ~12B active parameters."""
    return ModelConfig(
        d_model=4096, n_layers=48, n_heads=32, n_kv_heads=8, n_experts=160, top_k=4,
        d_expert=2864, n_shared_experts=1, d_shared=4352, video_patches=64, image_size=448,
        patch_size=28, text_in_slots=16, text_out_slots=16, window=32768, prefix_len=4096,
        text_vocab=65536, d_channel_embed=32,
    )


PRESETS = {"tiny": tiny, "small": small, "base": base, "interaction-small": interaction_small}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
