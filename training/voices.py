"""The user's voices: which synthesisers and voices speak each split, and a render cache over them.

Contract: `user_voices(split)` lists espeak-ng (base, variant) pairs and `festival_voices(split,
curriculum)` the festival voices of a split: held-out voices are never training voices.
`Voice(synth, name, speed, pitch)` names one speaker at one pace and pitch in its synthesiser's
own units (espeak-ng: words per minute and 0-99; festival: duration stretch and semitones).
`Renders.get(text, voice, shift)` returns the trimmed 16 kHz rendering, with an augmentation shift
(training/augment.py `voice_draw`) applied, cached in memory per `Renders` as the espeak path always
was: a text comes back often (answers, greetings) and a render costs 10-60 ms. This module knows
nothing about conversations or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model.slots import SAMPLE_RATE
from .augment import NO_SHIFT, Shift, apply_voice
from .curricula import FESTIVAL_HELD_OUT, Curriculum
from .espeak import speak
from .festival import ACCENTED_VOICES, FESTIVAL_VOICES, Festival

SYNTHESISERS = ("espeak", "festival")
# user voices = base x variant; held-out: one base and two variants never seen in training. British
# English is "en" (its voice file): espeak-ng finds "en-gb" only as a language and then drops the variant
VOICE_BASES = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan",
               "en-gb-x-gbcwmd")
VOICE_VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4", "+f5")
HELD_OUT_BASES = ("en-gb-x-gbcwmd",)
HELD_OUT_VARIANTS = ("+m6", "+f4")
SPEEDS = (125, 140, 155, 170, 185, 200, 220)  # espeak-ng words per minute
PITCHES = (15, 30, 45, 60, 75, 90)  # espeak-ng pitch
FESTIVAL_STRETCHES = (0.8, 0.9, 1.0, 1.1, 1.25, 1.4)  # festival duration stretch (> 1 is slower)
FESTIVAL_SEMITONES = (-3.0, -1.5, 0.0, 1.5, 3.0)  # festival pitch over each voice's own
MODEL_VOICE = ("en-us", 165, 45)  # (espeak-ng voice, words per minute, pitch): the model's one voice


@dataclass(frozen=True)
class Voice:
    synth: str  # one of SYNTHESISERS
    name: str  # espeak-ng voice (base + variant) or festival voice
    speed: float  # espeak-ng: words per minute; festival: duration stretch
    pitch: float  # espeak-ng: 0-99; festival: semitones over the voice's own


def user_voices(split: str) -> list[tuple[str, str]]:
    """espeak-ng (base, variant) pairs of the split; the model's own voice is never a user voice."""
    pairs = [(b, v) for b in VOICE_BASES for v in VOICE_VARIANTS if (b + v) != MODEL_VOICE[0]]
    held = [(b, v) for b, v in pairs if b in HELD_OUT_BASES or v in HELD_OUT_VARIANTS]
    return held if split == "heldout" else [p for p in pairs if p not in held]


def festival_voices(split: str, curriculum: Curriculum) -> tuple[str, ...]:
    """The festival voices of a split: held out, FESTIVAL_HELD_OUT alone; else the curriculum's."""
    return (FESTIVAL_HELD_OUT,) if split == "heldout" else curriculum.festival_voices


def _trim(wave: np.ndarray, rel: float = 0.01) -> np.ndarray:
    """Cut the renderer's leading and trailing silence, so the speech boundaries are exact."""
    loud = np.flatnonzero(np.abs(wave) > rel * np.abs(wave).max())
    return wave[loud[0] : loud[-1] + 1] if loud.size else wave


class Renders:
    """In-memory cache of trimmed renders, keyed by text, voice and augmentation shift."""

    def __init__(self) -> None:
        self._cache: dict[tuple, np.ndarray] = {}
        self._festival: Festival | None = None  # started on the first festival render

    def get(self, text: str, voice: Voice, shift: Shift = NO_SHIFT) -> np.ndarray:
        key = (text, voice, shift)
        if key not in self._cache:
            if shift != NO_SHIFT:
                self._cache[key] = _trim(apply_voice(self.get(text, voice), shift, rate=SAMPLE_RATE))
            elif voice.synth == "espeak":
                self._cache[key] = _trim(speak(text, voice=voice.name, speed=int(voice.speed),
                                               pitch=int(voice.pitch), rate=SAMPLE_RATE))
            else:
                if voice.name not in FESTIVAL_VOICES and voice.name not in ACCENTED_VOICES:
                    raise ValueError(f"unknown festival voice {voice.name!r}")
                self._festival = self._festival or Festival()
                self._cache[key] = _trim(self._festival.speak(text, voice.name, voice.speed, voice.pitch,
                                                              rate=SAMPLE_RATE))
        return self._cache[key]
