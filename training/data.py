"""Synthetic full-duplex conversations for the demo interaction model (training and evaluation).

Contract: `DuplexGenerator(cfg, split, seed, turns).conversation(index)` returns the same
`Conversation` for the same (split, seed, index, turns), built from scratch: a timeline of
200 ms micro-turns where the user speaks (espeak-ng and festival voices at many speeds and
pitches, training/voices.py; noise, level changes and the curriculum's augmentations, training/
augment.py), types (text-in: SRC_USER then bytes, at most `text_in_slots` per turn, the
rest flowing into later turns) and shows camera frames, and the model answers in one fixed
voice with its text-out stream aligned ahead of its speech (the answer's bytes then EPAD,
PAD when idle; the speech starts in the turn of its first text token). Background results
arrive in text-in behind SRC_BACKGROUND. `batch(step, size)` stacks conversations into a
teacher-forcing `(prefix, Turns)` pair with exactly the tokens the engine would see, plus
`Heard` targets of what the user said (`Conversation.user_said`, training/heard.py); each
`Episode` labels what the model should do and when (for training/evaluate.py).

Reference behaviour (the policy the model learns): answer in the first turn after the
user's question ends (speech: the turn after the one holding its last sample; typed: the
turn after its last text-in token); stay silent through a mid-sentence pause; stop speaking
in the first turn whose input holds BARGE_IN_REACT_MS of the user's barge-in; for a hard sum
or the time say HOLDING_PHRASE, write TASK_START task TASK_END, and speak the background
result once it has fully arrived; answer an out-of-domain utterance (training/fallback.py) with
FALLBACK_ANSWER. Voices, question phrasings and out-of-domain utterances are split train/held-out.

Output audio of micro-turn t plays during [(t+1)*200, (t+2)*200) ms of the user's clock
(one tick to compute it); evaluators use that convention. This module does not know about
training, optimisers, engines or servers. Renders are cached in memory per generator.
Augmentations draw from a random stream of their own per conversation (AUGMENT_STREAM), so a
curriculum without them makes exactly the conversations it made before they existed.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model.config import ModelConfig
from ..model.dmel import DMel
from ..model.layout import Turns, patch_indices
from ..model.patches import image_patches
from ..model.slots import SAMPLE_RATE, TURN_SAMPLES, SlotInput
from ..model.tokenizer import ByteTokenizer
from .augment import NO_SHIFT, Channel, room_bank, voice_draw
from .curricula import CHAT_INTENTS, PHRASINGS, SCENARIOS, Curriculum
from .fallback import FALLBACK_ANSWER, carriers, utterances
from .heard import NUMBER_WORDS, Heard, heard_targets
from .masking import mask_user_codes
from .voices import FESTIVAL_SEMITONES as SEMITONES
from .voices import FESTIVAL_STRETCHES as STRETCHES
from .voices import (
    MODEL_VOICE,
    PITCHES,
    SPEEDS,
    SYNTHESISERS,
    Renders,
    Voice,
    festival_voices,
    user_voices,
)

TURN_MS = 1000 * TURN_SAMPLES // SAMPLE_RATE
HOLDING_PHRASE = "one moment."
BARGE_IN_REACT_MS = 100  # the model stops in the first turn holding this much of a barge-in
INSTRUCTIONS = ("", "You are a helpful voice assistant.", "Answer briefly and kindly.")
BROWN_DRIFT_SAMPLES = 800  # brown noise minus its 50 ms moving average: no DC wander
AUGMENT_STREAM = 26  # the augmentations' own random stream per conversation (issue 26 added them)
MASK_STREAM = 27  # the code masks' own random stream per batch, so other draws stay as they were
PAUSE_SAMPLES = (2 * TURN_SAMPLES, 5 * TURN_SAMPLES)  # mid-sentence pause length
GAP_TURNS = (1, 4)  # silence between episodes, turns (inclusive)
RESULT_DELAY_TURNS = (1, 8)  # background latency after the task marker, turns (inclusive)
N_CANDIDATES = 4  # wrong answers rendered beside the right one for the speech judge
EPISODE_ROOM_TURNS = 80  # the longest episode (a typed hard sum) fits well within this
TAIL_TURNS = 8  # quiet turns after the last scripted episode (evaluation conversations)
TYPED_SHARE = 0.25  # vision and task questions typed instead of spoken
DISTRACTOR_FRAME_SHARE = 0.5  # conversations showing a camera frame from the start
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
           "orange": (250, 140, 20), "purple": (130, 40, 170), "white": (245, 245, 245),
           "black": (15, 15, 15)}
WORDS = ("apple", "banana", "river", "window", "garden", "pencil", "rocket", "tiger", "summer", "coffee",
         "music", "dragon", "planet", "silver", "candle", "monkey")
OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
BARGE_INS = (("wait", "stop", "hold on", "no, stop please"), ("okay, that's enough",))
GREETING_ANSWER = "hello! how can I help you?"


NUMBER_DIGITS = (1, 5)  # digit-string length range of number repeats (inclusive)


@dataclass
class Question:
    intent: str
    text: str  # the phrasing the user speaks or types
    answer: str  # the model's reference answer text
    candidates: list[str]  # wrong answers of the same shape (speech judge)
    task: str = ""  # background task text (hard sums, the time)
    result: str = ""  # the background result text


@dataclass
class Episode:
    kind: str  # one of SCENARIOS
    intent: str  # one of PHRASINGS
    typed: bool  # the question came as text-in
    input_end_ms: float  # end of the question: last speech sample, or end of its last text-in turn
    input_end_turn: int  # the turn holding that end
    respond_turn: int  # turn the reference answer text starts in (-1: the model stays silent)
    answer: str  # expected answer text ("" when none)
    candidates: list[str] = field(default_factory=list)
    end_turn: int = 0  # last turn this episode touches
    pause_ms: tuple[float, float] | None = None  # mid-sentence pause [start, end) on the user's clock
    onset_ms: float | None = None  # barge-in onset on the user's clock
    stop_turn: int = -1  # first turn of model silence after a barge-in (reference)
    task: str = ""  # expected text between TASK_START and TASK_END
    result_turn: int = -1  # first turn of the background result in text-in
    result_end_turn: int = -1  # last turn of it
    colour: str = ""  # the camera frame's colour (vision)


@dataclass
class Conversation:
    instructions: str
    user_audio: np.ndarray  # (turns * TURN_SAMPLES,) float32 what the microphone hears
    model_audio: np.ndarray  # (turns * TURN_SAMPLES,) float32 reference speech of the model
    images: dict[int, np.ndarray]  # turn -> RGB frame shown from that turn on
    text_in: list[list[int]]  # per turn, at most text_in_slots ids (no padding)
    background: list[bool]  # per turn: text_in carries a background result
    text_out: list[list[int]]  # per turn, exactly text_out_slots ids
    episodes: list[Episode]
    user_said: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end sample, text) each

    @property
    def turns(self) -> int:
        return len(self.text_out)

    def slot_input(self, turn: int) -> SlotInput:
        """What the engine gets for micro-turn `turn`."""
        audio = self.user_audio[turn * TURN_SAMPLES : (turn + 1) * TURN_SAMPLES]
        return SlotInput(audio=audio.copy(), image=self.images.get(turn), text_in=list(self.text_in[turn]),
                         text_in_background=self.background[turn])


class _Timeline:
    """The streams of one conversation under construction, `turns` micro-turns long."""

    def __init__(self, turns: int, cfg: ModelConfig, tok: ByteTokenizer) -> None:
        self.n, self.cfg, self.sp = turns, cfg, tok.special
        self.user = np.zeros(turns * TURN_SAMPLES, np.float32)
        self.model = np.zeros(turns * TURN_SAMPLES, np.float32)
        self.text_in: list[list[int]] = [[] for _ in range(turns)]
        self.background = [False] * turns
        self.text_out: list[list[int]] = [[] for _ in range(turns)]
        self.owner = [-1] * turns  # which model utterance wrote each turn's text
        self.images: dict[int, np.ndarray] = {}
        self.said: list[tuple[int, int, str]] = []  # user utterances: (start, end sample, text)

    def user_say(self, start: int, wave: np.ndarray, text: str) -> int:
        """Mix an utterance of `text` in at sample `start`; returns its end sample (exclusive)."""
        end = min(start + len(wave), len(self.user))
        self.user[start:end] += wave[: end - start]
        self.said.append((start, start + len(wave), text))
        return start + len(wave)

    def type_in(self, turn: int, ids: list[int], background: bool) -> int:
        """Queue ids into text-in from `turn`; returns the last turn used."""
        t = turn
        for i in ids:
            while t < self.n and len(self.text_in[t]) >= self.cfg.text_in_slots:
                t += 1
            if t >= self.n:
                break
            self.text_in[t].append(i)
            self.background[t] = background
        return t

    def model_say(self, turn: int, ids: list[int], wave: np.ndarray, utt: int) -> tuple[int, int]:
        """Text ids (EPAD appended) flow into text-out from `turn`; the speech starts in the turn of the
        first id. Returns (first text turn, last turn of text or speech)."""
        t, first, last = turn, -1, turn
        for i in [*ids, self.sp.EPAD]:
            while t < self.n and len(self.text_out[t]) >= self.cfg.text_out_slots:
                t += 1
            if t >= self.n:
                break
            first = t if first < 0 else first
            self.text_out[t].append(i)
            self.owner[t], last = utt, t
        first = turn if first < 0 else first
        start = first * TURN_SAMPLES
        end = min(start + len(wave), len(self.model))
        self.model[start:end] = wave[: end - start]
        return first, max(last, (start + len(wave) - 1) // TURN_SAMPLES)

    def cut_model(self, stop_turn: int, utt: int) -> None:
        """Barge-in: the model's speech ends at `stop_turn`; its unsent text is replaced by one EPAD."""
        self.model[stop_turn * TURN_SAMPLES :] = 0.0
        cut = [t for t in range(stop_turn, self.n) if self.owner[t] == utt]
        for t in cut:
            self.text_out[t] = []
        if cut:
            self.text_out[cut[0]] = [self.sp.EPAD]

    def finish(self, keep: int, instructions: str, episodes: list[Episode]) -> Conversation:
        pad = self.sp.PAD
        text_out = [(s + [pad] * self.cfg.text_out_slots)[: self.cfg.text_out_slots] for s in self.text_out]
        n = keep * TURN_SAMPLES
        return Conversation(
            instructions=instructions, user_audio=np.clip(self.user[:n], -1, 1), model_audio=self.model[:n],
            images={t: im for t, im in self.images.items() if t < keep}, text_in=self.text_in[:keep],
            background=self.background[:keep], text_out=text_out[:keep],
            episodes=[e for e in episodes if e.end_turn < keep],
            user_said=sorted(u for u in self.said if u[1] <= n),
        )


