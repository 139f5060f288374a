"""User speech from more than one synthesiser (issue 26): festival renders, the held-out festival voice,
augmentations recorded in the curriculum, the out-of-domain fallback, and the eval's synthesiser axis."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import librosa
import numpy as np
import parselmouth
import pytest

from microturn.cli import main as cli_main
from microturn.model.checkpoint import save_checkpoint
from microturn.model.config import ModelConfig, tiny
from microturn.model.tokenizer import ByteTokenizer
from microturn.model.transformer import build_model
from microturn.training.augment import NO_SHIFT, Augmentation, change_speaker, voice_draw
from microturn.training.curricula import (
    CURRICULA,
    FESTIVAL_HELD_OUT,
    HEAR,
    HEAR_COLOURS,
    HEAR_SPEAKERS,
    PHRASINGS,
    Curriculum,
)
from microturn.training.data import DuplexGenerator
from microturn.training.evaluate import METRIC_KEYS
from microturn.training.fallback import (
    FALLBACK_ANSWER,
    TRAIN_CLOSERS,
    TRAIN_OPENERS,
    utterances,
)
from microturn.training.festival import FESTIVAL_VOICES, Festival
from microturn.training.voices import Voice

RATE = 16_000
# HEAR with a small room bank: each room's impulse response costs up to ~0.25 s to compute
SMALL_HEAR = dataclasses.replace(HEAR, augment=dataclasses.replace(HEAR.augment, rooms=2))


def _f0(wave: np.ndarray) -> float:
    return float(np.median(librosa.yin(wave, fmin=60, fmax=400, sr=RATE)))


@pytest.fixture(scope="module")
def festival() -> Festival:
    return Festival()


@pytest.mark.parametrize("voice", FESTIVAL_VOICES)
def test_festival_renders_speech_and_its_speed_and_pitch_change_it(festival: Festival, voice: str) -> None:
    text = "what is five plus two"
    plain = festival.speak(text, voice, rate=RATE)
    assert plain.dtype == np.float32 and 0.8 < len(plain) / RATE < 4.0
    assert np.sqrt(np.mean(plain**2)) > 0.01 and np.abs(plain).max() <= 1.0
    slow = festival.speak(text, voice, stretch=1.3, rate=RATE)
    assert 1.15 < len(slow) / len(plain) < 1.45
    high = festival.speak(text, voice, semitones=3.0, rate=RATE)
    assert 1.08 < _f0(high) / _f0(plain) < 1.35  # 3 semitones is x1.19
    assert np.array_equal(festival.speak(text, voice, rate=RATE), plain)  # deterministic


def test_no_curriculum_trains_on_the_held_out_festival_voice() -> None:
    assert FESTIVAL_HELD_OUT in FESTIVAL_VOICES
    assert all(FESTIVAL_HELD_OUT not in c.festival_voices for c in CURRICULA.values())
    with pytest.raises(ValueError, match="held out"):
        Curriculum(festival_voices=(FESTIVAL_HELD_OUT,))
    gen = DuplexGenerator(tiny(), "train", seed=2, turns=32, curriculum=SMALL_HEAR)
    seen: list[Voice] = []
    get = gen.renders.get
    gen.renders.get = lambda text, voice, *shift: seen.append(voice) or get(text, voice, *shift)
    gen.batch(0, 6)
    user = {v for v in seen if v.name != "en-us" or v.speed != 165}  # not the model's own voice
    assert {v.synth for v in user} == {"espeak", "festival"}
    assert FESTIVAL_HELD_OUT not in {v.name for v in user}
    held = DuplexGenerator(tiny(), "heldout", seed=0, synth="festival")
    assert held.festival_voices == (FESTIVAL_HELD_OUT,)


def test_augmentation_is_recorded_reproducible_and_moves_no_other_draw() -> None:
    aug = HEAR.augment
    assert min(aug.pitch_rate, aug.tempo_rate, aug.vtlp_rate, aug.room_rate, aug.band_rate, aug.gain_rate) > 0
    assert Curriculum().augment == Augmentation() and not Augmentation().voice and not Augmentation().channel
    a, b = (DuplexGenerator(tiny(), "train", seed=4, turns=32, curriculum=SMALL_HEAR) for _ in range(2))
    dry = DuplexGenerator(tiny(), "train", seed=4, turns=32,
                          curriculum=dataclasses.replace(SMALL_HEAR, augment=Augmentation()))
    changed = 0
    for i in range(4):
        x, y, z = a.conversation(i), b.conversation(i), dry.conversation(i)
        assert np.array_equal(x.user_audio, y.user_audio)
        # tempo and warps move timings; what is said and answered stays
        assert [(e.kind, e.intent, e.answer) for e in x.episodes] == [(e.kind, e.intent, e.answer)
                                                                      for e in z.episodes]
        assert [u[2] for u in x.user_said] == [u[2] for u in z.user_said]
        changed += not np.allclose(x.user_audio, z.user_audio, atol=1e-3)
    assert changed >= 3


def _log_f0_spread(wave: np.ndarray) -> float:
    """The 10th to 90th percentile of log pitch over voiced frames: an intonation range that
    unvoiced frames and single octave errors do not decide."""
    hz = parselmouth.Sound(wave.astype(np.float64), RATE).to_pitch().selected_array["frequency"]
    log_hz = np.log(hz[hz > 0])
    return float(np.percentile(log_hz, 90) - np.percentile(log_hz, 10))


def _centroid(wave: np.ndarray) -> float:
    return float(np.median(librosa.feature.spectral_centroid(y=wave, sr=RATE)))


def test_another_speaker_moves_formants_pitch_and_range_apart_and_keeps_the_words(festival: Festival) -> None:
    plain = festival.speak("what is five plus two", "kal_diphone", rate=RATE)
    longer_tract = change_speaker(plain, formants=0.87, pitch=1.0, pitch_range=1.0, rate=RATE)
    shorter_tract = change_speaker(plain, formants=1.15, pitch=1.0, pitch_range=1.0, rate=RATE)
    assert _centroid(longer_tract) < _centroid(plain) < _centroid(shorter_tract)
    assert 0.93 < _f0(shorter_tract) / _f0(plain) < 1.07  # formants moved, pitch kept
    higher = change_speaker(plain, formants=1.0, pitch=1.3, pitch_range=1.0, rate=RATE)
    assert 1.18 < _f0(higher) / _f0(plain) < 1.42
    for wave in (longer_tract, shorter_tract, higher):
        assert wave.dtype == np.float32 and abs(len(wave) - len(plain)) <= RATE // 100  # the tempo stays
    flat = change_speaker(plain, formants=1.0, pitch=1.0, pitch_range=0.3, rate=RATE)
    lively = change_speaker(plain, formants=1.0, pitch=1.0, pitch_range=1.8, rate=RATE)
    assert 2 * _log_f0_spread(flat) < _log_f0_spread(plain) < _log_f0_spread(lively)
    # Praat's PSOLA draws random numbers: reseeded per conversion, a render replays exactly
    assert np.array_equal(lively, change_speaker(plain, formants=1.0, pitch=1.0, pitch_range=1.8, rate=RATE))


def test_an_utterance_praat_cannot_convert_comes_back_unchanged() -> None:
    hiss = (np.random.default_rng(0).standard_normal(RATE // 2) * 0.05).astype(np.float32)  # no voiced frame
    click = np.zeros(RATE // 200, np.float32)  # too short for a pitch analysis
    for wave in (hiss, click):
        assert np.array_equal(change_speaker(wave, formants=1.1, pitch=1.2, pitch_range=1.0, rate=RATE), wave)


def test_speaker_draws_come_only_with_that_augmentation() -> None:
    assert HEAR_SPEAKERS.augment.speaker_rate > 0 and HEAR_SPEAKERS.augment.voice
    assert "hear-speakers" in CURRICULA and HEAR.augment.speaker_rate == 0
    # without it, each utterance makes the three (hit, index) draws it made before speakers existed
    rng, replay = np.random.default_rng(5), np.random.default_rng(5)
    shifts = [voice_draw(HEAR.augment, rng) for _ in range(40)]
    grids = (HEAR.augment.pitch_semitones, HEAR.augment.tempo_factors, HEAR.augment.vtlp_warps)
    for _ in range(40):
        for grid in grids:
            replay.random(), replay.integers(len(grid))
    assert rng.random() == replay.random() and all(s[3:] == NO_SHIFT[3:] for s in shifts)
    speakers = [voice_draw(HEAR_SPEAKERS.augment, np.random.default_rng(i))[3:] for i in range(200)]
    moved = sum(s != NO_SHIFT[3:] for s in speakers) / len(speakers)
    assert 0.45 < moved < 0.75  # speaker_rate 0.6
    assert len({s[0] for s in speakers}) == len(HEAR_SPEAKERS.augment.speaker_formants) + 1


def test_in_domain_questions_can_share_the_out_of_domain_openers_and_closers() -> None:
    plain = DuplexGenerator(tiny(), "train", seed=3, curriculum=HEAR_SPEAKERS)
    carried = DuplexGenerator(tiny(), "train", seed=3, curriculum=HEAR_COLOURS)
    openers, closers = [o for o in TRAIN_OPENERS if o], [c for c in TRAIN_CLOSERS if c]
    for intent in ("arith", "colour", "time"):
        qs = [carried.question(intent, np.random.default_rng(i)) for i in range(60)]
        wrapped = [q for q in qs if q.text.startswith(tuple(openers)) or q.text.endswith(tuple(closers))]
        assert 0.15 < len(wrapped) / len(qs) < 0.5  # carrier_share 0.33, some draws are the empty pair
    colour = {q.text for q in (carried.question("colour", np.random.default_rng(i)) for i in range(200))}
    held_out = PHRASINGS["colour"][1][0]
    assert held_out not in colour and any(t.startswith("could you tell me") for t in colour)
    plain_arith = [plain.question("arith", np.random.default_rng(i)) for i in range(60)]
    assert not any(q.text.startswith(tuple(openers)) for q in plain_arith)


def test_training_answers_out_of_domain_turns_with_the_fallback_sentence() -> None:
    gen = DuplexGenerator(tiny(), "train", seed=5, turns=32, curriculum=SMALL_HEAR)
    tok = ByteTokenizer()

    def said(conv) -> str:
        return tok.decode([i for row in conv.text_out for i in row if i < 256])  # bytes, no specials

    # in random conversations (a late one is cut at the end, its episode label dropped, its text kept)
    assert sum(FALLBACK_ANSWER[:12] in said(gen.conversation(i)) for i in range(60)) >= 2
    conv = gen.conversation(0, kinds=("fallback",))
    (ep,) = conv.episodes
    assert ep.answer == FALLBACK_ANSWER and ep.respond_turn > ep.input_end_turn
    assert said(conv) == FALLBACK_ANSWER
    assert ep.typed or conv.user_said[0][2] in utterances("train")
    held = DuplexGenerator(tiny(), "heldout", seed=0).conversation(0, kinds=("fallback",))
    assert held.episodes[0].answer == FALLBACK_ANSWER
    assert held.episodes[0].typed or held.user_said[0][2] in utterances("heldout")


def test_eval_duplex_reports_each_synthesiser_and_the_fallback_rate(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture,
                                                                    micro_config: ModelConfig) -> None:
    save_checkpoint(tmp_path / "ckpt", build_model(micro_config, seed=0), micro_config)
    argv = ["eval", "duplex", "--checkpoint", str(tmp_path / "ckpt"), "--conversations", "7", "--batch", "7",
            "--device", "cpu", "--synth", "espeak", "festival"]
    assert cli_main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["synths"] == ["espeak", "festival"] and set(result["by_synth"]) == {"espeak", "festival"}
    assert {"fallback_rate", "fallback_takeover_rate", "answers_right_by_intent"} <= set(result)
    for synth in result["by_synth"].values():
        assert set(METRIC_KEYS) <= set(synth) and synth["conversations"] == 7
        assert synth["counts"]["out_of_domain"] == 1 and synth["fallback_rate"] in (0.0, 1.0)
    assert result["conversations"] == 14 and result["counts"]["out_of_domain"] == 2
