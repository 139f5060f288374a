"""The runner: the model, its KV cache, the dMel and vocoder streams and every per-row tensor.

Contract
- Rows [0, B) of a step are its B live rows. The caller keeps them contiguous: `reset_row`
  starts a conversation on a row and `move_row` copies a row onto another (a leave's hole
  filled by the last row); both cover the per-row state (`RowState`), the KV cache rows and
  the dMel / vocoder stream rows alike.
- `step(batch, controls) -> result` runs one micro-turn of B rows from host arrays to host
  arrays (model/step_io.py): dMel-encode each row's 200 ms of audio, prefill the input positions
  (plus the previous turn's last output token), decode the text-out then audio-out tokens
  one position at a time, vocode the audio. The text head's greedy reading of the audio-in
  positions comes back as the heard tokens. The rows' `RowControls` add a per-turn wait bias
  offset and say which rows are vocoded: a row with audio off still samples its audio tokens,
  answers zeros, and has its vocoder stream restarted.
- `generate` (prefill + decode + state advance) is pure tensor work with static shapes and
  no host sync; `capture_graphs` captures it per bucket of rows (model/cuda_graphs.py) and
  later steps replay those graphs, except traced ones.
- Not thread-safe: one caller thread.

This module knows nothing about session slots, input validation, text decoding, clocks or
sockets. Legend: S rows allocated (max_slots), B rows in the step, D model width, Pin input
positions per turn (CTRL, video patches, audio-in, text-in), V video patches per turn, P values
per patch, Ti text-in slots, To text-out slots, A audio tokens per turn, k frames per audio
token, C dMel channels, L bins per channel, F = A*k dMel frames per turn, N samples per turn.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from .cuda_graphs import GraphedGenerate, TurnInputs
from .dmel import DMel
from .kv_cache import KVCache
from .layout import embed_inputs, embed_output, patch_indices
from .row_state import RowState
from .sampling import sample
from .slots import RowControls, SamplingParams
from .step_io import StepBatch, StepResult
from .tokenizer import SpecialIds
from .transformer import InteractionModel
from .vocoder import GriffinLimVocoder, Vocoder

GPU_BMM_MAX_ROWS = 32  # above this many rows, gathering expert weights per token costs more than grouped_mm
DRAWS_PER_TURN = 64  # counter stride per micro-turn for the sampling hash (> output slots)
STAGES = ("prepare", "dmel", "model", "vocoder")  # what `StepResult.stage_ms` times, in order


def _take_rows(state: Any, n: int) -> Any:
    """A stream state (dataclass of (S, ...) tensors) narrowed to rows [0, n), as views."""
    return dataclasses.replace(state, **{
        f.name: getattr(state, f.name)[:n] for f in dataclasses.fields(state)
    })


def _put_rows(full: Any, part: Any, n: int) -> None:
    for f in dataclasses.fields(full):
        getattr(full, f.name)[:n] = getattr(part, f.name)


def _gather_rows(state: Any, rows: torch.Tensor) -> Any:
    """A stream state narrowed to `rows` (R,) long, as copies (scatter them back with `_scatter_rows`)."""
    return dataclasses.replace(state, **{
        f.name: getattr(state, f.name).index_select(0, rows) for f in dataclasses.fields(state)
    })


def _scatter_rows(full: Any, part: Any, rows: torch.Tensor) -> None:
    for f in dataclasses.fields(full):
        getattr(full, f.name).index_copy_(0, rows, getattr(part, f.name))


def _copy_row(state: Any, src: int, dst: int) -> None:
    for f in dataclasses.fields(state):
        t = getattr(state, f.name)
        t[dst] = t[src]


class Runner:
    def __init__(
        self,
        model: InteractionModel,
        max_slots: int,
        device: torch.device,
        dtype: torch.dtype,
        special: SpecialIds,
        vocoder: Vocoder | None = None,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.config = model.cfg
        self.model = model.to(device, dtype).eval()
        self.model.inv_freq = self.model.inv_freq.to(torch.float64)
        self.max_slots = max_slots
        self.special = special
        self.pad_id = torch.tensor([special.PAD], device=device)
        self.dmel = DMel(device=device)
        self.vocoder = vocoder or GriffinLimVocoder(device=device)
        cfg = self.config
        if cfg.dmel_frames_per_turn != self.dmel.cfg.frames_per_chunk:
            raise ValueError("model's audio tokens per turn do not cover one 200 ms dMel chunk")
        self.chunk = 1 + cfg.input_positions  # carried last output + this turn's inputs
        self.cache = KVCache(cfg, max_slots, self.chunk, device, dtype)
        self.rows = RowState.allocate(cfg, max_slots, dtype, device)
        self.dmel_state = self.dmel.init_stream(max_slots)
        self.voc_state = self.vocoder.init_state(max_slots, device)
        self.graphs: GraphedGenerate | None = None  # CUDA graphs of `generate` per batch bucket

    # --- rows ---
    def reset_row(self, row: int) -> None:
        """Start a conversation on `row`: empty cache and streams, first position after the prefix."""
        mask = torch.zeros(self.max_slots, dtype=torch.bool, device=self.device)
        mask[row] = True
        self.cache.reset(mask)
        self.dmel_state.reset(mask)
        self.vocoder.reset(self.voc_state, mask)
        self.rows.reset(mask, self.config.prefix_len)

    def move_row(self, src: int, dst: int) -> None:
        self.cache.copy_row(src, dst)
        self.rows.move_row(src, dst)
        _copy_row(self.dmel_state, src, dst)
        _copy_row(self.voc_state, src, dst)

    def set_sampling(self, row: int, p: SamplingParams) -> None:
        """`p.wait_bias` is the row's whole bias (any checkpoint default already added)."""
        r = self.rows
        r.text_temp[row], r.text_top_k[row] = p.text_temperature, p.text_top_k
        r.audio_temp[row], r.audio_top_k[row] = p.audio_temperature, p.audio_top_k
        r.seed[row] = p.seed
        r.wait_bias[row] = p.wait_bias

    @torch.inference_mode()
    def prefill_prefix(self, row: int, ids: list[int]) -> None:
        """Replace the row's pinned prefix with `ids` (at most prefix_len), at positions 0..len-1."""
        cfg, cache = self.config, self.cache
        cache.cell_pos[row, : cfg.prefix_len] = -1
        tokens = torch.tensor([ids], device=self.device)  # (1, T)
        pos = torch.arange(len(ids), device=self.device)[None]  # (1, T) prefix cells are their positions
        rows = slice(row, row + 1)
        cache.claim(rows, pos, pos)
        self.model(self.model.embed_text(tokens), pos, cache.mask(rows, pos), cache, rows, pos)

    # --- the tick ---
    @torch.inference_mode()
    def step(
        self, batch: StepBatch, controls: RowControls | None = None, profile: bool = False,
        trace: bool = False,
    ) -> StepResult:
        """One micro-turn of rows [0, B); `controls` None = no wait bias offset, every row voiced.
        `profile` times the stages (adding device syncs); `trace` returns host copies of the turn's
        tensors and runs eagerly even when graphs are captured."""
        t0 = time.perf_counter()
        cfg, dev = self.config, self.device
        B = len(batch.audio)
        controls = controls or RowControls.defaults(B)
        audio = torch.from_numpy(batch.audio).to(dev)  # (B, N)
        self.rows.wait_offset[:B] = torch.from_numpy(controls.wait_bias_offset).to(dev)  # (B,) in place
        if batch.image_rows:
            self.rows.patches[batch.image_rows] = torch.from_numpy(batch.images).to(dev, self.dtype)
        host = (batch.text_in, batch.source, batch.forced)
        text_in, source, forced = (torch.from_numpy(a).to(dev) for a in host)  # (B, Ti), (B, Ti), (B, To)

        marks = [time.perf_counter()]
        dstate = _take_rows(self.dmel_state, B)
        codes = self.dmel.encode_chunk(audio, dstate)  # (B, F, C)
        _put_rows(self.dmel_state, dstate, B)
        self._mark(marks, profile)
        audio_in = codes.view(B, cfg.audio_tokens, cfg.frames_per_audio_token, cfg.dmel_channels)

        record: dict | None = {} if trace else None
        inp = TurnInputs(text_in, source, audio_in, forced, torch.ones(B, dtype=torch.bool, device=dev))
        if self.graphs is not None and record is None:
            text_out, audio_out, heard = self.graphs.run(B, inp)
        else:
            text_out, audio_out, heard = self.generate(B, inp, record)  # (B, To), (B, A, k, C), (B, A)
        self._mark(marks, profile)

        pcm = self._vocode(B, audio_out, controls.audio_out)  # (B, N)
        self._mark(marks, profile)
        stage_ms = {}
        if profile:
            stage_ms = {name: (b - a) * 1e3 for name, a, b in zip(STAGES, [t0, *marks], marks, strict=False)}

        pcm_host = pcm.float().clamp(-1, 1).cpu().numpy()
        text_host, heard_host = text_out.cpu().tolist(), heard.cpu().tolist()
        turns = self.rows.turn[:B].cpu().tolist()
        return StepResult(pcm_host, text_host, heard_host, [t - 1 for t in turns], stage_ms, record)

    def _vocode(self, B: int, audio_out: torch.Tensor, voiced: np.ndarray) -> torch.Tensor:
        """The rows' audio-out tokens (B, A, k, C) -> waveform (B, N), vocoding only the `voiced` (B,)
        bool rows: the others' samples are zeros and their vocoder streams restart (their last voiced
        turn's overlap-add tail must not sound when they come back on)."""
        if voiced.all():  # the usual tick: every row, on views of the stream state
            logmel = self.dmel.decode(audio_out.reshape(B, -1, self.config.dmel_channels))  # (B, F, C)
            vstate = _take_rows(self.voc_state, B)
            pcm = self.vocoder.decode_chunk(logmel.float(), vstate)  # (B, N)
            _put_rows(self.voc_state, vstate, B)
            return pcm
        # restart the muted rows' streams by writing a fresh state into them, in place: a `reset` here
        # could swap in inference-mode tensors, which a later `move_row` may not write to
        muted = np.flatnonzero(~voiced)
        fresh = self.vocoder.init_state(len(muted), self.device)
        _scatter_rows(self.voc_state, fresh, torch.from_numpy(muted).to(self.device))
        pcm = torch.zeros(B, self.dmel.cfg.chunk_samples, device=self.device)  # (B, N)
        if voiced.any():  # host-side choice of rows: no device sync
            rows = torch.from_numpy(np.flatnonzero(voiced)).to(self.device)  # (R,)
            codes = audio_out.index_select(0, rows)  # (R, A, k, C)
            logmel = self.dmel.decode(codes.reshape(len(rows), -1, self.config.dmel_channels))  # (R, F, C)
            vstate = _gather_rows(self.voc_state, rows)
            pcm.index_copy_(0, rows, self.vocoder.decode_chunk(logmel.float(), vstate).to(pcm.dtype))
            _scatter_rows(self.voc_state, vstate, rows)
        return pcm

    def generate(
        self, B: int, inp: TurnInputs, trace: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill the inputs, decode every output slot for rows [0, B); advance cache, positions, carry,
        turn. -> text-out (B, To), audio-out (B, A, k, C), the greedy reading of the audio-in (B, A).

        Rows whose exec_mask is off (graph padding) write only to the trash cell. Picks the MoE backend
        for B rows first (host-side only, so a captured graph keeps its bucket's). A `trace` dict is
        filled with host copies of the turn's inputs, outputs and logits (syncs: never captured).
        """
        self.model.set_moe_backend(self.moe_backend_for(B))
        h, heard, ctrl, patches, pidx = self._prefill(B, inp)
        text_out, audio_out, idle, logits = self._decode(B, inp.exec_mask, h, inp.forced, trace is not None)
        if trace is not None:
            To = self.config.text_out_slots
            trace.update({
                "ctrl": ctrl.cpu(), "patches": patches.float().cpu(), "patch_idx": pidx.cpu(),
                "audio_in": inp.audio_in.cpu(), "text_in": inp.text_in.cpu(), "source": inp.source.cpu(),
                "text_out": torch.stack(text_out, 1).cpu(), "audio_out": torch.stack(audio_out, 1).cpu(),
                "text_logits": torch.stack(logits[:To], 1), "audio_logits": torch.stack(logits[To:], 1),
            })
        self._advance(B, idle, audio_out[-1])
        return torch.stack(text_out, dim=1), torch.stack(audio_out, dim=1), heard

    def _prefill(
        self, B: int, inp: TurnInputs
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The carried last output token and this turn's input positions through the model.
        -> last hidden (B, D), heard (B, A), and the turn's ctrl (B,), patches (B, V, P), patch_idx (B, V)."""
        cfg, dev, model, cache, st = self.config, self.device, self.model, self.cache, self.rows
        sp = self.special
        turn, next_pos = st.turn[:B], st.next_pos[:B]
        ctrl = torch.where(turn == 0, sp.BOS, sp.CTRL)  # (B,)
        pidx = patch_indices(turn, cfg)  # (B, V)
        patches = st.patches[:B].gather(1, pidx[..., None].expand(-1, -1, cfg.patch_dim))  # (B, V, P)
        x = torch.cat([
            embed_output(model, cfg.output_positions - 1, st.carry[:B, None]),
            embed_inputs(model, ctrl, patches, pidx, inp.audio_in, inp.text_in, inp.source),
        ], dim=1)  # (B, 1 + Pin, D)
        pos = next_pos[:, None] - 1 + torch.arange(self.chunk, device=dev)  # (B, 1 + Pin)
        cells = cache.conversation_cells(pos, inp.exec_mask)  # (B, 1 + Pin)
        # a row's first turn has no carried token: its position writes to the (never visible) trash cell
        cells[:, 0] = torch.where(st.has_carry[:B], cells[:, 0], cache.trash)
        h = self._forward(x, pos, cells, slice(0, B))  # (B, 1 + Pin, D)
        first = 2 + cfg.video_patches  # after the carried token and CTRL
        heard = model.text_logits(h[:, first : first + cfg.audio_tokens]).argmax(-1)  # (B, A)
        return h[:, -1], heard, ctrl, patches, pidx

    def _decode(
        self, B: int, exec_mask: torch.Tensor, h: torch.Tensor, forced: torch.Tensor, keep_logits: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """Sample the To text-out then A audio-out tokens from h (B, D), one position per forward.
        -> text-out To x (B,), audio-out A x (B, k, C), idle (B,) after them, host logits if kept."""
        cfg, model, st, sp = self.config, self.model, self.rows, self.special
        next_pos = st.next_pos[:B]
        counter = st.turn[:B] * DRAWS_PER_TURN  # (B,)
        idle = st.idle[:B]  # (B,) no text-out since the last EPAD
        text_out, audio_out, logits = [], [], []
        for o in range(cfg.output_positions):
            if o < cfg.text_out_slots:
                lg = model.text_logits(h)  # (B, vocab)
                # the turn-taking decision: while idle, staying silent (PAD) gains the row's wait_bias
                # plus this turn's offset (push-to-talk holds the turn, response.create takes it)
                bias = (st.wait_bias[:B] + st.wait_offset[:B]) * idle  # (B,)
                lg = lg.index_add(1, self.pad_id, bias[:, None])
                tok = sample(lg, st.text_temp[:B], st.text_top_k[:B], st.seed[:B], counter + o)  # (B,)
                tok = torch.where(forced[:, o] >= 0, forced[:, o], tok)
                idle = torch.where(tok == sp.PAD, idle, tok == sp.EPAD)
                text_out.append(tok)
            else:
                lg = model.audio_logits(h)  # (B, k, C, L)
                tok = sample(lg, st.audio_temp[:B], st.audio_top_k[:B], st.seed[:B], counter + o)  # (B, k, C)
                audio_out.append(tok)
            if keep_logits:
                logits.append(lg.float().cpu())
            if o == cfg.output_positions - 1:
                break  # the last token's position is written with the next turn's prefill
            opos = next_pos[:, None] + cfg.input_positions + o  # (B, 1)
            h = self._forward(embed_output(model, o, tok[:, None]), opos,
                              self.cache.conversation_cells(opos, exec_mask), slice(0, B))[:, -1]  # (B, D)
        return text_out, audio_out, idle, logits

    def _advance(self, B: int, idle: torch.Tensor, last_audio: torch.Tensor) -> None:
        """Rows [0, B) move on one turn; the turn's last audio token (B, k, C) is carried into the next."""
        st = self.rows
        st.idle[:B] = idle
        st.carry[:B] = last_audio
        st.has_carry[:B] = True
        st.next_pos[:B] += self.config.positions_per_turn
        st.turn[:B] += 1

    def _forward(self, x: torch.Tensor, pos: torch.Tensor, cells: torch.Tensor, rows: slice) -> torch.Tensor:
        """x (B, T, D) at pos (B, T), written to cells (B, T) of `rows` -> hidden (B, T, D)."""
        self.cache.claim(rows, cells, pos)
        h, _ = self.model(x.to(self.dtype), pos, self.cache.mask(rows, pos), self.cache, rows, cells)
        return h

    def moe_backend_for(self, rows: int) -> str:
        """gather+bmm for small GPU batches (fixed shapes, no sorting); grouped_mm otherwise."""
        if self.device.type == "cuda" and rows <= GPU_BMM_MAX_ROWS:
            return "bmm"
        return "grouped_mm"

    def capture_graphs(self) -> None:
        """Capture `generate` per bucket of rows (CUDA only), with no row live: captures run as padding."""
        cfg, dev, S = self.config, self.device, self.max_slots
        inputs = TurnInputs(
            text_in=torch.full((S, cfg.text_in_slots), self.special.PAD, dtype=torch.long, device=dev),
            source=torch.zeros((S, cfg.text_in_slots), dtype=torch.long, device=dev),
            audio_in=torch.zeros(
                (S, cfg.audio_tokens, cfg.frames_per_audio_token, cfg.dmel_channels),
                dtype=torch.long, device=dev,
            ),
            forced=torch.full((S, cfg.text_out_slots), -1, dtype=torch.long, device=dev),
            exec_mask=torch.zeros(S, dtype=torch.bool, device=dev),
        )
        self.graphs = GraphedGenerate(self.generate, inputs)

    def _mark(self, marks: list[float], profile: bool) -> None:
        if profile:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            marks.append(time.perf_counter())
