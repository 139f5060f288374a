"""`python -m microturn.benchmarks.renders`: what user speech costs to make, per synthesiser.

Training draws its user speech from espeak-ng, festival's English voices, festival's accented voices
(training/accents.py) and Praat's Change Gender (training/augment.py); batches are made beside the
training step and must not hold it back. This times each source on the same `--utterances`
questions (fresh caches, so every render is a real one), then `--batches` batches of 8 conversations
of `--curriculum` in one process, the first one (cold caches, room bank) apart from the rest.
Prints a table, then a JSON last line. It knows nothing about the model or training steps.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np

from ..model.config import tiny
from ..model.slots import SAMPLE_RATE
from ..training.augment import change_speaker
from ..training.curricula import CHAT_INTENTS, CURRICULA, FESTIVAL_TRAIN_VOICES
from ..training.data import DuplexGenerator
from ..training.festival import ACCENTED_VOICES, Festival
from ..training.voices import Renders, Voice, user_voices

BATCH = 8  # conversations per batch, as every demo stage trains


def _times_ms(make: Callable[[int], np.ndarray], count: int) -> tuple[list[float], float]:
    """Milliseconds per call of make(i) for i < count, and seconds of speech made."""
    times, seconds = [], 0.0
    for i in range(count):
        start = time.perf_counter()
        wave = make(i)
        times.append((time.perf_counter() - start) * 1000)
        seconds += len(wave) / SAMPLE_RATE
    return times, seconds


def run(utterances: int, batches: int, curriculum: str, seed: int) -> dict:
    gen = DuplexGenerator(tiny(), "train", seed=seed, curriculum=CURRICULA[curriculum])
    rng = np.random.default_rng(seed)
    texts = [gen.question(CHAT_INTENTS[i % len(CHAT_INTENTS)], rng).text for i in range(utterances)]
    espeak_voices = user_voices("train")
    festival = Festival()
    festival.speak("hello", FESTIVAL_TRAIN_VOICES[0], rate=SAMPLE_RATE)  # the process start is not a render
    plain = [festival.speak(t, FESTIVAL_TRAIN_VOICES[0], rate=SAMPLE_RATE) for t in texts]
    accented = tuple(ACCENTED_VOICES)
    sources: dict[str, Callable[[int], np.ndarray]] = {
        "espeak-ng": lambda i: Renders().get(
            texts[i], Voice("espeak", "".join(espeak_voices[i % len(espeak_voices)]), 165, 45)),
        "festival english": lambda i: festival.speak(
            texts[i], FESTIVAL_TRAIN_VOICES[i % len(FESTIVAL_TRAIN_VOICES)], rate=SAMPLE_RATE),
        "festival accented": lambda i: festival.speak(
            texts[i], accented[i % len(accented)], rate=SAMPLE_RATE),
        "change gender": lambda i: change_speaker(plain[i], formants=1.1, pitch=1.2, pitch_range=1.3,
                                                  rate=SAMPLE_RATE),
    }
    report: dict = {"utterances": utterances, "curriculum": curriculum, "sources": {}}
    for name, make in sources.items():
        times, seconds = _times_ms(make, utterances)
        report["sources"][name] = {"ms_p50": round(float(np.median(times)), 1),
                                   "ms_p90": round(float(np.percentile(times, 90)), 1),
                                   "realtime_factor": round(sum(times) / 1000 / seconds, 4)}
    batch_s = []
    for step in range(batches):
        start = time.perf_counter()
        gen.batch(step, BATCH)
        batch_s.append(time.perf_counter() - start)
    report["batch_s_first"] = round(batch_s[0], 2)
    report["batch_s_p50_after_first"] = round(float(np.median(batch_s[1:])), 2) if batches > 1 else None
    report["batch_conversations"] = BATCH
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m microturn.benchmarks.renders", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=40, help="questions rendered by each source")
    parser.add_argument("--batches", type=int, default=6, help="training batches made in one process")
    parser.add_argument("--curriculum", choices=tuple(CURRICULA), default="hear-people")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.utterances < 1 or args.batches < 1:
        parser.error("--utterances and --batches must be at least 1")
    report = run(args.utterances, args.batches, args.curriculum, args.seed)
    print(f"{'source':<20}{'ms p50':>9}{'ms p90':>9}{'x realtime':>12}")
    for name, row in report["sources"].items():
        print(f"{name:<20}{row['ms_p50']:>9}{row['ms_p90']:>9}{row['realtime_factor']:>12}")
    later = report["batch_s_p50_after_first"]
    print(f"batch of {BATCH} ({args.curriculum}): first {report['batch_s_first']} s, then {later} s (p50)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