class DuplexGenerator:
    """Deterministic conversations of one split ("train" or "heldout") and seed."""

    def __init__(self, cfg: ModelConfig, split: str = "train", seed: int = 0, turns: int = 32,
                 curriculum: Curriculum | None = None, voices: str | None = None,
                 synth: str | None = None) -> None:
        """`voices` ("train" / "heldout", default: `split`) speaks one split's phrasings in the other
        split's voices, which tells held-out phrasings and held-out voices apart in an evaluation;
        `synth` (one of SYNTHESISERS) has that synthesiser alone speak, instead of the curriculum's."""
        voices = voices or split
        if split not in ("train", "heldout") or voices not in ("train", "heldout"):
            raise ValueError(f"unknown split {split!r} or voices {voices!r}")
        if synth is not None and synth not in SYNTHESISERS:
            raise ValueError(f"unknown synthesiser {synth!r}; one of {SYNTHESISERS}")
        if curriculum is not None and split == "heldout":
            raise ValueError("held-out conversations use the default curriculum")
        self.cfg, self.split, self.seed, self.turns = cfg, split, seed, turns
        self.curriculum = curriculum or Curriculum()
        self.tok = ByteTokenizer()
        self.dmel = DMel()
        self.voices = user_voices(voices)  # espeak-ng (base, variant) pairs
        self.festival_voices = festival_voices(voices, self.curriculum)
        self.festival_weights = self.curriculum.festival_weights if voices == "train" else None
        self.synthesisers = ((synth, 1.0),) if synth else self.curriculum.synthesisers
        self.renders = Renders()
        self._rooms: list[np.ndarray] | None = None  # the room bank, drawn on first use

    # --- speech ---
    def model_speech(self, text: str) -> np.ndarray:
        return self.renders.get(text, Voice("espeak", *MODEL_VOICE))

    def rooms(self) -> list[np.ndarray]:
        if self._rooms is None:
            rng = np.random.default_rng([self.seed, AUGMENT_STREAM, self.split == "heldout"])
            self._rooms = room_bank(self.curriculum.augment, rng, SAMPLE_RATE)
        return self._rooms

    def voice(self, rng: np.random.Generator) -> Voice:
        """One user voice: a synthesiser by its share (no draw when there is one), then voice, pace, pitch."""
        synth = self.synthesisers[0][0]
        if len(self.synthesisers) > 1:
            shares = [share for _, share in self.synthesisers]
            synth = self.synthesisers[rng.choice(len(shares), p=shares)][0]
        if synth == "espeak":
            base, variant = self.voices[rng.integers(len(self.voices))]
            return Voice(synth, base + variant, int(rng.choice(SPEEDS)), int(rng.choice(PITCHES)))
        weights = self.festival_weights
        pick = rng.choice(len(weights), p=weights) if weights else rng.integers(len(self.festival_voices))
        name = self.festival_voices[pick]
        return Voice(synth, name, float(rng.choice(STRETCHES)), float(rng.choice(SEMITONES)))

    # --- content ---
    def question(self, intent: str, rng: np.random.Generator) -> Question:
        extra = dict(self.curriculum.extra_phrasings).get(intent, ())
        phrasings = PHRASINGS.get(intent, ((), ()))[self.split == "heldout"] + extra
        tpl = phrasings[rng.integers(len(phrasings))] if phrasings else ""
        if self.curriculum.carrier_share and tpl and rng.random() < self.curriculum.carrier_share:
            openers, closers = carriers(self.curriculum.fallback_grammar)
            tpl = openers[rng.integers(len(openers))] + tpl + closers[rng.integers(len(closers))]
        if intent == "greeting":
            return Question(intent, tpl, GREETING_ANSWER, ["it is red.", "banana.", HOLDING_PHRASE, "7."])
        if intent == "fallback":
            said = utterances(self.split, self.curriculum.fallback_grammar)
            return Question(intent, said[rng.integers(len(said))], FALLBACK_ANSWER,
                            [GREETING_ANSWER, HOLDING_PHRASE, "it is red.", "banana."])
        if intent == "arith":
            op = ("plus", "minus", "times")[rng.integers(3)]
            a, b = sorted(rng.integers(0, 10, 2).tolist(), reverse=op == "minus")
            r = OPS[op](a, b)
            words = rng.random() < 0.5  # the typed form spells numbers or writes digits
            text = tpl.format(a=NUMBER_WORDS[a] if words else a, op=op, b=NUMBER_WORDS[b] if words else b)
            wrong = [x for x in range(max(0, r - 6), r + 7) if x != r]
            picks = rng.choice(wrong, N_CANDIDATES, replace=False).tolist()
            return Question(intent, text, f"{a} {op} {b} is {r}.", [f"{a} {op} {b} is {x}." for x in picks])
        numbers = self.curriculum.number_repeat_share
        if intent == "repeat" and numbers and rng.random() < numbers:
            digits = int(rng.integers(NUMBER_DIGITS[0], NUMBER_DIGITS[1] + 1))
            n = int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10**digits))
            if self.curriculum.number_phrasings:
                tpl = self.curriculum.number_phrasings[rng.integers(len(self.curriculum.number_phrasings))]
            others = [f"{n + d}." for d in range(1, N_CANDIDATES + 1)]
            return Question(intent, tpl.format(w=n), f"{n}.", others)
        if intent == "repeat":
            w = WORDS[rng.integers(len(WORDS))]
            others = rng.choice([x for x in WORDS if x != w], N_CANDIDATES, replace=False).tolist()
            return Question(intent, tpl.format(w=w), f"{w}.", [f"{x}." for x in others])
        if intent == "colour":
            return Question(intent, tpl, "", [])  # the answer is set by the frame shown
        if intent == "hard":
            op = ("plus", "times")[rng.integers(2)]
            a, b = int(rng.integers(100, 1000)), int(rng.integers(11, 100))
            r = OPS[op](a, b)
            picks = (r + rng.choice([-100, -10, -1, 1, 10, 100], N_CANDIDATES, replace=False)).tolist()
            return Question(intent, tpl.format(a=a, op=op, b=b), f"it is {r}.",
                            [f"it is {x}." for x in picks], task=f"{a} {op} {b}", result=str(r))
        hh, mm = int(rng.integers(1, 13)), int(rng.integers(0, 60))
        picks = [f"it is {(hh + d) % 12 + 1}:{mm:02d}." for d in range(N_CANDIDATES)]
        return Question(intent, tpl, f"it is {hh}:{mm:02d}.", picks, task="what time is it",
                        result=f"{hh}:{mm:02d}")

    # --- the user's audio ---
    def _utterance(self, text: str, voice: Voice, rng: np.random.Generator,
                   aug_rng: np.random.Generator) -> np.ndarray:
        aug = self.curriculum.augment
        wave = self.renders.get(text, voice, voice_draw(aug, aug_rng) if aug.voice else NO_SHIFT)
        peak = 10 ** (rng.uniform(*aug.peak_dbfs) / 20) / max(np.abs(wave).max(), 1e-6)
        ramp = 10 ** (np.linspace(0, rng.uniform(-aug.level_ramp_db, aug.level_ramp_db), len(wave)) / 20)
        return (wave * peak * ramp).astype(np.float32)

    def _noise(self, n: int, rng: np.random.Generator) -> np.ndarray:
        kind = rng.integers(3)
        if kind == 0:
            noise = rng.standard_normal(n)
        elif kind == 1:  # brown: integrated white noise, drift removed
            noise = np.cumsum(rng.standard_normal(n + BROWN_DRIFT_SAMPLES))
            sums = np.cumsum(np.concatenate([[0.0], noise]))
            drift = (sums[BROWN_DRIFT_SAMPLES:] - sums[:-BROWN_DRIFT_SAMPLES]) / BROWN_DRIFT_SAMPLES
            noise = (noise[BROWN_DRIFT_SAMPLES - 1 :] - drift)[:n]
        else:  # mains hum with harmonics
            t = np.arange(n) / SAMPLE_RATE
            f0 = (50.0, 60.0)[rng.integers(2)]
            noise = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6.3)) / h for h in (1, 2, 3, 5))
        rms = 10 ** (rng.uniform(*self.curriculum.augment.noise_dbfs) / 20)
        return (noise * rms / max(noise.std(), 1e-9)).astype(np.float32)

    def _frame(self, colour: str, rng: np.random.Generator) -> np.ndarray:
        h, w = int(rng.integers(24, 97)), int(rng.integers(24, 97))
        base = np.array(COLOURS[colour], np.float32) * rng.uniform(0.8, 1.05)
        img = base + rng.normal(0, 12, (h, w, 3)) + np.linspace(-20, 20, w)[None, :, None]
        return np.clip(img, 0, 255).astype(np.uint8)

    # --- conversations ---
    def conversation(self, index: int, kinds: tuple[str, ...] | None = None) -> Conversation:
        """Conversation `index`: random episodes until `self.turns` are full (cut there), or exactly the
        episodes `kinds` in order, with TAIL_TURNS of quiet after the last."""
        n = self.turns if kinds is None else EPISODE_ROOM_TURNS * len(kinds)
        rng = np.random.default_rng([self.seed, index, self.split == "heldout"])
        aug_rng = np.random.default_rng([self.seed, index, self.split == "heldout", AUGMENT_STREAM])
        aug = self.curriculum.augment
        channel = Channel.draw(aug, aug_rng, self.rooms() if aug.room_rate else []) if aug.channel else None
        instructions = INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))]
        tl = _Timeline(n + EPISODE_ROOM_TURNS, self.cfg, self.tok)
        if rng.random() < DISTRACTOR_FRAME_SHARE:
            tl.images[0] = self._frame(list(COLOURS)[rng.integers(len(COLOURS))], rng)
        episodes: list[Episode] = []
        t = int(rng.integers(*GAP_TURNS, endpoint=True)) - 1
        for i in itertools.count():
            if kinds is None and t >= n or kinds is not None and i == len(kinds):
                break
            weights = self.curriculum.scenario_weights
            kind = SCENARIOS[rng.choice(len(SCENARIOS), p=weights)] if kinds is None else kinds[i]
            episodes.append(self._episode(kind, tl, t, rng, aug_rng, utt=i))
            t = episodes[-1].end_turn + int(rng.integers(*GAP_TURNS, endpoint=True))
        if kinds is not None:
            n = episodes[-1].end_turn + 1 + TAIL_TURNS
        noise = self._noise(n * TURN_SAMPLES, rng)
        if channel is None:
            tl.user[: n * TURN_SAMPLES] += noise
        else:
            tl.user[: n * TURN_SAMPLES] = channel.apply(tl.user[: n * TURN_SAMPLES], noise, SAMPLE_RATE)
        return tl.finish(n, instructions, episodes)

    def _episode(self, kind: str, tl: _Timeline, t: int, rng: np.random.Generator,
                 aug_rng: np.random.Generator, utt: int) -> Episode:
        sp = self.tok.special
        voice = self.voice(rng)
        intent = self._intent(kind, rng)
        q = self.question(intent, rng)
        colour = ""
        if kind == "vision":
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            tl.images[max(0, t - int(rng.integers(0, 3)))] = self._frame(colour, rng)
            q.answer = f"it is {colour}."
            q.candidates = [f"it is {c}." for c in COLOURS if c != colour][:N_CANDIDATES]
        typed = kind == "typed" or (kind in ("vision", "task", "fallback") and rng.random() < TYPED_SHARE)
        start = t * TURN_SAMPLES + int(rng.integers(TURN_SAMPLES))
        pause = None
        if typed:
            last = tl.type_in(t, [sp.SRC_USER, *self.tok.encode(q.text)], background=False)
            end_ms, end_turn = (last + 1) * TURN_MS, last
        else:
            if kind == "pause":
                words = q.text.split()
                if len(words) < 2:
                    words = [*words, "please"]
                k = int(rng.integers(1, len(words)))
                head, tail = " ".join(words[:k]) + ",", " ".join(words[k:]) + "?"
                first_end = tl.user_say(start, self._utterance(head, voice, rng, aug_rng), head)
                resume = first_end + int(rng.integers(*PAUSE_SAMPLES))
                pause = (first_end * 1000 / SAMPLE_RATE, resume * 1000 / SAMPLE_RATE)
                end = tl.user_say(resume, self._utterance(tail, voice, rng, aug_rng), tail)
            else:
                end = tl.user_say(start, self._utterance(q.text + "?", voice, rng, aug_rng), q.text)
            end_ms, end_turn = end * 1000 / SAMPLE_RATE, (end - 1) // TURN_SAMPLES
        ep = Episode(kind, intent, typed, end_ms, end_turn, end_turn + 1, q.answer, q.candidates,
                     pause_ms=pause, colour=colour)
        if kind == "task":
            ids = [*self.tok.encode(HOLDING_PHRASE), sp.TASK_START, *self.tok.encode(q.task), sp.TASK_END]
            holding = self.model_speech(HOLDING_PHRASE)
            ep.respond_turn, held_end = tl.model_say(end_turn + 1, ids, holding, utt)
            ep.task, ep.answer = q.task, q.answer
            ep.result_turn = held_end + int(rng.integers(*RESULT_DELAY_TURNS, endpoint=True))
            result = [sp.SRC_BACKGROUND, *self.tok.encode(q.result)]
            ep.result_end_turn = tl.type_in(ep.result_turn, result, background=True)
            _, ep.end_turn = tl.model_say(ep.result_end_turn + 1, self.tok.encode(q.answer),
                                          self.model_speech(q.answer), utt)
            return ep
        answer = self.model_speech(q.answer)
        first, ep.end_turn = tl.model_say(end_turn + 1, self.tok.encode(q.answer), answer, utt)
        ep.respond_turn = first
        if kind == "interrupt" and ep.end_turn - first >= 2:
            onset = int(rng.integers((first + 1) * TURN_SAMPLES, ep.end_turn * TURN_SAMPLES))
            ep.onset_ms = onset * 1000 / SAMPLE_RATE
            ep.stop_turn = (onset + BARGE_IN_REACT_MS * SAMPLE_RATE // 1000) // TURN_SAMPLES
            tl.cut_model(ep.stop_turn, utt)
            phrases = BARGE_INS[self.split == "heldout"]
            phrase = phrases[rng.integers(len(phrases))]
            barge_end = tl.user_say(onset, self._utterance(phrase, voice, rng, aug_rng), phrase)
            ep.end_turn = max(ep.stop_turn, (barge_end - 1) // TURN_SAMPLES)
        return ep

    def _intent(self, kind: str, rng: np.random.Generator) -> str:
        c = self.curriculum
        if c.chat_weights is None or c.hard_share is None:  # the first stage's two draws, call for call
            task, chat = ("hard", "time")[rng.integers(2)], CHAT_INTENTS[rng.integers(3)]
            return {"task": task, "vision": "colour", "fallback": "fallback"}.get(kind, chat)
        if kind == "task":
            return "hard" if rng.random() < c.hard_share else "time"
        if kind in ("vision", "fallback"):
            return {"vision": "colour", "fallback": "fallback"}[kind]
        return CHAT_INTENTS[rng.choice(3, p=c.chat_weights)]

    # --- tensors ---
    def turns_of(self, convs: list[Conversation]) -> tuple[torch.Tensor, Turns]:
        """Stack conversations of equal length and instructions into the engine's exact view."""
        cfg, sp = self.cfg, self.tok.special
        n = convs[0].turns
        if any(c.turns != n or c.instructions != convs[0].instructions for c in convs):
            raise ValueError("a batch needs conversations of equal length and instructions")
        shape = (len(convs), n, cfg.audio_tokens, cfg.frames_per_audio_token, cfg.dmel_channels)
        audio_in = self.dmel.encode(torch.from_numpy(np.stack([c.user_audio for c in convs]))).view(shape)
        audio_out = self.dmel.encode(torch.from_numpy(np.stack([c.model_audio for c in convs]))).view(shape)
        text_in = torch.full((len(convs), n, cfg.text_in_slots), sp.PAD, dtype=torch.long)
        for b, c in enumerate(convs):
            for t, ids in enumerate(c.text_in):
                text_in[b, t, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        source = torch.tensor([c.background for c in convs], dtype=torch.long)[..., None].expand_as(text_in)
        idx = patch_indices(torch.arange(n), cfg)  # (n, V)
        grid = (cfg.image_size // cfg.patch_size) ** 2
        patches = torch.zeros(len(convs), n, cfg.video_patches, cfg.patch_dim)
        for b, c in enumerate(convs):
            current = torch.zeros(grid, cfg.patch_dim)
            for t in range(n):
                if t in c.images:
                    current = torch.from_numpy(image_patches(c.images[t], cfg))
                patches[b, t] = current[idx[t]]
        ctrl = torch.full((len(convs), n), sp.CTRL, dtype=torch.long)
        ctrl[:, 0] = sp.BOS
        prefix = torch.tensor([[sp.INSTR, *self.tok.encode(convs[0].instructions)][: cfg.prefix_len]])
        turns = Turns(ctrl=ctrl, patches=patches, patch_idx=idx[None].expand(len(convs), -1, -1).clone(),
                      audio_in=audio_in, text_in=text_in, source=source.clone(),
                      text_out=torch.tensor([c.text_out for c in convs], dtype=torch.long),
                      audio_out=audio_out)
        return prefix.expand(len(convs), -1).clone(), turns

    def _masked(self, turns: Turns, convs: list[Conversation], rng: np.random.Generator) -> Turns:
        """The batch with SpecAugment masks on each user utterance's codes (training/masking.py)."""
        hop, shape = self.dmel.cfg.hop, turns.audio_in.shape
        spans = [[(start // hop, -(-end // hop)) for start, end, _ in c.user_said] for c in convs]
        codes = turns.audio_in.view(shape[0], -1, shape[-1])  # (B, frames, C)
        codes = mask_user_codes(codes, spans, self.curriculum.masks, rng)
        return dataclasses.replace(turns, audio_in=codes.view(shape))

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, Turns, Heard]:
        """Training batch `step`: conversations step*size .. step*size+size-1, one instruction string,
        with what the user said in them (training/heard.py)."""
        convs = [self.conversation(step * size + i) for i in range(size)]
        instructions = INSTRUCTIONS[np.random.default_rng([self.seed, step]).integers(len(INSTRUCTIONS))]
        prefix, turns = self.turns_of([dataclasses.replace(c, instructions=instructions) for c in convs])
        if self.curriculum.masks.rate:
            turns = self._masked(turns, convs, np.random.default_rng([self.seed, step, MASK_STREAM]))
        return prefix, turns, heard_targets([c.user_said for c in convs], self.cfg)
