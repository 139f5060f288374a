"""Muon for stacks of matrices: momentum, orthogonalised by Newton-Schulz over the last two dims.

Contract: `Muon(params, lr, weight_decay, momentum)` updates each parameter (ndim >= 2) by its
Nesterov momentum made orthogonal over its last two dimensions, so an MoE layer's (E, D, F)
expert stack gets E orthogonal updates from one batched call. The update is scaled by
0.2 * sqrt(max(rows, cols)) (Moonshot's AdamW RMS match, torch.optim.Muon's
`adjust_lr_fn="match_rms_adamw"`), so one learning rate serves both this and the AdamW that
trains the rest. Weight decay is decoupled, like AdamW's. The Newton-Schulz coefficients and
step count are torch.optim.Muon's.

Written here, not taken from torch, because torch.optim.Muon accepts only 2-D parameters and 84%
of the tiny preset's weights are 3-D expert stacks.

This module does not know which parameters should use it (training/train.py decides: hidden
matrices; embeddings, heads, norms and the router stay on AdamW).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # quintic Newton-Schulz iteration (torch.optim.Muon's)
NS_STEPS = 5  # iterations: enough to bring singular values near 1 in bf16
RMS_MATCH = 0.2  # update RMS of AdamW that the orthogonal update is scaled to
EPS = 1e-7


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Nearest semi-orthogonal matrix of each (..., M, N) slice, approximately, in bf16."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide form: the Gram matrix is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=EPS)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (..., M, M)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-3,
                 weight_decay: float = 0.1, momentum: float = 0.95) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon updates matrices only; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = orthogonalize(p.grad.lerp(buf, mu))  # Nesterov
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * RMS_MATCH * max(p.size(-2), p.size(-1)) ** 0.5)
