"""The synthetic duplex generator: determinism, stream alignment, splits, and the engine's exact view."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from microturn.model.config import ModelConfig, tiny
from microturn.model.engine import Engine
from microturn.model.layout import Turns
from microturn.model.slots import SAMPLE_RATE, TURN_SAMPLES
from microturn.model.tokenizer import ByteTokenizer
from microturn.model.transformer import build_model
from microturn.training.curricula import (
    CHAT_INTENTS,
    CURRICULA,
    GREETINGS,
    NUMBERS,
    PHRASINGS,
    REFINE,
    SCENARIOS,
    SOUNDALIKE_GREETINGS,
    SUMS,
    Curriculum,
)
from microturn.training.data import DuplexGenerator
from microturn.training.espeak import speak
from microturn.training.voices import HELD_OUT_VARIANTS, user_voices

SPEECH_MEAN_CODE = 3.0  # dMel frame mean code: digital silence is 1, espeak speech 5 and up
SP = ByteTokenizer().special


def _plain_words(phrasing: str) -> str:
    """Lower case, no commas or apostrophes, single spaces: how phrasings are compared."""
    return " ".join(phrasing.replace(",", " ").replace("'", "").lower().split())


def test_same_seed_same_conversations_other_seed_differs() -> None:
    a, b, c = (DuplexGenerator(tiny(), "train", seed=s, turns=24) for s in (5, 5, 6))
    for i in range(3):
        x, y, z = a.conversation(i), b.conversation(i), c.conversation(i)
        assert np.array_equal(x.user_audio, y.user_audio) and np.array_equal(x.model_audio, y.model_audio)
        assert x.text_out == y.text_out and x.text_in == y.text_in and x.episodes == y.episodes
        assert not np.array_equal(x.user_audio, z.user_audio)
    pa, ta, ha = a.batch(1, 3)
    pb, tb, hb = b.batch(1, 3)
    assert torch.equal(pa, pb)
    for f in dataclasses.fields(Turns):
        assert torch.equal(getattr(ta, f.name), getattr(tb, f.name)), f.name
    for name, value in vars(ha).items():
        assert torch.equal(getattr(hb, name), value), name


def test_streams_have_equal_turns_and_speech_never_leads_text() -> None:
    gen = DuplexGenerator(tiny(), "train", seed=1, turns=40)
    kinds_seen = set()
    for i in range(12):
        conv = gen.conversation(i)
        kinds_seen |= {e.kind for e in conv.episodes}
        n = conv.turns
        assert n == 40 and len(conv.user_audio) == len(conv.model_audio) == n * TURN_SAMPLES
        assert len(conv.text_in) == len(conv.background) == len(conv.text_out) == n
        _, turns = gen.turns_of([conv])
        for name in ("ctrl", "patches", "audio_in", "text_in", "source", "text_out", "audio_out"):
            assert getattr(turns, name).shape[1] == n, name
        speaking = (turns.audio_out[0].float().mean(dim=(1, 3)) > SPEECH_MEAN_CODE).any(dim=1).tolist()
        texting = [any(t != SP.PAD for t in row) for row in conv.text_out]
        last_text = -1
        for t in range(n):
            if texting[t]:
                last_text = t
            if speaking[t] and (t == 0 or not speaking[t - 1]):  # a speech onset needs text at or before it
                prev_speech_end = max((s for s in range(t) if speaking[s]), default=-1)
                assert last_text > prev_speech_end, f"conversation {i}: speech at turn {t} before its text"
        assert all(len(row) <= gen.cfg.text_in_slots for row in conv.text_in)
    assert kinds_seen >= {"answer", "pause"}, kinds_seen


def test_scenario_labels_match_the_reference_streams() -> None:
    gen = DuplexGenerator(tiny(), "heldout", seed=2)
    tok = ByteTokenizer()
    for i, kind in enumerate(SCENARIOS):
        conv = gen.conversation(i, kinds=(kind,))
        (ep,) = conv.episodes
        out = [t for row in conv.text_out[ep.respond_turn :] for t in row]
        if kind == "task":
            assert out[out.index(SP.TASK_START) + 1 : out.index(SP.TASK_END)] == tok.encode(ep.task)
            span = slice(ep.result_turn, ep.result_end_turn + 1)
            result = [t for row in conv.text_in[span] for t in row]
            assert result[0] == SP.SRC_BACKGROUND and all(conv.background[span])
        elif kind != "interrupt":
            assert tok.decode(out[: out.index(SP.EPAD)]) == ep.answer
        if ep.typed:
            typed = [t for t, row in enumerate(conv.text_in) if row and not conv.background[t]]
            assert conv.text_in[typed[0]][0] == SP.SRC_USER and typed[-1] == ep.input_end_turn
        assert ep.respond_turn == ep.input_end_turn + 1
        if kind == "pause":
            start, end = (int(ms * 16) for ms in ep.pause_ms)
            quiet = np.abs(conv.user_audio[start + 1 : end - 1]).max()
            assert quiet < 0.5 * np.abs(conv.user_audio).max()
        if kind == "interrupt":
            stop = ep.stop_turn * TURN_SAMPLES
            assert not conv.model_audio[stop:].any() and conv.model_audio[:stop].any()
            assert ep.onset_ms <= ep.stop_turn * 200 + 100


def test_held_out_voices_and_phrasings_are_disjoint_from_training() -> None:
    assert not set(user_voices("train")) & set(user_voices("heldout"))
    assert user_voices("heldout")
    for train, held in PHRASINGS.values():
        assert held and not set(train) & set(held)
    for curriculum in CURRICULA.values():
        for intent, extra in curriculum.extra_phrasings:
            for held in PHRASINGS[intent][1]:  # not even inside a longer training phrasing
                assert not [p for p in extra if _plain_words(held) in _plain_words(p)], (intent, held)
    with pytest.raises(ValueError, match="held-out"):
        DuplexGenerator(tiny(), "heldout", curriculum=REFINE)


def test_phrasings_of_one_split_in_voices_of_the_other() -> None:
    """What `eval duplex --voices` draws: the gap of held-out phrasings alone, or of held-out voices alone."""
    phrasings = DuplexGenerator(tiny(), "heldout", seed=0, voices="train")
    assert phrasings.voices == user_voices("train")
    rng = np.random.default_rng(0)
    assert phrasings.question("colour", rng).text in PHRASINGS["colour"][1]
    speakers = DuplexGenerator(tiny(), "train", seed=0, voices="heldout")
    assert speakers.voices == user_voices("heldout")
    assert speakers.question("colour", rng).text in PHRASINGS["colour"][0]
    with pytest.raises(ValueError, match="voices"):
        DuplexGenerator(tiny(), "train", voices="everyone")


def test_every_voice_variant_changes_the_voice() -> None:
    """espeak-ng resolves some names as languages and then ignores "+variant": every base must take one."""
    bases = {b for b, _ in user_voices("train") + user_voices("heldout")}
    for base in sorted(bases):
        plain = speak("one two", voice=base)
        for variant in ("+m3", *HELD_OUT_VARIANTS):
            other = speak("one two", voice=base + variant)
            assert len(other) != len(plain) or not np.array_equal(other, plain), base + variant


def test_base_curriculum_keeps_the_first_stage_draws() -> None:
    """The shipped recipe's first stage trains on these draws: a curriculum change must not move them."""
    gen = DuplexGenerator(tiny(), "train", seed=0)
    first = {i: (e.kind, e.intent, e.answer) for i in (0, 1, 2, 3, 5, 7)
             for e in gen.conversation(i).episodes[:1]}
    assert first == {0: ("pause", "repeat", "apple."), 1: ("vision", "colour", "it is blue."),
                     2: ("interrupt", "arith", "1 plus 8 is 9."), 3: ("pause", "arith", "2 plus 3 is 5."),
                     5: ("interrupt", "repeat", "window."), 7: ("vision", "colour", "it is red.")}


