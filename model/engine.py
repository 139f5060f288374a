"""The resident engine: one model, a static batch of session slots, one step per tick.

Contract
- `join(instructions, sampling) -> slot` takes a free slot (raises `EngineFull`),
  resets its state and prefills its pinned prefix; `leave(slot)` frees it.
- `step(inputs) -> outputs` runs one micro-turn for every joined slot in one
  batched forward: dMel-encode each slot's 200 ms of input audio, prefill the
  input positions (plus the previous turn's last output token), decode the
  text-out then audio-out tokens one position at a time, vocode the audio.
  Each output also carries `heard_tokens`: the text head's greedy reading
  of the turn's audio-in positions (CTC ids, PAD = blank), a transcript of
  the user's speech for checkpoints trained with `--heard-weight`
  (`Engine.hears`); noise for others.
  Slots missing from `inputs` get silence. Bad input in one slot (wrong
  shape, non-finite samples, bad token ids) is replaced by silence and
  reported in that slot's `SlotOutput.error`; other slots are untouched.
- join/leave/step are not thread-safe against each other: the caller runs
  them on one thread (the tick thread), never on an asyncio loop.

Rows: joined slots always occupy rows [0, n) of every per-slot tensor, so a
step computes exactly n rows; `leave` moves the last row into the hole.
Slot ids are stable handles mapped to rows.

This module knows nothing about clocks, sockets, protocol events or
background work. Legend: B rows (active slots), A audio tokens per turn,
k frames per audio token, C dMel channels, F = A*k dMel frames per turn.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time

import numpy as np
import torch

from .config import ModelConfig, preset
from .cuda_graphs import GraphedGenerate
from .dmel import DMel
from .kv_cache import KVCache
from .layout import embed_inputs, embed_output, image_patches, patch_indices
from .precision import slow_bf16_warning
from .sampling import sample
from .slots import TURN_SAMPLES, SamplingParams, SlotInput, SlotOutput
from .tokenizer import ByteTokenizer, TextOutDecoder
from .transformer import InteractionModel, build_model
from .vocoder import GriffinLimVocoder, Vocoder

log = logging.getLogger(__name__)

GPU_BMM_MAX_ROWS = 32  # above this many rows, gathering expert weights per token costs more than grouped_mm
DRAWS_PER_TURN = 64  # counter stride per micro-turn for the sampling hash (> output slots)


class EngineFull(RuntimeError):
    """Every slot is taken."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA; fp32 on CPU, where it keeps a session's output bit-identical whatever batch it
    shares (bf16 CPU kernels round differently with the batch size). bf16 on a CPU with native bf16
    matmuls is ~20% faster for tiny: pass dtype=torch.bfloat16 (`--dtype bfloat16`)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return default_dtype(device)
    try:
        dtype = DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose auto, float32 or bfloat16") from None
    if dtype == torch.bfloat16 and (warning := slow_bf16_warning(device)):
        log.warning(warning)
    return dtype


@dataclasses.dataclass
class _SlotMeta:
    """Host-side bookkeeping of one joined slot."""

    slot: int
    decoder: TextOutDecoder
    joined_at: float


def _take_rows(state, n: int):
    return dataclasses.replace(state, **{
        f.name: getattr(state, f.name)[:n] for f in dataclasses.fields(state)
    })


def _put_rows(full, part, n: int) -> None:
    for f in dataclasses.fields(full):
        getattr(full, f.name)[:n] = getattr(part, f.name)


def _copy_row(state, src: int, dst: int) -> None:
    for f in dataclasses.fields(state):
        t = getattr(state, f.name)
        t[dst] = t[src]


