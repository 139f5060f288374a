"""MoE dispatch backends, routing losses, RoPE, sampling, tokenizer, layout."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from microturn.model.config import tiny
from microturn.model.layout import patch_indices
from microturn.model.moe import BACKENDS, MoE, route
from microturn.model.patches import image_patches
from microturn.model.sampling import hash_uniform, sample
from microturn.model.tokenizer import ByteStreamDecoder, ByteTokenizer
from microturn.model.transformer import apply_rope, rope_tables


@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("n_tokens", [1, 7, 300])
def test_moe_backends_agree(shared: int, n_tokens: int) -> None:
    torch.manual_seed(0)
    moe = MoE(dataclasses.replace(tiny(), n_shared_experts=shared))
    x = torch.randn(n_tokens, moe.w13.shape[1])
    outs = {}
    for backend in BACKENDS:
        moe.backend = backend
        outs[backend] = moe(x)[0]
    for backend in BACKENDS[1:]:
        assert torch.allclose(outs["loop"], outs[backend], atol=1e-5), backend


def test_router_renormalises_and_losses() -> None:
    logits = torch.randn(64, 8)
    weights, experts, losses = route(logits, 2)
    assert torch.allclose(weights.sum(-1), torch.ones(64))
    assert experts.shape == (64, 2) and (experts[:, 0] != experts[:, 1]).all()
    # perfectly balanced routing gives aux == 1; a collapsed router gives more
    assert losses.aux.item() >= 0.99
    collapsed = torch.zeros(64, 8)
    collapsed[:, 0] = 10
    assert route(collapsed, 2)[2].aux.item() > losses.aux.item()
    assert losses.z.item() > 0


def test_moe_gradients_flow_to_router() -> None:
    moe = MoE(tiny(), "loop")
    y, losses = moe(torch.randn(16, moe.w13.shape[1]))
    (y.square().mean() + losses.aux + losses.z).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_grouped_moe_runs_its_experts_in_bf16_under_autocast() -> None:
    """autocast skips _grouped_mm, so the backend casts: bf16 experts, fp32 weight gradients."""
    torch.manual_seed(0)
    moe = MoE(tiny(), "grouped_mm")
    x = torch.randn(64, moe.w13.shape[1])
    exact = moe(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, losses = moe(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), exact, atol=0.05 * exact.abs().max().item())
    (y.float().square().mean() + losses.aux).backward()
    assert moe.w13.grad is not None and moe.w13.grad.dtype == torch.float32 and moe.w2.grad.abs().sum() > 0


def test_padded_cpu_expert_groups_are_exact_in_bf16() -> None:
    """bf16 CPU groups are padded with zero rows (few matmul shapes): every row equals the unpadded
    per-expert loop, and the gradients reach the weights."""
    torch.manual_seed(0)
    moe = MoE(tiny(), "grouped_mm").to(torch.bfloat16)
    x = torch.randn(3000, moe.w13.shape[1], dtype=torch.bfloat16)  # groups of hundreds: padded
    grouped = moe(x)[0]
    moe.backend = "loop"
    assert torch.equal(grouped, moe(x)[0])
    moe.backend = "grouped_mm"
    moe(x)[0].float().square().mean().backward()
    assert moe.w13.grad is not None and moe.w13.grad.abs().sum() > 0


def test_rope_float64_angles_relative_at_huge_positions() -> None:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)

    def score(pq: int, pk: int) -> float:
        cq, sq = rope_tables(torch.tensor([[pq]]), inv_freq, torch.float32)
        ck, sk = rope_tables(torch.tensor([[pk]]), inv_freq, torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    # a session ~100 hours long: the q.k score still depends only on the distance
    far = 100 * 3600 * 5 * 21
    assert abs(score(far + 7, far) - score(7, 0)) < 1e-3


def test_hash_uniform_is_row_independent_and_uniform() -> None:
    seeds, counters = torch.tensor([1, 2, 3]), torch.tensor([10, 10, 11])
    u = hash_uniform(seeds, counters, 4096)
    assert ((u > 0) & (u < 1)).all()
    assert abs(u.mean().item() - 0.5) < 0.02
    alone = hash_uniform(seeds[1:2], counters[1:2], 4096)
    assert torch.equal(alone[0], u[1])
    assert not torch.equal(u[0], u[1])


def test_sample_greedy_topk_temperature() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]]).repeat(2, 1)
    greedy = sample(logits, torch.zeros(2), torch.zeros(2, dtype=torch.long), torch.tensor([0, 1]),
                    torch.zeros(2, dtype=torch.long))
    assert greedy.tolist() == [1, 1]
    one, top2, seed = torch.tensor([1.0]), torch.tensor([2]), torch.tensor([7])
    draws = [sample(logits[:1], one, top2, seed, torch.tensor([c])).item() for c in range(200)]
    assert set(draws) == {1, 3}  # top-2 only, both drawn


def test_byte_tokenizer_roundtrip_and_stream_decoder() -> None:
    tok = ByteTokenizer()
    text = "héllo 👋"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    dec = ByteStreamDecoder()
    pieces = [dec.feed([i, tok.special.PAD]) for i in ids]
    assert "".join(pieces) == text
    assert tok.vocab_size <= tiny().text_vocab
    assert tok.special_name(tok.special.TASK_START) == "TASK_START"


def test_image_patches_layout() -> None:
    cfg = tiny()
    img = np.zeros((90, 120, 3), np.uint8)
    img[:45, :60] = 255  # top-left quadrant white
    patches = image_patches(img, cfg)
    assert patches.shape == (4, cfg.patch_dim)
    assert patches[0].mean() > 0.9 and patches[3].mean() < 0.1
    big = dataclasses.replace(cfg, image_size=64)  # a 4x4 grid, 4 patches per turn: swept over 4 turns
    idx = patch_indices(torch.arange(4), big)
    assert sorted(idx.flatten().tolist()) == list(range(16))
