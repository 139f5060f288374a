"""What the user said: the CTC target on the audio-in positions (training/heard.py) and its read-out,
streamed by the server as input transcription events."""

from __future__ import annotations

import json

import numpy as np
import torch

from microturn.model.config import ModelConfig, tiny
from microturn.model.layout import audio_in_hidden, sequence_hidden
from microturn.model.slots import TURN_SAMPLES, SlotInput, SlotOutput
from microturn.model.tokenizer import ByteTokenizer, CtcStreamDecoder
from microturn.model.transformer import build_model
from microturn.server.session import Session
from microturn.server.settings import ServerSettings
from microturn.training.curricula import REFINE
from microturn.training.data import DuplexGenerator
from microturn.training.heard import HEARD_LAG_TOKENS, heard_loss, heard_targets, normalise_spoken
from microturn.training.train import compute_losses, make_optimizers

TOK = ByteTokenizer()


def test_normalise_spoken_gives_one_target_per_sound() -> None:
    assert normalise_spoken("What's THREE plus 4?") == "what's 3 plus 4"
    assert normalise_spoken("hey,   how are you") == "hey how are you"
    assert normalise_spoken("what is 3 plus 4") == normalise_spoken("what is three plus four")
    assert normalise_spoken("?!") == ""


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


def test_no_utterance_no_loss(micro_config: ModelConfig) -> None:
    cfg = micro_config
    model = build_model(cfg, seed=0)
    heard = heard_targets([[], []], cfg)
    assert float(heard_loss(model, torch.zeros(2, 8, cfg.d_model), heard)) == 0.0


def test_a_few_steps_lower_the_transcript_loss_of_a_fixed_batch(micro_config: ModelConfig) -> None:
    cfg = micro_config
    torch.manual_seed(0)
    model = build_model(cfg, seed=0).train()
    prefix, turns, heard = DuplexGenerator(cfg, "train", seed=1, turns=24, curriculum=REFINE).batch(0, 2)
    assert len(heard.row) >= 2
    (opt,) = make_optimizers(model, lr=3e-3, weight_decay=0.0)
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


def test_ctc_read_out_collapses_runs_across_turns_and_drops_blanks() -> None:
    pad, h, i, l_ = TOK.special.PAD, *TOK.encode("hil")
    dec = CtcStreamDecoder()
    assert dec.feed([pad, h, h, pad]) == "h"
    assert dec.feed([pad, i, i, i]) == "i"
    assert dec.feed([i, l_, pad, l_]) == "ll"  # a run continues across turns; a blank splits a double
    assert dec.feed([TOK.special.CTRL, pad, pad, pad]) == ""


def _session(hears: bool) -> Session:
    return Session(ServerSettings(), TOK, 4, 4, on_overflow=lambda: None, hears=hears)


def _events(session: Session) -> list[dict]:
    out = []
    while (message := session.pop_message()) is not None:
        if isinstance(message, str):
            out.append(json.loads(message))
    return [e for e in out if e["type"] != "response.output_audio.delta"]


def _turn(session: Session, heard: str, loud: bool) -> None:
    pad = TOK.special.PAD
    ids = [x for c in TOK.encode(heard) for x in (c, pad)][:4]
    ids += [pad] * (4 - len(ids))
    audio = np.full(TURN_SAMPLES, 0.3 if loud else 0.0, np.float32)
    out = SlotOutput(audio=np.zeros(TURN_SAMPLES, np.float32), text_tokens=[pad] * 4, text="", task_texts=[],
                     turn_index=0,
                     heard_tokens=ids)
    session.deliver(out, SlotInput(audio=audio))


def test_session_streams_what_the_model_heard_as_one_speech_item() -> None:
    session = _session(hears=True)
    assert session.session_dict()["audio"]["input"]["transcription"] == {"model": "microturn"}
    for heard in ("hi", " t", "he", "re"):
        _turn(session, heard, loud=True)
    _turn(session, "!", loud=False)  # the model names the last byte after the speech ended
    for _ in range(6):
        _turn(session, "", loud=False)
    events = _events(session)
    started = [e for e in events if e["type"] == "input_audio_buffer.speech_started"]
    deltas = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.delta"]
    done = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert len(started) == 1 and len(done) == 1
    assert {e["item_id"] for e in deltas + done} == {started[0]["item_id"]}
    assert "".join(e["delta"] for e in deltas) == "hi there!" and done[0]["transcript"] == "hi there!"
    # no delta names an item before the client was told of it (committed, added), none after completed
    mine = started[0]["item_id"]
    kinds = [e["type"] for e in events if e.get("item_id", e.get("item", {}).get("id")) == mine]
    assert kinds.index("input_audio_buffer.committed") < kinds.index(deltas[0]["type"])
    assert kinds[-1] == "conversation.item.input_audio_transcription.completed"


def test_session_without_a_hearing_model_sends_no_transcripts() -> None:
    session = _session(hears=False)
    assert session.session_dict()["audio"]["input"]["transcription"] is None
    for heard in ("hi", "", "", "", ""):
        _turn(session, heard, loud=heard != "")
    assert not [e for e in _events(session) if "transcription" in e["type"]]


def test_a_reply_that_starts_while_the_user_speaks_comes_after_the_users_item():
    """The model may take the turn before voice activity calls the speech over: the user's item is
    committed first, so clients' history has the question before its answer."""
    session = _session(hears=True)
    _turn(session, "hi", loud=True)
    pad = TOK.special.PAD
    reply = SlotOutput(audio=np.full(TURN_SAMPLES, 0.3, np.float32), text_tokens=[*TOK.encode("yes"), pad],
                       text="yes", task_texts=[], turn_index=1, heard_tokens=[pad] * 4)
    session.deliver(reply, SlotInput(audio=np.full(TURN_SAMPLES, 0.3, np.float32)))
    types = [e["type"] for e in _events(session)]
    assert types.index("input_audio_buffer.committed") < types.index("response.created")
    assert types.index("conversation.item.input_audio_transcription.delta") < types.index("response.created")
    assert types.count("input_audio_buffer.speech_stopped") == 1
