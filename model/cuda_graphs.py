"""CUDA graphs of a generate pass, one per batch bucket.

The micro-turn has fixed shapes, so the whole generate pass (prefill, every
decode step, sampling, cache writes) is captured once per bucket of rows
(1, 2, 4, ... max_slots) and replayed each tick: one launch instead of
thousands of small kernels. A tick with B rows replays the smallest bucket
>= B; rows past B are padding whose cache writes go to the trash cell and
whose bookkeeping is reset when a real session joins that row.

`GraphedGenerate` is given the callable to capture (`Generate`) and the
static input buffers to capture it over (`GraphInputs`, max_slots rows each).
The callable must be pure tensor work with static shapes and no host sync,
and must leave its outputs in tensors it allocates (they become the graph's
static outputs). Capture at warm-up with no session joined (the passes then
mutate only padding state). Only for CUDA; this module knows nothing about
what the callable computes, nor about sessions or the engine.

Legend: S rows (max_slots), b rows in a bucket, Ti text-in slots, To text-out
slots, A audio tokens per turn, k frames per audio token, C dMel channels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

WARMUP_RUNS = 2  # eager runs on a side stream before capture (allocator and kernel autotuning)

# (b, exec_mask, text_in, source, audio_in, forced) -> text-out (b, To), audio-out (b, A, k, C), heard (b, A)
Generate = Callable[
    [int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor],
]


def buckets(max_slots: int) -> list[int]:
    out, b = [], 1
    while b < max_slots:
        out.append(b)
        b *= 2
    return [*out, max_slots]


@dataclass
class GraphInputs:
    """The generate pass's inputs as static buffers; a bucket of b rows reads rows [0, b)."""

    text_in: torch.Tensor  # (S, Ti) long text-in ids
    source: torch.Tensor  # (S, Ti) long text-in source markers
    audio_in: torch.Tensor  # (S, A, k, C) long dMel codes of the turn's audio-in
    forced: torch.Tensor  # (S, To) long text-out ids to force, -1 = sample
    exec_mask: torch.Tensor  # (S,) bool rows that execute; padding rows write only to the trash cell

    def rows(self, b: int) -> tuple[torch.Tensor, ...]:
        """Views of rows [0, b), in `Generate`'s argument order after b."""
        return self.exec_mask[:b], self.text_in[:b], self.source[:b], self.audio_in[:b], self.forced[:b]


class GraphedGenerate:
    def __init__(self, generate: Generate, inputs: GraphInputs) -> None:
        self.generate = generate
        self.inputs = inputs
        self.device = inputs.exec_mask.device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for b in reversed(buckets(len(inputs.exec_mask))):  # largest first so smaller graphs reuse its pool
            self.graphs[b] = self._capture(b)

    @torch.inference_mode()
    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]:
        args = (b, *self.inputs.rows(b))
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                self.generate(*args)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            text_out, audio_out, heard = self.generate(*args)
        return graph, text_out, audio_out, heard

    def run(
        self,
        B: int,
        text_in: torch.Tensor,  # (B, Ti)
        source: torch.Tensor,  # (B, Ti)
        audio_in: torch.Tensor,  # (B, A, k, C)
        forced: torch.Tensor,  # (B, To)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replay the smallest bucket >= B over these inputs -> text-out, audio-out, heard of rows [0, B)."""
        b = next(k for k in sorted(self.graphs) if k >= B)
        graph, text_out, audio_out, heard = self.graphs[b]
        buf = self.inputs
        buf.text_in[:B], buf.source[:B] = text_in, source
        buf.audio_in[:B], buf.forced[:B] = audio_in, forced
        buf.exec_mask.zero_()
        buf.exec_mask[:B] = True
        graph.replay()
        return text_out[:B], audio_out[:B], heard[:B]
