"""Training lowers the loss; `microturn train` saves, resumes, plots; `microturn eval duplex` runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from microturn.cli import main as cli_main
from microturn.model.checkpoint import load_checkpoint, read_config, save_checkpoint
from microturn.model.config import ModelConfig, tiny
from microturn.model.tokenizer import ByteTokenizer
from microturn.model.transformer import InteractionModel, build_model
from microturn.training.curricula import REFINE
from microturn.training.data import DuplexGenerator
from microturn.training.evaluate import (
    METRIC_KEYS,
    OBSERVATIONS,
    Recording,
    SpeechJudge,
    eval_conversations,
    heard_error_rates,
    score,
)
from microturn.training.heard import utterance_spans
from microturn.training.train import _batch_source, compute_losses, make_optimizers


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(kind: str, micro_config: ModelConfig) -> None:
    cfg = micro_config
    torch.manual_seed(0)
    model = build_model(cfg, seed=0).train()
    prefix, turns, _ = DuplexGenerator(cfg, "train", seed=0, turns=12).batch(0, 2)
    opts = make_optimizers(model, lr=3e-3, weight_decay=0.0, kind=kind)
    assert len(opts) == (2 if kind == "muon" else 1)
    first = compute_losses(model, prefix, turns)
    assert first.aux > 0 and first.z > 0  # router losses are live while training
    for _ in range(12):
        losses = compute_losses(model, prefix, turns)
        for opt in opts:
            opt.zero_grad()
        losses.total.backward()
        for opt in opts:
            opt.step()
    last = compute_losses(model, prefix, turns)
    assert last.text < 0.7 * first.text and last.audio < 0.9 * first.audio, (first.floats(), last.floats())


def _json_tail(capsys: pytest.CaptureFixture) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_cli_saves_resumes_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    flags = ["--out", str(out), "--batch", "1", "--turns", "8", "--warmup", "1", "--save-every", "1",
             "--device", "cpu"]
    assert cli_main(["train", *flags, "--steps", "2", "--precision", "bf16", "--heard-weight", "0.1"]) == 0
    first = _json_tail(capsys)
    # 8 turns may hold no whole utterance; that the loss trains is test_heard's, here it is reported
    assert first["steps"] == 2 and first["heard_loss"] is not None
    recipe = read_config(out)[1]["recipe"]
    assert recipe["precision"] == "bf16" and recipe["heard_weight"] == 0.1
    assert (out / "loss.png").stat().st_size > 0 and (out / "train_state.pt").is_file()
    assert cli_main(["train", *flags, "--steps", "3", "--resume"]) == 0
    result = _json_tail(capsys)
    assert result["steps"] == 3 and np.isfinite(result["loss"])
    _, extra = read_config(out)
    assert extra["step"] == 3
    model, cfg = load_checkpoint(out, lambda c: InteractionModel(c))
    assert cfg == tiny()

    shipped = tmp_path / "shipped"
    assert cli_main(["export", "--checkpoint", str(out), "--out", str(shipped)]) == 0
    assert _json_tail(capsys)["weights_bytes"] < 0.55 * (out / "model.safetensors").stat().st_size
    _, shipped_extra = read_config(shipped)
    assert shipped_extra["step"] == 3 and shipped_extra["stored_dtype"] == "bfloat16"
    assert (shipped / "loss.png").is_file() and not (shipped / "train_state.pt").exists()
    bf16, _ = load_checkpoint(shipped, lambda c: InteractionModel(c))
    for (name, a), b in zip(model.state_dict().items(), bf16.state_dict().values(), strict=True):
        assert b.dtype == a.dtype and torch.equal(b, a.to(torch.bfloat16).to(a.dtype)), name


def test_train_cli_resumes_a_muon_run_and_refuses_another_optimizer(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    flags = ["--out", str(out), "--batch", "1", "--turns", "8", "--warmup", "1", "--save-every", "1",
             "--device", "cpu"]
    assert cli_main(["train", *flags, "--steps", "2", "--optimizer", "muon"]) == 0
    assert read_config(out)[1]["recipe"]["optimizer"] == "muon"
    state = torch.load(out / "train_state.pt", weights_only=False)
    muon_state = state["optimizers"][0]["state"]
    assert muon_state and all(s["momentum_buffer"].dim() >= 2 for s in muon_state.values())
    assert cli_main(["train", *flags, "--steps", "3", "--optimizer", "muon", "--resume"]) == 0
    assert _json_tail(capsys)["steps"] == 3
    with pytest.raises(SystemExit, match="another --optimizer"):
        cli_main(["train", *flags, "--steps", "4", "--resume"])


def test_export_averages_checkpoints_of_one_model(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  micro_config: ModelConfig) -> None:
    cfg = micro_config
    paths = []
    for seed in (1, 2, 3):
        paths.append(tmp_path / f"seed{seed}")
        save_checkpoint(paths[-1], build_model(cfg, seed=seed), cfg, extra={"step": seed})
    out = tmp_path / "mean"
    argv = ["export", "--checkpoint", str(paths[0]), "--out", str(out), "--dtype", "float32"]
    assert cli_main([*argv, "--average", str(paths[1]), str(paths[2])]) == 0
    assert _json_tail(capsys)["checkpoint"] == str(out)
    mean, _ = load_checkpoint(out, InteractionModel)
    models = [load_checkpoint(p, InteractionModel)[0].state_dict() for p in paths]
    for name, value in mean.state_dict().items():
        torch.testing.assert_close(value, sum(m[name] for m in models) / 3, rtol=1e-6, atol=1e-6)
    assert read_config(out)[1]["averaged_with"] == [str(paths[1]), str(paths[2])]
    other = tmp_path / "other"
    other_cfg = dataclasses.replace(cfg, rope_theta=500.0)  # same shapes, another model
    save_checkpoint(other, build_model(other_cfg, seed=4), other_cfg)
    assert cli_main([*argv, "--average", str(other)]) != 0
    assert "config differs" in capsys.readouterr().err


def test_data_worker_processes_make_the_same_batches_as_the_thread(micro_config: ModelConfig) -> None:
    """--data-workers (a GPU's feed) must not change what a recipe trains on: batches hang on (seed, step)."""
    cfg = micro_config
    args = argparse.Namespace(seed=5, turns=6, data_workers=2, curriculum="refine")
    pool, make_batch = _batch_source(cfg, args)
    with pool:
        made = [pool.submit(make_batch, step, 2) for step in (3, 0)]
        (prefix3, turns3, _), (prefix0, turns0, _) = (f.result() for f in made)
    gen = DuplexGenerator(cfg, "train", seed=5, turns=6, curriculum=REFINE)
    for (prefix, turns), step in (((prefix3, turns3), 3), ((prefix0, turns0), 0)):
        ref_prefix, ref_turns, _ = gen.batch(step, 2)
        assert torch.equal(prefix, ref_prefix)
        for name, value in vars(ref_turns).items():
            assert torch.equal(getattr(turns, name), value), (step, name)


def test_eval_scores_the_reference_streams_perfectly() -> None:
    """The labels and the scorer agree: the generator's own model side passes every metric."""
    gen = DuplexGenerator(tiny(), "heldout", seed=0)
    obs: dict[str, list] = {k: [] for k in OBSERVATIONS}
    judge = SpeechJudge(gen)
    for conv in eval_conversations(gen, 12):
        codes = gen.dmel.encode(torch.from_numpy(conv.model_audio)[None])[0].numpy()
        for ep in conv.episodes:
            score(ep, Recording(conv.text_out, codes), judge, obs)
    assert obs["pause"] and not any(obs["pause"])
    for key in ("takeover", "fallback", "fallback_takeover", "stop", "delegation", "task_text", "vision",
                "text", "speech"):
        assert obs[key] and all(obs[key]), key
    by_intent = {k for k in obs if k.startswith("text ")}
    assert {"text arith spoken", "text time typed"} <= by_intent, by_intent
    assert sum(len(obs[k]) for k in by_intent) == len(obs["text"])
    assert 200 < np.median(obs["latency"]) <= 400 and max(obs["stop_ms"]) <= 400


def test_heard_error_rates_read_each_utterance_span() -> None:
    """A model that reads every utterance right scores 0; one that hears nothing scores 1; one word
    wrong costs that word."""
    cfg = tiny()
    gen = DuplexGenerator(cfg, "heldout", seed=0)
    convs = eval_conversations(gen, 6)
    pad = ByteTokenizer().special.PAD

    def reading(conv, change: dict[str, str]) -> Recording:
        ids = [pad] * (conv.turns * cfg.audio_tokens)
        for first, _, text in utterance_spans(conv.user_said, cfg):
            text = " ".join(change.get(w, w) for w in text.split())
            spelled = []
            for b in text.encode():  # a blank between doubled letters, as CTC needs
                spelled += [pad, b] if spelled and spelled[-1] == b else [b]
            ids[first : first + len(spelled)] = spelled
        return Recording(conv.text_out, np.zeros((1, cfg.dmel_channels)), [ids])

    assert heard_error_rates(convs, [reading(c, {}) for c in convs], cfg) == (0.0, 0.0)
    deaf = [Recording(c.text_out, np.zeros((1, cfg.dmel_channels)), []) for c in convs]
    assert heard_error_rates(convs, deaf, cfg) == (1.0, 1.0)
    cer, wer = heard_error_rates(convs, [reading(c, {"the": "da"}) for c in convs], cfg)
    assert 0 < cer < wer < 0.5


def test_eval_duplex_runs_end_to_end_on_a_random_model(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       micro_config: ModelConfig) -> None:
    cfg = micro_config
    save_checkpoint(tmp_path / "ckpt", build_model(cfg, seed=0), cfg)
    argv = ["eval", "duplex", "--checkpoint", str(tmp_path / "ckpt"), "--conversations", "2", "--batch", "2",
            "--synth", "espeak", "--device", "cpu"]
    assert cli_main(argv) == 0
    result = _json_tail(capsys)
    assert set(METRIC_KEYS) <= set(result) and result["conversations"] == 2
    assert all(re.fullmatch(r"\d+/\d+", v) for v in result["answers_right_by_intent"].values())
    assert result["split"] == "heldout"
    assert cli_main([*argv, "--split", "train", "--seed", "77"]) == 0
    assert _json_tail(capsys)["split"] == "train"
