"""Training of the interaction model on synthetic duplex conversations (`microturn train`).

Contract: `main(args)` trains `--preset` (or the weights of `--checkpoint`) for `--steps`
optimiser steps on batches from `training/data.py`, teacher-forced through `layout.sequence_hidden`
(the inference mask, sliding window included). Loss = weighted text CE on text-out (answer bytes
and task markers CONTENT_TEXT_WEIGHT, each turn's first slot at least DECISION_TEXT_WEIGHT,
PAD/EPAD filler 1) + dMel CE per (frame, channel) on audio-out + the config's aux / z
coefficients times the MoE router losses summed over layers + `--heard-weight` times the CTC loss
of what the user said, read on the audio-in positions (training/heard.py). AdamW (or, with `--optimizer
muon`, Muon for the layers' attention and expert matrices and AdamW for the rest; training/muon.py),
linear warm-up then cosine decay, gradient clipping; `--precision bf16` autocasts the step, MoE
experts included (weights and optimiser state stay fp32); `--precision auto` does so only where bf16 is native
(model/precision.py: on an AVX2-only CPU bf16 is ~12x slower than fp32), and the recipe records
what ran. Batches come from a thread beside the step, or from
`--data-workers` processes when the step outruns one core (a GPU). Every `--save-every` steps
and at the end it writes `--out` (a checkpoint via `save_checkpoint`; `extra` holds step and
recipe), `--out/train_state.pt` (optimiser, schedule, step, loss history: what `--resume`
continues from) and `--out/loss.png`. Batches depend only on (seed, step), so a resumed run sees
the same data as an uninterrupted one.
Prints one line per `--log-every` steps and a JSON object as its last line.

This module does not know how conversations are made or how the engine serves the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.checkpoint import load_checkpoint, read_config, save_checkpoint
from ..model.config import ModelConfig, preset
from ..model.engine import resolve_device
from ..model.layout import Turns, audio_in_hidden, output_logits, sequence_hidden
from ..model.precision import resolve_precision, slow_bf16_warning
from ..model.tokenizer import ByteTokenizer
from ..model.transformer import InteractionModel, build_model
from .curricula import CURRICULA
from .data import DuplexGenerator
from .heard import Heard, heard_loss
from .muon import Muon

STATE_FILE = "train_state.pt"
PLOT_FILE = "loss.png"
MIN_LR_RATIO = 0.1  # cosine decays to this fraction of the peak learning rate
ADAM_BETAS = (0.9, 0.95)
# A grown ear (model/ear.py) starts at zero beside an audio embedding of norm ~60; at a fine-tuning
# rate of 1.5e-4 its output was a twentieth of that after 700 steps, too little to hear with.
EAR_LR_SCALE = 10.0
CONTENT_TEXT_WEIGHT = 5.0  # text-out loss weight of answer bytes and task markers vs PAD/EPAD filler
DECISION_TEXT_WEIGHT = 3.0  # least weight of each turn's first text-out slot: where speaking starts or stops
_SPECIAL = ByteTokenizer().special


@dataclass
class Losses:
    total: torch.Tensor
    text: torch.Tensor
    audio: torch.Tensor
    aux: torch.Tensor
    z: torch.Tensor
    heard: torch.Tensor

    def floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "text", "audio", "aux", "z", "heard")}


def compute_losses(model: InteractionModel, prefix: torch.Tensor, turns: Turns, heard: Heard | None = None,
                   heard_weight: float = 0.0) -> Losses:
    """Teacher-forced losses of one batch (router losses only exist with grads on); with
    `heard_weight` > 0, plus that times the CTC loss of what the user said (training/heard.py)."""
    cfg = model.cfg
    h, router = sequence_hidden(model, prefix, turns)
    text_logits, audio_logits = output_logits(model, h)
    targets = turns.text_out  # (B, T, To)
    per_token = F.cross_entropy(text_logits.flatten(0, -2), targets.flatten(), reduction="none")
    # most text-out slots are PAD/EPAD: without weighting, a low loss hides unlearned answer bytes;
    # slot 0 decides whether a turn starts (or stops) speech, the turn-taking behaviour itself
    filler = (targets == _SPECIAL.PAD) | (targets == _SPECIAL.EPAD)
    weight = torch.where(filler, 1.0, CONTENT_TEXT_WEIGHT)
    weight[..., 0] = weight[..., 0].clamp(min=DECISION_TEXT_WEIGHT)
    weight = weight.flatten().to(per_token.dtype)
    text = (per_token * weight).sum() / weight.sum()
    audio = F.cross_entropy(audio_logits.flatten(0, -2), turns.audio_out.flatten())
    zero = text.new_zeros(())
    aux = sum((r.aux for r in router if r is not None), zero)
    z = sum((r.z for r in router if r is not None), zero)
    heard_ctc = zero
    if heard is not None and heard_weight:
        heard_ctc = heard_loss(model, audio_in_hidden(cfg, h), heard)
    total = text + audio + cfg.aux_loss_coef * aux + cfg.z_loss_coef * z + heard_weight * heard_ctc
    return Losses(total, text, audio, aux, z, heard_ctc)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine down to MIN_LR_RATIO at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def _is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """What Muon trains: the layers' attention and expert weights. Embeddings and heads (one
    side is a vocabulary), norms and the small router stay on AdamW, as in the Muon papers."""
    return name.startswith("layers.") and p.dim() >= 2 and ".router." not in name


def make_optimizers(model: torch.nn.Module, lr: float, weight_decay: float,
                    kind: str = "adamw") -> list[torch.optim.Optimizer]:
    """AdamW decaying matrices only (norms, biases and 1-D parameters are left alone), the ear's at
    EAR_LR_SCALE times the rate; with `kind="muon"`, hidden matrices go to a Muon ahead of it at the
    same learning rate."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [p for n, p in named if kind == "muon" and _is_hidden_matrix(n, p)]
    taken = {id(p) for p in muon}
    ear = [p for n, p in named if n.startswith("ear.")]
    taken |= {id(p) for p in ear}
    rest = [p for _, p in named if id(p) not in taken]
    groups = [{"params": [p for p in params if (p.dim() >= 2) == decays], "lr": lr * scale,
               "weight_decay": weight_decay if decays else 0.0}
              for params, scale in ((rest, 1.0), (ear, EAR_LR_SCALE)) if params for decays in (True, False)]
    adamw = torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS)
    return ([Muon(muon, lr=lr, weight_decay=weight_decay)] if muon else []) + [adamw]


def plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [h["step"] for h in history]
    for key in ("total", "text", "audio", "heard"):
        if any(h.get(key) for h in history):
            ax.plot(steps, [h.get(key, 0.0) for h in history], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_WORKER_GEN: DuplexGenerator | None = None  # one generator per data worker process


def _init_worker(cfg: ModelConfig, seed: int, turns: int, curriculum: str) -> None:
    global _WORKER_GEN
    torch.set_num_threads(1)  # workers share the machine with the training step
    _WORKER_GEN = DuplexGenerator(cfg, "train", seed=seed, turns=turns, curriculum=CURRICULA[curriculum])


def _worker_batch(step: int, size: int) -> tuple[torch.Tensor, Turns, Heard]:
    assert _WORKER_GEN is not None
    return _WORKER_GEN.batch(step, size)


def _batch_source(cfg: ModelConfig, args: argparse.Namespace) -> tuple[Executor, Callable]:
    """Where batches are made: one thread beside the step (the CPU default), or `--data-workers`
    processes, each with its own generator, when the step is faster than one core makes data (GPU)."""
    if args.data_workers <= 1:
        gen = DuplexGenerator(cfg, "train", seed=args.seed, turns=args.turns,
                              curriculum=CURRICULA[args.curriculum])
        return ThreadPoolExecutor(max_workers=1), gen.batch
    # spawn: forking a process whose torch already runs threads can deadlock
    pool = ProcessPoolExecutor(args.data_workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker,
                               initargs=(cfg, args.seed, args.turns, args.curriculum))
    return pool, _worker_batch


def _model_and_config(args: argparse.Namespace) -> tuple[InteractionModel, ModelConfig]:
    resume_dir = Path(args.out) if args.resume else None
    source = resume_dir or (Path(args.checkpoint) if args.checkpoint else None)
    if source is not None:
        model, cfg = load_checkpoint(source, lambda c: InteractionModel(c))
        if args.ear_channels and not args.resume and cfg.ear_channels != args.ear_channels:
            return grow_ear(model, cfg, args.ear_channels, args.seed)
        return model, cfg
    cfg = dataclasses.replace(preset(args.preset), ear_channels=args.ear_channels)
    return build_model(cfg, seed=args.seed), cfg


def grow_ear(model: InteractionModel, cfg: ModelConfig, channels: int,
             seed: int) -> tuple[InteractionModel, ModelConfig]:
    """`model` with a new ear of `channels` (model/ear.py): every other weight is copied, and the
    ear's output starts at zero, so the grown model computes what `model` did."""
    if cfg.ear_channels:
        raise SystemExit(f"the checkpoint already has an ear of {cfg.ear_channels} channels")
    grown_cfg = dataclasses.replace(cfg, ear_channels=channels)
    grown = build_model(grown_cfg, seed=seed)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("ear.") for k in missing), (missing, unexpected)
    return grown, grown_cfg


