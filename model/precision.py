"""Whether a device runs bfloat16 matmuls natively, and the precision a run should use.

Contract: `native_bf16(device)` is true on a CUDA device with bf16 support and on a CPU with AMX
tiles or AVX512-BF16; elsewhere (an AVX2-only CPU such as many AMD EPYC hosts) oneDNN has no bf16
kernels and torch falls back to reference loops, about 12x slower than fp32 for a tiny training
step (where AMX runs bf16 about 2x *faster*; docs/demo-model.md has the measurements).
`resolve_precision("auto", device)` therefore gives "bf16" only where
it is native; an explicit "bf16" is honoured but `slow_bf16_warning` says what it will cost.

This module knows nothing about models, training or serving.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16")
SLOW_BF16_FACTOR = 12  # bf16 / fp32 step time measured on an AVX2-only CPU (see the docstring)


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    # private probes (torch.cpu); a torch without them is treated as lacking the feature
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(name: str, device: torch.device) -> str:
    """auto -> bf16 where native, else fp32; fp32 / bf16 are returned as asked."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose from {PRECISIONS}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


def slow_bf16_warning(device: torch.device) -> str | None:
    """A line for the user when bf16 was asked for on a device that only emulates it."""
    if native_bf16(device):
        return None
    return (f"{device.type} has no native bfloat16 matmuls (no AMX / AVX512-BF16 here); bf16 runs "
            f"about {SLOW_BF16_FACTOR}x slower than fp32 on such CPUs: use fp32 (or auto)")
