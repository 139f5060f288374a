"""Muon's orthogonalised update (training/muon.py): batched over expert stacks, matrices only."""

from __future__ import annotations

import pytest
import torch

from microturn.training.muon import Muon, orthogonalize


@pytest.mark.parametrize("shape", [(64, 160), (160, 64), (4, 64, 160), (4, 160, 64)])
def test_orthogonalize_brings_every_slice_near_semi_orthogonal(shape: tuple[int, ...]) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g[..., 0, :] *= 50  # an ill-conditioned gradient: one direction dominates
    s = torch.linalg.svdvals(orthogonalize(g).float())  # (..., min(M, N))
    # the quintic iteration trades exactness for speed: singular values land near 1, not on it
    assert s.shape[-1] == min(shape[-2:]) and 0.5 < float(s.min()) and float(s.max()) < 1.3
    before = torch.linalg.svdvals(g)
    assert float((before.max(-1).values / before.min(-1).values).min()) > 10  # it was not already


def test_each_expert_of_a_stack_is_orthogonalised_on_its_own() -> None:
    stack = torch.randn(3, 32, 48, generator=torch.Generator().manual_seed(1))
    stack[1] *= 1000  # a slice's scale must not leak into the others
    batched = orthogonalize(stack)
    for e in range(3):
        torch.testing.assert_close(batched[e], orthogonalize(stack[e]), atol=2e-2, rtol=0)


def test_muon_steps_against_the_gradient_and_refuses_vectors() -> None:
    w = torch.nn.Parameter(torch.randn(2, 16, 24))
    loss_before = float((w ** 2).sum().detach())
    opt = Muon([w], lr=1e-2, weight_decay=0.0)
    for _ in range(5):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()
    assert float((w ** 2).sum().detach()) < loss_before
    with pytest.raises(ValueError, match="matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(8))])