def main(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out)
    model, cfg = _model_and_config(args)
    model = model.to(device).train()
    precision = resolve_precision(args.precision, device)
    if precision == "bf16" and (warning := slow_bf16_warning(device)):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    print(f"device {device}, precision {precision} (asked: {args.precision})", flush=True)
    opts = make_optimizers(model, args.lr, args.weight_decay, args.optimizer)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, args.warmup, args.steps))
              for o in opts]
    step, history = 0, []
    if args.resume:
        state = torch.load(out / STATE_FILE, map_location=device, weights_only=False)
        if len(state["optimizers"]) != len(opts):
            raise SystemExit(f"{out / STATE_FILE} was written with another --optimizer")
        for o, s in zip(opts, state["optimizers"], strict=True):
            o.load_state_dict(s)
        for sc, s in zip(scheds, state["schedulers"], strict=True):
            sc.load_state_dict(s)
        step, history = state["step"], state["history"]
        read_config(out)  # fail early on a damaged checkpoint
    recipe = {k: getattr(args, k) for k in ("preset", "steps", "batch", "turns", "lr", "warmup", "seed",
                                             "weight_decay", "clip", "curriculum", "heard_weight",
                                             "ear_channels", "optimizer")}
    recipe["precision"] = precision  # what ran, not what was asked (auto)
    if args.checkpoint and not args.resume:
        recipe["from"] = str(args.checkpoint)

    def save() -> None:
        save_checkpoint(out, model, cfg, extra={"step": step, "recipe": recipe, "data": "training/data.py"})
        torch.save({"optimizers": [o.state_dict() for o in opts],
                    "schedulers": [sc.state_dict() for sc in scheds], "step": step,
                    "history": history}, out / STATE_FILE)
        if history:
            plot_losses(history, out / PLOT_FILE)

    t_start = time.perf_counter()
    start_step = step
    pool, make_batch = _batch_source(cfg, args)
    ahead = max(1, 2 * args.data_workers)  # batches in flight while this one trains
    with pool:
        first = range(step, min(step + ahead, args.steps))
        pending = deque(pool.submit(make_batch, s, args.batch) for s in first)
        while step < args.steps:
            prefix, turns, heard = pending.popleft().result()
            if step + ahead < args.steps:
                pending.append(pool.submit(make_batch, step + ahead, args.batch))
            turns = Turns(**{k: v.to(device) for k, v in vars(turns).items()})
            # bf16 autocast (the MoE experts too, cast in model/moe.py): about twice as fast as fp32 where
            # bf16 is native; weights, optimiser state and the loss reductions stay fp32
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                losses = compute_losses(model, prefix.to(device), turns, heard.to(device), args.heard_weight)
            model.zero_grad(set_to_none=True)  # every optimiser's parameters
            losses.total.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
            for o, sc in zip(opts, scheds, strict=True):
                o.step()
                sc.step()
            step += 1
            history.append({"step": step, **losses.floats(), "grad_norm": grad_norm,
                            "lr": scheds[0].get_last_lr()[0]})
            if step % args.log_every == 0 or step == args.steps:
                h, rate = history[-1], (time.perf_counter() - t_start) / (step - start_step)
                print(f"step {step:6d}  loss {h['total']:.4f}  text {h['text']:.4f}  audio {h['audio']:.4f}  "
                      f"heard {h['heard']:.4f}  "
                      f"aux {h['aux']:.3f}  z {h['z']:.3f}  |g| {grad_norm:.2f}  lr {h['lr']:.2e}  "
                      f"{rate:.2f} s/step", flush=True)
            if step % args.save_every == 0:
                save()
    save()
    seconds = time.perf_counter() - t_start
    last = history[-1] if history else {}
    print(json.dumps({"steps": step, "loss": last.get("total"), "text_loss": last.get("text"),
                      "audio_loss": last.get("audio"), "heard_loss": last.get("heard"),
                      "first_loss": history[0]["total"] if history else None,
                      "seconds": round(seconds, 2),
                      "sec_per_step": round(seconds / max(1, step - start_step), 3), "checkpoint": str(out)}))
    return 0