def test_refine_curriculum_asks_for_sums_pauses_and_digit_strings() -> None:
    gen = DuplexGenerator(tiny(), "train", seed=3, curriculum=REFINE)
    again = DuplexGenerator(tiny(), "train", seed=3, curriculum=REFINE)
    episodes = [e for i in range(60) for e in gen.conversation(i).episodes]
    assert [e.answer for e in again.conversation(5).episodes] == [
        e.answer for e in gen.conversation(5).episodes]
    chat = [e for e in episodes if e.intent in ("greeting", "arith", "repeat")]
    assert sum(e.intent == "arith" for e in chat) > len(chat) / 3
    numbers = [e for e in episodes if e.intent == "repeat" and e.answer[:-1].isdigit()]
    assert numbers and all(e.answer.endswith(".") for e in numbers)
    kinds = {e.kind for e in episodes}
    assert kinds == set(SCENARIOS) - {"fallback"}, kinds  # refine has no out-of-domain share


def test_numbers_curriculum_asks_for_digit_strings_as_numbers() -> None:
    """Digit strings are asked for in their own wordings, so "say the word {w}" never means a number."""
    gen = DuplexGenerator(tiny(), "train", seed=3, curriculum=NUMBERS)
    rng = np.random.default_rng(0)
    asked = [gen.question("repeat", rng) for _ in range(80)]
    numbers = [q for q in asked if q.answer[:-1].isdigit()]
    words = [q for q in asked if not q.answer[:-1].isdigit()]
    assert numbers and words
    assert all(" number " in q.text and q.text.endswith(q.answer[:-1]) for q in numbers)
    assert not any(" number " in q.text for q in words)


