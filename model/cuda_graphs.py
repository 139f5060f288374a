"""CUDA graphs of the engine's generate pass, one per batch bucket.

The micro-turn has fixed shapes, so the whole generate pass (prefill, every
decode step, sampling, cache writes) is captured once per bucket of rows
(1, 2, 4, ... max_slots) and replayed each tick: one launch instead of
thousands of small kernels. A tick with B rows replays the smallest bucket
>= B; rows past B are padding whose cache writes go to the trash cell and
whose bookkeeping is reset when a real session joins that row.

Captured at warm-up with no session joined (the passes mutate only padding
state then). Only for CUDA; knows nothing beyond `Engine._generate`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .engine import Engine

WARMUP_RUNS = 2  # eager runs on a side stream before capture (allocator and kernel autotuning)


def buckets(max_slots: int) -> list[int]:
    out, b = [], 1
    while b < max_slots:
        out.append(b)
        b *= 2
    return [*out, max_slots]


class GraphedGenerate:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        cfg, dev, S = engine.config, engine.device, engine.max_slots
        pad = engine.tokenizer.special.PAD
        self.text_in = torch.full((S, cfg.text_in_slots), pad, dtype=torch.long, device=dev)
        self.source = torch.zeros((S, cfg.text_in_slots), dtype=torch.long, device=dev)
        self.audio_in = torch.zeros(
            (S, cfg.audio_tokens, cfg.frames_per_audio_token, cfg.dmel_channels), dtype=torch.long, device=dev
        )
        self.forced = torch.full((S, cfg.text_out_slots), -1, dtype=torch.long, device=dev)
        self.exec_mask = torch.zeros(S, dtype=torch.bool, device=dev)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for b in reversed(buckets(S)):  # largest first so smaller graphs reuse its pool memory
            self.graphs[b] = self._capture(b)

    @torch.inference_mode()
    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]:
        e = self.engine
        e.model.set_moe_backend(e.moe_backend_for(b))
        args = (b, self.exec_mask[:b], self.text_in[:b], self.source[:b], self.audio_in[:b], self.forced[:b])
        stream = torch.cuda.Stream(e.device)
        stream.wait_stream(torch.cuda.current_stream(e.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                e._generate(*args)
        torch.cuda.current_stream(e.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            text_out, audio_out, heard = e._generate(*args)
        return graph, text_out, audio_out, heard

    def run(
        self,
        B: int,
        text_in: torch.Tensor,
        source: torch.Tensor,
        audio_in: torch.Tensor,
        forced: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = next(k for k in sorted(self.graphs) if k >= B)
        graph, text_out, audio_out, heard = self.graphs[b]
        self.text_in[:B], self.source[:B] = text_in, source
        self.audio_in[:B], self.forced[:B] = audio_in, forced
        self.exec_mask.zero_()
        self.exec_mask[:B] = True
        graph.replay()
        return text_out[:B], audio_out[:B], heard[:B]
