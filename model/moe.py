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

Legend: N tokens, D d_model, F expert hidden, E experts, K top_k, M = N*K, R padded rows.
This module knows nothing about sequences, caches or sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

BACKENDS = ("loop", "grouped_mm", "bmm")
GROUP_SIG_BITS = 3  # CPU expert groups padded to 3 significant bits of their row count (see _grouped_cpu)


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
        n_experts = self.w13.shape[0]
        flat = experts.flatten()  # (M,)
        order = flat.argsort(stable=True)  # (M,) assignments grouped by expert
        tok = order // self.top_k  # (M,) source token of each assignment
        # counts by scatter_add, not bincount: CUDA bincount reads the max back to the host (no graphs)
        counts = torch.zeros(n_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        w13, w2 = self.w13, self.w2
        if torch.is_autocast_enabled(x.device.type):
            # autocast leaves _grouped_mm alone: cast by hand, or training runs the experts in fp32
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
        if x.device.type != "cpu" or x.dtype == torch.float32:  # fp32 CPU matmuls build no kernels
            offs = counts.cumsum(0).to(torch.int32)  # (E,)
            xs = x[tok]  # (M, D)
            h = self._swiglu(torch._grouped_mm(xs, w13, offs=offs))  # (M, F)
            out = torch._grouped_mm(h, w2, offs=offs)  # (M, D)
        else:
            out = self._grouped_cpu(x, w13, w2, flat[order], tok, counts)
        out = out * weights.flatten()[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, tok, out)

    def _grouped_cpu(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, expert: torch.Tensor,
                     tok: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """CPU _grouped_mm is one matmul per expert, and oneDNN builds a kernel for every new row count
        (about 4 ms: most of a training step, where thousands of counts occur). Groups padded with
        zero rows to GROUP_SIG_BITS significant bits take ~8 sizes per octave (cached after the first
        steps) for at most 1/8 more rows; small groups (decode) are left as they are. Rows are
        computed alone, so the result is exact. expert/tok (M,) in expert order -> (M, D)."""
        octave = counts.clamp(min=1).float().log2().floor()  # exact for integers below 2**24
        step = torch.exp2((octave - GROUP_SIG_BITS).clamp(min=0)).long()  # (E,) row granularity
        padded = (counts + step - 1) // step * step  # (E,)
        ends = padded.cumsum(0)
        rank = torch.arange(len(tok), device=x.device) - (counts.cumsum(0) - counts)[expert]  # (M,) in group
        pos = (ends - padded)[expert] + rank  # (M,) row of each assignment among the padded groups
        rows = int(ends[-1])  # host read: free on CPU
        src = torch.full((rows,), x.shape[0], dtype=torch.long, device=x.device)  # padding reads a zero row
        src[pos] = tok
        xs = torch.cat([x, x.new_zeros(1, x.shape[1])])[src]  # (R, D)
        offs = ends.to(torch.int32)
        h = self._swiglu(torch._grouped_mm(xs, w13, offs=offs))  # (R, F)
        return torch._grouped_mm(h, w2, offs=offs)[pos]  # (M, D)

    def _bmm(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        flat = experts.flatten()  # (M,)
        xs = x.repeat_interleave(self.top_k, dim=0).unsqueeze(1)  # (M, 1, D)
        h = self._swiglu(torch.bmm(xs, self.w13[flat]))  # (M, 1, F)
        out = torch.bmm(h, self.w2[flat]).squeeze(1) * weights.flatten()[:, None]  # (M, D)
        return out.view(-1, self.top_k, x.shape[-1]).sum(dim=1)
