"""CUDA graphs of a generate pass, one per batch bucket.

The micro-turn has fixed shapes, so the whole generate pass (prefill, every
decode step, sampling, cache writes) is captured once per bucket of rows
(1, 2, 4, ... max_slots) and replayed each tick: one launch instead of
thousands of small kernels. A tick with B rows replays the smallest bucket
>= B; rows past B are padding whose cache writes go to the trash cell and
whose bookkeeping is reset when a real session joins that row.

`GraphedGenerate` is given the callable to capture (`Generate`) and the
static input buffers to capture it over (`TurnInputs` of max_slots rows).
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



def buckets(max_slots: int) -> list[int]:
    out, b = [], 1
    while b < max_slots:
        out.append(b)
        b *= 2
    return [*out, max_slots]


@dataclass
class TurnInputs:
    """A generate pass's inputs for R rows (the B rows of a step, or S rows of static graph buffers)."""

    text_in: torch.Tensor  # (R, Ti) long text-in ids
    source: torch.Tensor  # (R, Ti) long text-in source markers
    audio_in: torch.Tensor  # (R, A, k, C) long dMel codes of the turn's audio-in
    forced: torch.Tensor  # (R, To) long text-out ids to force, -1 = sample
    exec_mask: torch.Tensor  # (R,) bool rows that execute; padding rows write only to the trash cell

    def rows(self, b: int) -> TurnInputs:
        """Views of rows [0, b)."""
        return TurnInputs(self.text_in[:b], self.source[:b], self.audio_in[:b], self.forced[:b],
                          self.exec_mask[:b])


# (b, inputs of b rows) -> text-out (b, To), audio-out (b, A, k, C), heard (b, A)
Generate = Callable[[int, TurnInputs], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class GraphedGenerate:
    def __init__(self, generate: Generate, inputs: TurnInputs) -> None:
        self.generate = generate
        self.inputs = inputs
        self.device = inputs.exec_mask.device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for b in reversed(buckets(len(inputs.exec_mask))):  # largest first so smaller graphs reuse its pool
            self.graphs[b] = self._capture(b)

    @torch.inference_mode()
    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self.inputs.rows(b)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                self.generate(b, rows)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            text_out, audio_out, heard = self.generate(b, rows)
        return graph, text_out, audio_out, heard

    def run(self, B: int, inp: TurnInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replay the smallest bucket >= B over the B rows of `inp` (its exec_mask is not read)
        -> text-out, audio-out, heard of rows [0, B)."""
        b = next(k for k in sorted(self.graphs) if k >= B)
        graph, text_out, audio_out, heard = self.graphs[b]
        buf = self.inputs
        buf.text_in[:B], buf.source[:B] = inp.text_in, inp.source
        buf.audio_in[:B], buf.forced[:B] = inp.audio_in, inp.forced
        buf.exec_mask.zero_()
        buf.exec_mask[:B] = True
        graph.replay()
        return text_out[:B], audio_out[:B], heard[:B]
