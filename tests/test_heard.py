"""The transcript target on the audio-in positions (model/heard.py): targets, spans and CTC."""

from __future__ import annotations

import dataclasses

import torch

from microturn.model.config import tiny
from microturn.model.data import REFINE, DuplexGenerator
from microturn.model.heard import HEARD_LAG_TOKENS, heard_loss, heard_targets, normalise
from microturn.model.layout import audio_in_hidden, sequence_hidden
from microturn.model.slots import TURN_SAMPLES
from microturn.model.tokenizer import ByteTokenizer
from microturn.model.train import compute_losses, make_optimizer
from microturn.model.transformer import build_model

TOK = ByteTokenizer()


def _small():
    return dataclasses.replace(tiny(), d_model=64, n_layers=2, n_experts=4, d_expert=64, d_channel_embed=4)


def test_normalise_gives_one_target_per_sound() -> None:
    assert normalise("What's THREE plus 4?") == "what's 3 plus 4"
    assert normalise("hey,   how are you") == "hey how are you"
    assert normalise("what is 3 plus 4") == normalise("what is three plus four")
    assert normalise("?!") == ""


def test_spans_start_at_the_speech_run_past_it_and_stop_at_the_next_utterance() -> None:
    cfg = tiny()
    token = TURN_SAMPLES // cfg.audio_tokens
    said = [[(3 * token + 5, 10 * token, "say apple"), (14 * token, 20 * token, "stop")],
            [(0, 2 * token, "?")],  # nothing to transcribe: no target
            [(token, 4 * token, "hi")]]
    heard = heard_targets(said, cfg)
    assert heard.row.tolist() == [0, 0, 2]
    assert heard.start.tolist() == [3, 14, 1]
    # the first is cut one token before the second starts; the others run HEARD_LAG_TOKENS past their end
    assert heard.length.tolist() == [14 - 3, 19 + HEARD_LAG_TOKENS - 14 + 1, 3 + HEARD_LAG_TOKENS - 1 + 1]
    assert heard.target_length.tolist() == [9, 4, 2]
    assert TOK.decode(heard.targets[0].tolist()) == "say apple"
    assert heard.targets[2, 2:].eq(TOK.special.PAD).all()


def test_no_utterance_no_loss() -> None:
    cfg = _small()
    model = build_model(cfg, seed=0)
    heard = heard_targets([[], []], cfg)
    assert float(heard_loss(model, torch.zeros(2, 8, cfg.d_model), heard)) == 0.0


def test_a_few_steps_lower_the_transcript_loss_of_a_fixed_batch() -> None:
    cfg = _small()
    torch.manual_seed(0)
    model = build_model(cfg, seed=0).train()
    prefix, turns, heard = DuplexGenerator(cfg, "train", seed=1, turns=24, curriculum=REFINE).batch(0, 2)
    assert len(heard.row) >= 2
    opt = make_optimizer(model, lr=3e-3, weight_decay=0.0)
    first = compute_losses(model, prefix, turns, heard, heard_weight=1.0)
    assert first.heard > 0 and torch.isfinite(first.heard)
    # off by default: the earlier recipe stages keep their loss
    assert float(compute_losses(model, prefix, turns, heard).heard) == 0.0
    for _ in range(15):
        losses = compute_losses(model, prefix, turns, heard, heard_weight=1.0)
        opt.zero_grad()
        losses.total.backward()
        opt.step()
    last = compute_losses(model, prefix, turns, heard, heard_weight=1.0)
    assert last.heard < 0.8 * first.heard, (first.floats(), last.floats())
    # the loss reads the audio-in positions: their hidden states are what it trains
    h, _ = sequence_hidden(model, prefix, turns)
    assert audio_in_hidden(cfg, h).shape == (2, 24 * cfg.audio_tokens, cfg.d_model)
