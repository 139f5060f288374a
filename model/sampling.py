"""Per-row sampling with per-row temperature, top-k and seed, fully batched.

Randomness is counter-based: the Gumbel noise for row b is a hash of
(seed_b, counter_b, lane), so a row's samples do not depend on which other
rows share the batch, need no per-row generator objects, and run without a
host sync (CUDA-graph friendly). Same seed + same counter + same logits ->
same token, on any batch composition.

Legend: B rows, X any middle dims, V choices per draw.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31 so products of 32-bit values fit in int64 without overflow.
_M1, _M2 = 0x7FEB352D, 0x46B5DA8B


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def hash_uniform(seed: torch.Tensor, counter: torch.Tensor, n: int) -> torch.Tensor:
    """seed, counter (B,) int64 -> (B, n) float32 uniform in (0, 1), exactly reproducible."""
    lanes = torch.arange(n, device=seed.device, dtype=torch.int64)
    base = _mix32(_mix32(seed) ^ _mix32(counter + 0x9E3779B9))  # (B,)
    h = _mix32(base[:, None] ^ _mix32(lanes * 2 + 1)[None, :])  # (B, n)
    return ((h >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def sample(
    logits: torch.Tensor,  # (B, X..., V) float32
    temperature: torch.Tensor,  # (B,) float; 0 = greedy
    top_k: torch.Tensor,  # (B,) int64; 0 = no top-k
    seed: torch.Tensor,  # (B,) int64
    counter: torch.Tensor,  # (B,) int64: unique per draw of a row (turn, slot)
) -> torch.Tensor:
    """-> (B, X...) int64 choices."""
    B, V = logits.shape[0], logits.shape[-1]
    flat = logits.reshape(B, -1, V)  # (B, M, V)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))  # (B,)
    ranked = flat.sort(dim=-1, descending=True).values  # (B, M, V)
    kth = ranked.gather(-1, (k - 1)[:, None, None].expand(-1, flat.shape[1], 1))  # (B, M, 1)
    masked = flat.masked_fill(flat < kth, float("-inf"))
    u = hash_uniform(seed, counter, flat.shape[1] * V).view_as(flat)
    gumbel = -torch.log(-torch.log(u))
    temp = temperature.clamp(min=1e-6)[:, None, None]
    drawn = (masked / temp + gumbel).argmax(dim=-1)  # (B, M)
    greedy = flat.argmax(dim=-1)
    out = torch.where((temperature > 0)[:, None], drawn, greedy)
    return out.view(logits.shape[:-1])