def _chat_shares(curriculum: Curriculum, n: int = 120) -> dict[str, float]:
    gen = DuplexGenerator(tiny(), "train", seed=3, curriculum=curriculum)
    chat = [e.intent for i in range(n) for e in gen.conversation(i).episodes if e.intent in CHAT_INTENTS]
    return {intent: chat.count(intent) / len(chat) for intent in CHAT_INTENTS}


def test_sums_curriculum_asks_sums_more_than_numbers_does() -> None:
    """Sums is numbers with sums as over half of the chat questions, its other draws unchanged."""
    sums, numbers = _chat_shares(SUMS), _chat_shares(NUMBERS)
    assert sums["arith"] > 0.45 and sums["arith"] > numbers["arith"] + 0.05, (sums, numbers)
    assert dataclasses.replace(SUMS, chat_weights=NUMBERS.chat_weights) == NUMBERS


def test_greetings_curriculum_greets_with_number_sounding_words_never_held_out() -> None:
    """Greetings holding "everyone", "too", "for", "ate" are trained, so that a number-like sound in a
    greeting stops meaning a sum; none of them is the held-out wording or a copy of its words."""
    held_out = PHRASINGS["greeting"][1]
    extra = dict(GREETINGS.extra_phrasings)["greeting"]
    assert set(SOUNDALIKE_GREETINGS) <= set(extra)
    assert set(dict(SUMS.extra_phrasings)["greeting"]) < set(extra)
    assert not set(extra) & set(held_out)
    assert not any("anyone" in g or "there" in g.split(", ")[-1] for g in SOUNDALIKE_GREETINGS)
    gen = DuplexGenerator(tiny(), "train", seed=3, curriculum=GREETINGS)
    rng = np.random.default_rng(0)
    asked = {gen.question("greeting", rng).text for _ in range(200)}
    assert asked & set(SOUNDALIKE_GREETINGS) and not asked & set(held_out)
    assert _chat_shares(GREETINGS)["greeting"] > _chat_shares(SUMS)["greeting"]


def test_user_said_marks_every_whole_utterance() -> None:
    """The transcript target of training/heard.py: each spoken question is one utterance whose end is the
    episode's input end (a paused question is two), typed ones are none, and every span is inside."""
    gen = DuplexGenerator(tiny(), "train", seed=2)
    for conv in (gen.conversation(0, kinds=kinds) for kinds in (("answer",), ("pause",), ("typed",))):
        ep = conv.episodes[0]
        spans = conv.user_said
        assert all(0 <= s0 < s1 <= len(conv.user_audio) for s0, s1, _ in spans)
        if ep.typed:
            assert spans == []
            continue
        assert len(spans) == (2 if ep.kind == "pause" else 1)
        assert spans[-1][1] * 1000 / SAMPLE_RATE == pytest.approx(ep.input_end_ms)
        said = " ".join(text for _, _, text in spans)
        assert ep.answer.rstrip(".").split()[-1] in said or ep.intent != "repeat", (said, ep.answer)
    interrupt = gen.conversation(1, kinds=("interrupt",))
    if interrupt.episodes[0].onset_ms is not None:  # the barge-in is an utterance of its own
        assert len(interrupt.user_said) == 2


def test_engine_sees_exactly_the_generated_inputs(micro_config: ModelConfig) -> None:
    cfg = micro_config
    gen = DuplexGenerator(cfg, "heldout", seed=3)
    conv = gen.conversation(0, kinds=("vision", "typed"))
    engine = Engine(build_model(cfg, seed=0), max_slots=2, device="cpu")
    engine.trace = []
    slot = engine.join(conv.instructions)
    for t in range(conv.turns):
        engine.step({slot: conv.slot_input(t)})
    _, ref = gen.turns_of([conv])
    for name in ("ctrl", "patches", "patch_idx", "audio_in", "text_in", "source"):
        seen = torch.stack([step[name][0] for step in engine.trace])
        assert torch.equal(seen, getattr(ref, name)[0]), name


def test_train_command_offers_every_curriculum() -> None:
    from microturn.cli import build_parser

    for name in CURRICULA:
        assert build_parser().parse_args(["train", "--out", "x", "--curriculum", name]).curriculum == name
