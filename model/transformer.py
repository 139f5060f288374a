"""The interaction model: a decoder-only MoE transformer over micro-turn tokens.

Inputs are embeddings (the caller embeds text, audio, video with the model's
`embed_*` functions, see model/layout.py for the micro-turn layout); the
trunk is RMSNorm -> GQA attention with RoPE (angles in float64) -> RMSNorm ->
MoE SwiGLU, and two heads read the final hidden states: text logits and
audio logits (an independent softmax per (frame, channel)). Parameters are
exactly those counted in model/params.py.

`forward` runs either a full sequence (cache=None, an explicit mask) or a
chunk through the ring KV cache (rows of the cache, cells and positions of the
chunk). This module knows nothing about sessions, sampling, clocks or audio
signal processing.

Legend: B batch rows, T positions, S cache cells, D d_model, H query heads,
Hk kv heads, hd head dim, V video patches, A audio tokens, k dMel frames per
audio token, C dMel channels, L levels (bins) per channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .ear import Ear
from .kv_cache import KVCache
from .moe import MoE, RouterLosses


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the fused op: one kernel instead of eight small ones (they dominate CPU decode steps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(pos: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """pos (B, T) int64 -> cos, sin (B, 1, T, hd/2); float64 angles so huge positions stay exact."""
    angles = pos.to(torch.float64)[..., None] * inv_freq  # (B, T, hd/2)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd) rotated by position (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row on CPU: grouped heads as one batched matmul, faster than SDPA's CPU kernel here.

    q (B, H, 1, hd), k/v (B, Hk, S, hd), mask (B, 1, 1, S) -> (B, H, 1, hd)
    """
    B, H, _, hd = q.shape
    Hk = k.shape[1]
    # k @ q^T keeps the big operand (the cache) contiguous: no per-call copy of K (bf16 would make one)
    scores = k @ q.view(B, Hk, H // Hk, hd).transpose(-1, -2) * hd**-0.5  # (B, Hk, S, G)
    scores = scores.masked_fill(~mask.view(B, 1, -1, 1), float("-inf"))
    probs = scores.float().softmax(dim=-2).to(v.dtype)  # (B, Hk, S, G)
    return (probs.transpose(-1, -2) @ v).view(B, H, 1, hd)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # q, k and v projections fused: one matmul per layer instead of three
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,  # (B, 1, T, S) bool
        cache: KVCache | None,
        layer: int,
        rows: slice,
        cells: torch.Tensor | None,  # (B, T)
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hk, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split((H * hd, Hk * hd, Hk * hd), dim=-1)
        q = q.view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, Hk, hd).transpose(1, 2)  # (B, Hk, T, hd)
        v = v.view(B, T, Hk, hd).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            cache.write(layer, rows, cells, k, v)
            k, v = cache.read(layer, rows)  # (B, Hk, S, hd)
        if T == 1 and x.device.type == "cpu":
            out = decode_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_backend: str) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe = MoE(cfg, moe_backend)

    def forward(self, x, rope, mask, cache, layer, rows, cells) -> tuple[torch.Tensor, RouterLosses | None]:
        x = x + self.attn(self.attn_norm(x), rope, mask, cache, layer, rows, cells)
        B, T, D = x.shape
        y, losses = self.moe(self.ffn_norm(x).reshape(B * T, D))
        return x + y.view(B, T, D), losses


class InteractionModel(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_backend: str = "grouped_mm") -> None:
        super().__init__()
        self.cfg = cfg
        D, C, L = cfg.d_model, cfg.dmel_channels, cfg.dmel_bins
        self.text_embed = nn.Embedding(cfg.text_vocab, D)
        self.audio_embed = nn.Embedding(C * L, cfg.d_channel_embed)
        self.audio_proj = nn.Linear(cfg.frames_per_audio_token * C * cfg.d_channel_embed, D, bias=False)
        self.ear = Ear(cfg) if cfg.ear_channels else None
        self.video_proj = nn.Linear(cfg.patch_dim, D)
        grid = cfg.image_size // cfg.patch_size
        self.video_pos = nn.Parameter(torch.randn(grid * grid, D) * 0.02)
        self.slot_embed = nn.Parameter(torch.randn(cfg.positions_per_turn, D) * 0.02)
        self.source_embed = nn.Embedding(2, D)
        self.layers = nn.ModuleList(Block(cfg, moe_backend) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.text_head = nn.Linear(D, cfg.text_vocab, bias=False)
        self.audio_head = nn.Linear(D, cfg.audio_logits, bias=False)
        half = torch.arange(0, cfg.head_dim, 2, dtype=torch.float64)
        inv_freq = 1.0 / cfg.rope_theta ** (half / cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("channel_offset", torch.arange(C) * L, persistent=False)

    def set_moe_backend(self, backend: str) -> None:
        for block in self.layers:
            block.moe.backend = backend

    # --- embeddings ---
    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> (B, T, D)"""
        return self.text_embed(ids)

    def embed_audio(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T, k, C) in [0, L) -> (B, T, D)"""
        e = self.audio_embed(codes + self.channel_offset)  # (B, T, k, C, e)
        return self.audio_proj(e.flatten(2))

    def embed_heard(self, codes: torch.Tensor) -> torch.Tensor:
        """The user's audio-in codes (B, T, k, C) -> (B, T, D): the audio embedding plus the ear's."""
        e = self.embed_audio(codes)
        return e if self.ear is None else e + self.ear(codes)

    def embed_video(self, patches: torch.Tensor, patch_idx: torch.Tensor) -> torch.Tensor:
        """patches (B, V, 3*p*p) in [0, 1], patch_idx (B, V) grid index -> (B, V, D)"""
        return self.video_proj(patches) + self.video_pos[patch_idx]

    # --- trunk and heads ---
    def forward(
        self,
        x: torch.Tensor,  # (B, T, D) embeddings
        pos: torch.Tensor,  # (B, T) absolute positions
        mask: torch.Tensor,  # (B, 1, T, S) bool; S = T without cache
        cache: KVCache | None = None,
        rows: slice = slice(None),
        cells: torch.Tensor | None = None,  # (B, T) cache cells to write
    ) -> tuple[torch.Tensor, list[RouterLosses | None]]:
        rope = rope_tables(pos, self.inv_freq, x.dtype)
        losses = []
        for i, block in enumerate(self.layers):
            x, layer_losses = block(x, rope, mask, cache, i, rows, cells)
            losses.append(layer_losses)
        return self.norm(x), losses

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> (..., text_vocab), float32"""
        return self.text_head(h).float()

    def audio_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> (..., k, C, L), float32"""
        cfg = self.cfg
        return self.audio_head(h).float().unflatten(-1, (cfg.frames_per_audio_token, cfg.dmel_channels, -1))


def build_model(cfg: ModelConfig, moe_backend: str = "grouped_mm", seed: int = 0) -> InteractionModel:
    """Seeded random weights (the server's default when no checkpoint is given)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return InteractionModel(cfg, moe_backend)