class Engine:
    def __init__(
        self,
        model: InteractionModel,
        max_slots: int = 64,
        device: str = "auto",
        vocoder: Vocoder | None = None,
        dtype: torch.dtype | None = None,
        hears: bool = False,
        wait_bias: float = 0.0,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.config: ModelConfig = model.cfg
        self.model = model.to(self.device, self.dtype).eval()
        self.model.inv_freq = self.model.inv_freq.to(torch.float64)
        self.hears = hears  # the text head transcribes the audio-in positions (training/heard.py)
        self.wait_bias_default = wait_bias  # the checkpoint's calibrated turn-taking bias; slots add theirs
        self.max_slots = max_slots
        self.tokenizer = ByteTokenizer()
        self.pad_id = torch.tensor([self.tokenizer.special.PAD], device=self.device)
        self.dmel = DMel(device=self.device)
        self.vocoder = vocoder or GriffinLimVocoder(device=self.device)
        cfg = self.config
        if cfg.dmel_frames_per_turn != self.dmel.cfg.frames_per_chunk:
            raise ValueError("model's audio tokens per turn do not cover one 200 ms dMel chunk")
        self.chunk = 1 + cfg.input_positions  # carried last output + this turn's inputs
        self.cache = KVCache(cfg, max_slots, self.chunk, self.device, self.dtype)
        dev, S = self.device, max_slots
        grid = (cfg.image_size // cfg.patch_size) ** 2
        self.next_pos = torch.zeros(S, dtype=torch.long, device=dev)  # next conversation position
        self.turn = torch.zeros(S, dtype=torch.long, device=dev)  # micro-turns run since join
        token_shape = (cfg.frames_per_audio_token, cfg.dmel_channels)
        self.carry = torch.zeros(S, *token_shape, dtype=torch.long, device=dev)  # last audio-out token
        self.has_carry = torch.zeros(S, dtype=torch.bool, device=dev)
        self.patches = torch.zeros(S, grid, cfg.patch_dim, dtype=self.dtype, device=dev)
        self.text_temp = torch.zeros(S, device=dev)
        self.text_top_k = torch.zeros(S, dtype=torch.long, device=dev)
        self.audio_temp = torch.zeros(S, device=dev)
        self.audio_top_k = torch.zeros(S, dtype=torch.long, device=dev)
        self.seed = torch.zeros(S, dtype=torch.long, device=dev)
        self.wait_bias = torch.zeros(S, device=dev)  # SamplingParams.wait_bias
        self.idle = torch.ones(S, dtype=torch.bool, device=dev)  # no text-out since the last EPAD
        self.dmel_state = self.dmel.init_stream(S)
        self.voc_state = self.vocoder.init_state(S, dev)
        self._per_row = [self.next_pos, self.turn, self.carry, self.has_carry, self.patches, self.text_temp,
                         self.text_top_k, self.audio_temp, self.audio_top_k, self.seed, self.wait_bias,
                         self.idle]
        self._rows: list[_SlotMeta] = []  # row -> slot
        self._row_of: dict[int, int] = {}  # slot -> row
        self.last_step_ms = 0.0
        self.graphs: GraphedGenerate | None = None  # CUDA graphs of `_generate` per batch bucket
        # Per-stage times of the last step (ms); filled only when `profile` is on (it adds device syncs).
        self.profile = False
        self.stage_ms: dict[str, float] = {}
        # Debug trace: when a list, each step appends its inputs, outputs and logits (host copies).
        self.trace: list[dict] | None = None

    @classmethod
    def from_preset(cls, name: str = "tiny", max_slots: int = 64, device: str = "auto", seed: int = 0,
                    **kw) -> Engine:
        return cls(build_model(preset(name), seed=seed), max_slots=max_slots, device=device, **kw)

    @classmethod
    def from_checkpoint(cls, path: str, max_slots: int = 64, device: str = "auto", **kw) -> Engine:
        from .checkpoint import load_checkpoint, read_config

        model, _ = load_checkpoint(path, lambda cfg: InteractionModel(cfg), "cpu")
        extra = read_config(path)[1]
        recipe = extra.get("recipe") or {}  # the last training stage's flags
        return cls(model, max_slots=max_slots, device=device, hears=bool(recipe.get("heard_weight")),
                   wait_bias=float(extra.get("wait_bias", 0.0)), **kw)

    # --- slots ---
    @property
    def active_slots(self) -> list[int]:
        return [m.slot for m in self._rows]

    def join(self, instructions: str = "", sampling: SamplingParams | None = None) -> int:
        if len(self._rows) >= self.max_slots:
            raise EngineFull(f"all {self.max_slots} slots are taken")
        slot = min(set(range(self.max_slots)) - set(self._row_of))
        row = len(self._rows)
        self._rows.append(_SlotMeta(slot, TextOutDecoder(self.tokenizer), time.monotonic()))
        self._row_of[slot] = row
        mask = torch.zeros(self.max_slots, dtype=torch.bool, device=self.device)
        mask[row] = True
        self.cache.reset(mask)
        self.dmel_state.reset(mask)
        self.vocoder.reset(self.voc_state, mask)
        for t in (self.turn, self.has_carry, self.patches):
            t[row] = 0
        self.idle[row] = True
        self.next_pos[row] = self.config.prefix_len
        self.set_sampling(slot, sampling or SamplingParams())
        self.set_instructions(slot, instructions)
        return slot

    def leave(self, slot: int) -> None:
        row = self._row_of.pop(slot)
        last = len(self._rows) - 1
        if row != last:
            self.cache.copy_row(last, row)
            for t in self._per_row:
                t[row] = t[last]
            _copy_row(self.dmel_state, last, row)
            _copy_row(self.voc_state, last, row)
            self._rows[row] = self._rows[last]
            self._row_of[self._rows[row].slot] = row
        self._rows.pop()

    def set_sampling(self, slot: int, p: SamplingParams) -> None:
        row = self._row_of[slot]
        self.text_temp[row], self.text_top_k[row] = p.text_temperature, p.text_top_k
        self.audio_temp[row], self.audio_top_k[row] = p.audio_temperature, p.audio_top_k
        self.seed[row] = p.seed
        self.wait_bias[row] = self.wait_bias_default + p.wait_bias

    @torch.inference_mode()
    def set_instructions(self, slot: int, instructions: str) -> None:
        """Prefill the pinned prefix: INSTR + instruction bytes, truncated to prefix_len."""
        row = self._row_of[slot]
        cfg, cache = self.config, self.cache
        cache.cell_pos[row, : cfg.prefix_len] = -1
        ids = [self.tokenizer.special.INSTR, *self.tokenizer.encode(instructions)][: cfg.prefix_len]
        tokens = torch.tensor([ids], device=self.device)
        pos = torch.arange(len(ids), device=self.device)[None]  # prefix cells are their positions
        rows = slice(row, row + 1)
        cache.claim(rows, pos, pos)
        self.model(self.model.embed_text(tokens), pos, cache.mask(rows, pos), cache, rows, pos)

    # --- the tick ---
    def _validate(self, inp: SlotInput | None) -> tuple[SlotInput, str | None]:
        """The row's input, or silence and the reason it was refused (other rows are unaffected)."""
        silence = SlotInput(audio=np.zeros(TURN_SAMPLES, np.float32))
        if inp is None:
            return silence, None
        try:
            return self._check(inp, silence)
        except (TypeError, ValueError, AttributeError) as exc:  # non-numeric audio, ids not ints
            return silence, f"malformed slot input: {exc}"

    def _check(self, inp: SlotInput, silence: SlotInput) -> tuple[SlotInput, str | None]:
        audio = np.asarray(inp.audio)
        if audio.shape != (TURN_SAMPLES,) or not np.isfinite(audio).all():
            return silence, f"audio must be {TURN_SAMPLES} finite samples, got shape {audio.shape}"
        vocab = self.tokenizer.vocab_size
        if len(inp.text_in) > self.config.text_in_slots or any(not 0 <= t < vocab for t in inp.text_in):
            return silence, f"text_in must be at most {self.config.text_in_slots} valid token ids"
        if len(inp.force_text_out) > self.config.text_out_slots or any(
            not 0 <= t < vocab for t in inp.force_text_out
        ):
            return silence, f"force_text_out must be at most {self.config.text_out_slots} valid token ids"
        if inp.image is not None:
            img = inp.image
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
                return silence, "image must be an (H, W, 3) uint8 RGB array"
        return inp, None

    @torch.inference_mode()
    def step(self, inputs: dict[int, SlotInput]) -> dict[int, SlotOutput]:
        t0 = time.perf_counter()
        B = len(self._rows)
        if B == 0:
            return {}
        cfg, dev = self.config, self.device
        sp = self.tokenizer.special
        checked = [self._validate(inputs.get(m.slot)) for m in self._rows]
        audio = torch.from_numpy(np.stack([c[0].audio for c in checked]).astype(np.float32)).to(dev)
        # host-side numpy first, one copy each to the device (per-row tensors cost ~us each x B)
        text_in = np.full((B, cfg.text_in_slots), sp.PAD, dtype=np.int64)
        source = np.zeros((B, cfg.text_in_slots), dtype=np.int64)
        forced = np.full((B, cfg.text_out_slots), -1, dtype=np.int64)
        for b, (inp, _) in enumerate(checked):
            if inp.text_in:
                text_in[b, : len(inp.text_in)] = inp.text_in
                source[b] = int(inp.text_in_background)
            if inp.force_text_out:
                forced[b, : len(inp.force_text_out)] = inp.force_text_out
            if inp.image is not None:
                self.patches[b] = torch.from_numpy(image_patches(inp.image, cfg)).to(dev, self.dtype)
        text_in, source, forced = (torch.from_numpy(a).to(dev) for a in (text_in, source, forced))

        marks = [time.perf_counter()]
        dstate = _take_rows(self.dmel_state, B)
        codes = self.dmel.encode_chunk(audio, dstate)  # (B, F, C)
        _put_rows(self.dmel_state, dstate, B)
        self._mark(marks)
        audio_in = codes.view(B, cfg.audio_tokens, cfg.frames_per_audio_token, cfg.dmel_channels)

        if self.graphs is not None and self.trace is None:
            text_out, audio_out, heard = self.graphs.run(B, text_in, source, audio_in, forced)
        else:
            self.model.set_moe_backend(self.moe_backend_for(B))
            exec_mask = torch.ones(B, dtype=torch.bool, device=dev)
            # (B, To), (B, A, k, C), (B, A)
            text_out, audio_out, heard = self._generate(B, exec_mask, text_in, source, audio_in, forced)
        self._mark(marks)

        logmel = self.dmel.decode(audio_out.reshape(B, -1, cfg.dmel_channels))  # (B, F, C)
        vstate = _take_rows(self.voc_state, B)
        pcm = self.vocoder.decode_chunk(logmel.float(), vstate)  # (B, TURN_SAMPLES)
        _put_rows(self.voc_state, vstate, B)
        self._mark(marks)
        if self.profile:
            self.stage_ms = {name: (b - a) * 1e3 for name, a, b in
                             zip(("prepare", "dmel", "model", "vocoder"), [t0, *marks], marks, strict=False)}

        pcm_host = pcm.float().clamp(-1, 1).cpu().numpy()
        text_host, heard_host = text_out.cpu().tolist(), heard.cpu().tolist()
        turns = self.turn[:B].cpu().tolist()
        outputs = {}
        for b, meta in enumerate(self._rows):
            decoded = meta.decoder.feed(text_host[b])
            outputs[meta.slot] = SlotOutput(
                audio=pcm_host[b], text_tokens=text_host[b], text=decoded.text, task_texts=decoded.task_texts,
                turn_index=turns[b] - 1, error=checked[b][1], heard_tokens=heard_host[b],
            )
        self.last_step_ms = (time.perf_counter() - t0) * 1e3
        return outputs

    def _generate(
        self,
        B: int,
        exec_mask: torch.Tensor,  # (B,)
        text_in: torch.Tensor,  # (B, Ti)
        source: torch.Tensor,  # (B, Ti)
        audio_in: torch.Tensor,  # (B, A, k, C)
        forced: torch.Tensor,  # (B, To) text-out ids to force, -1 = sample
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill the inputs, decode every output slot for rows [0, B); update cache, positions, carry, turn.
        -> text-out (B, To), audio-out (B, A, k, C), the greedy reading of the audio-in positions (B, A).

        Pure tensor work with static shapes and no host sync, so CUDA graphs can capture it; rows whose
        exec_mask (B,) is off (graph padding) write only to the trash cell.
        """
        cfg, dev, model, cache = self.config, self.device, self.model, self.cache
        sp = self.tokenizer.special
        rows = slice(0, B)
        turn, next_pos = self.turn[:B], self.next_pos[:B]
        ctrl = torch.where(turn == 0, sp.BOS, sp.CTRL)
        pidx = patch_indices(turn, cfg)  # (B, V)
        patches = self.patches[:B].gather(1, pidx[..., None].expand(-1, -1, cfg.patch_dim))
        x = torch.cat([
            embed_output(model, cfg.output_positions - 1, self.carry[:B, None]),
            embed_inputs(model, ctrl, patches, pidx, audio_in, text_in, source),
        ], dim=1)  # (B, 1 + Pin, D)
        pos = next_pos[:, None] - 1 + torch.arange(self.chunk, device=dev)  # (B, 1 + Pin)
        cells = cache.conversation_cells(pos, exec_mask)
        cells[:, 0] = torch.where(self.has_carry[:B], cells[:, 0], cache.trash)
        h = self._forward(x, pos, cells, rows)  # (B, 1 + Pin, D)
        first = 2 + cfg.video_patches  # after the carried token and CTRL
        heard = model.text_logits(h[:, first : first + cfg.audio_tokens]).argmax(-1)  # (B, A)
        h = h[:, -1]  # (B, D)

        counter = turn * DRAWS_PER_TURN
        idle = self.idle[:B]  # (B,) no text-out since the last EPAD
        text_out, audio_out, logits = [], [], []
        for o in range(cfg.output_positions):
            if o < cfg.text_out_slots:
                lg = model.text_logits(h)  # (B, vocab)
                # the turn-taking decision: while idle, staying silent (PAD) gains the row's wait_bias
                lg = lg.index_add(1, self.pad_id, (self.wait_bias[:B] * idle)[:, None])
                tok = sample(lg, self.text_temp[:B], self.text_top_k[:B], self.seed[:B], counter + o)
                tok = torch.where(forced[:, o] >= 0, forced[:, o], tok)
                idle = torch.where(tok == sp.PAD, idle, tok == sp.EPAD)
                text_out.append(tok)
            else:
                lg = model.audio_logits(h)  # (B, k, C, L)
                tok = sample(lg, self.audio_temp[:B], self.audio_top_k[:B], self.seed[:B], counter + o)
                audio_out.append(tok)
            tok_in = tok[:, None]
            if self.trace is not None:
                logits.append(lg.float().cpu())
            if o == cfg.output_positions - 1:
                break  # the last token's position is written with the next turn's prefill
            opos = next_pos[:, None] + cfg.input_positions + o  # (B, 1)
            h = self._forward(embed_output(model, o, tok_in), opos,
                              cache.conversation_cells(opos, exec_mask), rows)[:, -1]
        if self.trace is not None:
            self.trace.append({
                "slots": self.active_slots, "ctrl": ctrl.cpu(), "patches": patches.float().cpu(),
                "patch_idx": pidx.cpu(), "audio_in": audio_in.cpu(), "text_in": text_in.cpu(),
                "source": source.cpu(), "text_out": torch.stack(text_out, 1).cpu(),
                "audio_out": torch.stack(audio_out, 1).cpu(),
                "text_logits": torch.stack(logits[: cfg.text_out_slots], 1),
                "audio_logits": torch.stack(logits[cfg.text_out_slots :], 1),
            })
        self.idle[:B] = idle
        self.carry[:B] = audio_out[-1]
        self.has_carry[:B] = True
        self.next_pos[:B] += cfg.positions_per_turn
        self.turn[:B] += 1
        return torch.stack(text_out, dim=1), torch.stack(audio_out, dim=1), heard

    def moe_backend_for(self, rows: int) -> str:
        """gather+bmm for small GPU batches (fixed shapes, no sorting); grouped_mm otherwise."""
        if self.device.type == "cuda" and rows <= GPU_BMM_MAX_ROWS:
            return "bmm"
        return "grouped_mm"

    def _mark(self, marks: list[float]) -> None:
        if self.profile:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            marks.append(time.perf_counter())

    def _forward(self, x: torch.Tensor, pos: torch.Tensor, cells: torch.Tensor, rows: slice) -> torch.Tensor:
        self.cache.claim(rows, cells, pos)
        h, _ = self.model(x.to(self.dtype), pos, self.cache.mask(rows, pos), self.cache, rows, cells)
        return h

    def warmup(self, turns: int = 2, cuda_graphs: bool = True) -> None:
        """Pay first-call costs before serving; on CUDA, capture the tick per batch bucket."""
        if cuda_graphs and self.device.type == "cuda" and self.graphs is None and not self._rows:
            self.graphs = GraphedGenerate(self)
        slot = self.join("warmup")
        try:
            for _ in range(turns):
                self.step({})
        finally:
            self.leave(slot)
        # Everything alive now (model, caches, graphs) lives for the process: keep it out of the
        # cyclic GC's full collections, whose pauses otherwise land in random ticks' p99.
        gc.collect()
        gc.freeze()
