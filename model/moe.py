"""Mixture-of-experts SwiGLU feed-forward with interchangeable dispatch backends.

Router: softmax over experts, top-k, weights renormalised over the chosen k.
Training signals: Switch load-balancing loss and router z-loss (returned, not
applied). Backends compute the same function and must agree to 1e-5 in fp32:

  loop        per-expert gather / compute / index_add (host sync; CPU, training)
  grouped_mm  sort assignments by expert, one torch._grouped_mm per weight
              (no host sync; CPU and large batches)
  bmm         gather each assignment's expert weights, batched matmul
              (no host sync, no data-dependent shapes: small GPU batches,
              CUDA-graph friendly)

Legend: N tokens, D d_model, F expert hidden, E experts, K top_k, M = N*K.
This module knows nothing about sequences, caches or sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

BACKENDS = ("loop", "grouped_mm", "bmm")


@dataclass
class RouterLosses:
    aux: torch.Tensor  # Switch load-balancing loss (scalar)
    z: torch.Tensor  # router z-loss (scalar)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * d_hidden, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def route(
    logits: torch.Tensor, top_k: int, with_losses: bool = True
) -> tuple[torch.Tensor, torch.Tensor, RouterLosses | None]:
    """Top-k softmax routing. logits (N, E) -> weights (N, K), experts (N, K), losses (None at inference)."""
    logits = logits.float()
    probs = logits.softmax(dim=-1)  # (N, E)
    weights, experts = probs.topk(top_k, dim=-1)  # (N, K)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    if not with_losses:
        return weights, experts, None
    n_experts = logits.shape[-1]
    dispatch = F.one_hot(experts, n_experts).float().sum(dim=1)  # (N, E)
    frac_tokens = dispatch.mean(dim=0) / top_k  # (E,)
    frac_probs = probs.mean(dim=0)  # (E,)
    aux = n_experts * (frac_tokens * frac_probs).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return weights, experts, RouterLosses(aux=aux, z=z)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str = "grouped_mm") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown MoE backend {backend!r}; choose from {BACKENDS}")
        self.backend = backend
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        scale = cfg.d_model**-0.5
        # gate (w1) and up (w3) projections fused along the last dim: one matmul instead of two
        self.w13 = nn.Parameter(torch.randn(cfg.n_experts, cfg.d_model, 2 * cfg.d_expert) * scale)
        self.w2 = nn.Parameter(torch.randn(cfg.n_experts, cfg.d_expert, cfg.d_model) * cfg.d_expert**-0.5)
        self.shared = nn.ModuleList(SwiGLU(cfg.d_model, cfg.d_shared) for _ in range(cfg.n_shared_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterLosses | None]:
        """x (N, D) -> (N, D), router losses (only when grads are on: training)."""
        weights, experts, losses = route(self.router(x), self.top_k, torch.is_grad_enabled())
        weights = weights.to(x.dtype)
        if self.backend == "loop":
            y = self._loop(x, weights, experts)
        elif self.backend == "grouped_mm":
            y = self._grouped(x, weights, experts)
        else:
            y = self._bmm(x, weights, experts)
        for expert in self.shared:
            y = y + expert(x)
        return y, losses

    @staticmethod
    def _swiglu(h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self._swiglu(x @ self.w13[e]) @ self.w2[e]

    def _loop(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        y = torch.zeros_like(x)
        for e in range(self.w13.shape[0]):
            tok, slot = (experts == e).nonzero(as_tuple=True)  # host sync: data-dependent shape
            if tok.numel():
                y.index_add_(0, tok, self._expert(x[tok], e) * weights[tok, slot, None])
        return y

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        flat = experts.flatten()  # (M,)
        order = flat.argsort(stable=True)  # (M,) assignments grouped by expert
        tok = order // self.top_k  # (M,) source token of each assignment
        # counts by scatter_add, not bincount: CUDA bincount reads the max back to the host (no graphs)
        counts = torch.zeros(self.w13.shape[0], dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        offs = counts.cumsum(0).to(torch.int32)  # (E,)
        w13, w2 = self.w13, self.w2
        if torch.is_autocast_enabled(x.device.type):
            # autocast leaves _grouped_mm alone: cast by hand, or training runs the experts in fp32
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
        xs = x[tok]  # (M, D)
        h = self._swiglu(torch._grouped_mm(xs, w13, offs=offs))  # (M, F)
        out = torch._grouped_mm(h, w2, offs=offs)  # (M, D)
        out = out * weights.flatten()[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, tok, out)

    def _bmm(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        flat = experts.flatten()  # (M,)
        xs = x.repeat_interleave(self.top_k, dim=0).unsqueeze(1)  # (M, 1, D)
        h = self._swiglu(torch.bmm(xs, self.w13[flat]))  # (M, 1, F)
        out = torch.bmm(h, self.w2[flat]).squeeze(1) * weights.flatten()[:, None]  # (M, D)
        return out.view(-1, self.top_k, x.shape[-1]).sum(dim=1)
