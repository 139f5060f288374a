"""Duplex behaviour of a checkpoint on held-out conversations (`microturn eval duplex`).

Contract: `evaluate(engine, convs, gen)` plays each conversation's user side (audio, typed
text, camera frames, background results; scripted, not reactive) into the real `Engine`
micro-turn by micro-turn, several conversations side by side in one batch, greedy sampling,
and scores what the model did against the episode labels of training/data.py. `main(args)`
loads `--checkpoint`, draws `--conversations` held-out conversations (held-out voices and
phrasings, one episode each, scenarios in turn; `--split train` draws them from the training
voices and phrasings instead, to measure the generalisation gap, and `--voices` speaks one split's
phrasings in the other's voices, to tell the two halves of that gap apart) for each `--synth`
(espeak-ng, festival: the same conversations, spoken by that synthesiser's voices of the split; the
held-out festival voice is one no curriculum trains on), prints a table per synthesiser and a JSON
last line: every metric over all conversations, and the same per synthesiser under "by_synth".

Definitions (Full-Duplex-Bench v1 style, on the user's clock: the output of micro-turn t
plays during [(t+1)*200, (t+2)*200) ms, so one tick of compute is always counted):
- model speech: an output dMel frame whose mean code over channels exceeds SPEECH_MEAN_CODE
  (digital silence is code 1, the model voice's speech frames are 5 and up);
- pause_takeover_rate: mid-sentence pauses during which the model spoke;
- turn_takeover_rate / turn_latency_ms_p50: spoken questions the model answered with speech
  within RESPONSE_WINDOW_MS of their end, and the time from the end of the user's speech to
  its first speech frame;
- interrupt_stop_rate / interrupt_stop_ms_p50: barge-ins while the model spoke after which it
  fell silent (STOP_SILENCE_MS of no speech) within STOP_TARGET_MS; the time to fall silent;
- answer_accuracy_text: the answer's text-out span (first non-PAD token to EPAD) equals the
  reference text after normalisation (also split by typed / spoken question);
  answer_accuracy_speech: the model's spoken answer is,
  by DTW distance over log-mel frames, nearer to the reference rendering (the model voice
  saying the right answer) than to renderings of N_CANDIDATES wrong answers;
- task_text_accuracy: of those questions, the ones whose task text (between the markers) is
  the reference task ("499 times 34", "what time is it") after normalisation;
- answers_right_by_intent: "right/asked" text answers per intent and typed / spoken question;
- task_delegation_rate: hard sums and time questions whose text-out held TASK_START..TASK_END
  before the background result arrived; vision_accuracy: colour answers naming the frame's
  colour and no other;
- fallback_rate: out-of-domain utterances (training/fallback.py, held-out wording) whose text-out
  span is FALLBACK_ANSWER; fallback_takeover_rate: spoken ones the model answered with any speech
  within RESPONSE_WINDOW_MS (they are not part of turn_takeover_rate, which stays comparable);
- heard_cer / heard_wer (models that hear, Engine.hears): character / word error rate (jiwer,
  over all utterances) of the model's reading of its audio-in over each user utterance's span
  (training/heard.py `utterance_spans`) against the normalised words said; None for other models.
This module does not know how the model was trained.
"""

from __future__ import annotations

import argparse
import json
import re

import jiwer
import librosa
import numpy as np
import torch

from ..model.config import ModelConfig
from ..model.dmel import DMel
from ..model.engine import Engine
from ..model.slots import SamplingParams
from ..model.tokenizer import ByteTokenizer, CtcStreamDecoder
from .curricula import SCENARIOS
from .data import COLOURS, TURN_MS, Conversation, DuplexGenerator, Episode
from .fallback import FALLBACK_ANSWER
from .heard import utterance_spans

SPEECH_MEAN_CODE = 3.0  # frame mean code above this = speech (silence 1, model voice 5-9)
FRAME_MS = 12.5  # one dMel frame
RESPONSE_WINDOW_MS = 2000.0  # a question not answered within this is a missed turn
STOP_SILENCE_MS = 400.0  # silence this long after a barge-in counts as stopped
STOP_TARGET_MS = 400.0  # the interruption target of the issue
ANSWER_KINDS = ("answer", "pause", "typed", "task")  # episodes whose answer text is scored
METRIC_KEYS = ("pause_takeover_rate", "turn_takeover_rate", "turn_latency_ms_p50", "interrupt_stop_ms_p50",
               "interrupt_stop_rate", "answer_accuracy_text", "answer_accuracy_text_typed",
               "answer_accuracy_text_spoken", "answer_accuracy_speech",
               "task_delegation_rate", "task_text_accuracy", "vision_accuracy", "fallback_rate",
               "fallback_takeover_rate", "heard_cer", "heard_wer")

# what `score` appends to, per episode (plus "text INTENT typed|spoken" keys it adds)
OBSERVATIONS = ("pause", "takeover", "latency", "stop", "stop_ms", "delegation", "task_text", "vision",
                "text", "text_typed", "text_spoken", "speech", "fallback", "fallback_takeover")


def normalise_answer(text: str) -> str:
    """Lower case, letters, digits, ':' (times) and single spaces only: how an answer is written, its
    number words kept as words (training/heard.py's `normalise_spoken` turns them into digits)."""
    return " ".join(re.sub(r"[^a-z0-9: ]", " ", text.lower()).split())


class Recording:
    """What the model produced in one conversation: text-out ids and output dMel codes per turn, and
    what it heard (its greedy reading of the audio-in positions)."""

    def __init__(self, text_out: list[list[int]], codes: np.ndarray,
                 heard: list[list[int]] | None = None) -> None:
        self.text_out = text_out  # (T, To)
        self.codes = codes  # (T * F, C) output dMel codes
        self.heard = [i for row in heard or [] for i in row]  # (T * A,) CTC ids
        self.speech = codes.mean(axis=1) > SPEECH_MEAN_CODE  # (T * F,)
        self.time_ms = TURN_MS + np.arange(len(codes)) * FRAME_MS  # playback time of each frame

    def first_speech(self, start_ms: float, end_ms: float) -> float | None:
        hit = np.flatnonzero(self.speech & (self.time_ms >= start_ms) & (self.time_ms < end_ms))
        return float(self.time_ms[hit[0]]) if hit.size else None

    def silent_from(self, start_ms: float, hold_ms: float) -> float | None:
        """Start of the first run of `hold_ms` without speech at or after `start_ms`."""
        hold = int(hold_ms / FRAME_MS)
        idx = np.flatnonzero(self.time_ms >= start_ms)
        speech = self.speech[idx[0]:] if idx.size else self.speech[:0]
        for i in range(len(speech) - hold + 1):
            if not speech[i : i + hold].any():
                return float(self.time_ms[idx[0] + i])
        return None

    def utterance(self, start_ms: float) -> np.ndarray:
        """Codes of the speech run starting at `start_ms`, up to STOP_SILENCE_MS of silence."""
        first = int(np.searchsorted(self.time_ms, start_ms))
        end = self.silent_from(start_ms, STOP_SILENCE_MS)
        last = len(self.codes) if end is None else int(np.searchsorted(self.time_ms, end))
        return self.codes[first:last]

    def span(self, start_turn: int, end_turn: int) -> list[int]:
        """Text-out ids from the first non-PAD id in turns [start_turn, end_turn) to the next EPAD
        (excl.). The text must start in that window but may run on past it: a long answer (the
        fallback sentence is ~13 micro-turns of text) is read whole."""
        sp = ByteTokenizer().special
        ids = [i for row in self.text_out[start_turn:] for i in row]
        first = next((k for k, i in enumerate(ids) if i != sp.PAD), len(ids))
        if first >= sum(len(row) for row in self.text_out[start_turn:end_turn]):
            return []
        ids = ids[first:]
        return ids[: ids.index(sp.EPAD)] if sp.EPAD in ids else ids


def run(engine: Engine, convs: list[Conversation], wait_bias: float = 0.0) -> list[Recording]:
    """Play conversations side by side through the engine (at most its max_slots at once), greedy,
    with `wait_bias` over the checkpoint's own turn-taking bias."""
    cfg = engine.config
    recordings: list[Recording] = []
    for lo in range(0, len(convs), engine.max_slots):
        group = convs[lo : lo + engine.max_slots]
        slots = [engine.join(c.instructions, SamplingParams(0.0, 0, 0.0, 0, seed=lo + i, wait_bias=wait_bias))
                 for i, c in enumerate(group)]
        text = [[] for _ in group]
        codes = [[] for _ in group]
        heard = [[] for _ in group]
        engine.trace = []
        try:
            for t in range(max(c.turns for c in group)):
                out = engine.step({s: c.slot_input(t) for s, c in zip(slots, group, strict=True)
                                   if t < c.turns})
                rec = engine.trace.pop()
                for i, (s, c) in enumerate(zip(slots, group, strict=True)):
                    if t < c.turns:
                        row = rec["slots"].index(s)
                        text[i].append(rec["text_out"][row].tolist())
                        codes[i].append(rec["audio_out"][row].reshape(-1, cfg.dmel_channels).numpy())
                        heard[i].append(out[s].heard_tokens)
        finally:
            engine.trace = None
            for s in slots:
                engine.leave(s)
        recordings += [Recording(tx, np.concatenate(cd), hd)
                       for tx, cd, hd in zip(text, codes, heard, strict=True)]
    return recordings


class SpeechJudge:
    """Nearest reference rendering by DTW over log-mel frames."""

    def __init__(self, gen: DuplexGenerator) -> None:
        self.gen, self.dmel = gen, DMel()
        self._refs: dict[str, np.ndarray] = {}

    def _logmel(self, codes: np.ndarray) -> np.ndarray:
        return self.dmel.decode(torch.from_numpy(codes)).numpy().T  # (C, frames)

    def reference(self, text: str) -> np.ndarray:
        if text not in self._refs:
            wave = torch.from_numpy(self.gen.model_speech(text))[None]
            self._refs[text] = self._logmel(self.dmel.encode(wave)[0].numpy())
        return self._refs[text]

    def correct(self, codes: np.ndarray, answer: str, candidates: list[str]) -> bool:
        if len(codes) == 0:
            return False
        spoken = self._logmel(codes)
        costs = []
        for text in [answer, *candidates]:
            acc, path = librosa.sequence.dtw(X=self.reference(text), Y=spoken, metric="euclidean")
            costs.append(acc[-1, -1] / len(path))
        return int(np.argmin(costs)) == 0


def score(ep: Episode, rec: Recording, judge: SpeechJudge, out: dict[str, list]) -> None:
    """Append this episode's observations to the per-metric lists in `out`."""
    sp, tok = ByteTokenizer().special, ByteTokenizer()
    if ep.pause_ms is not None:
        out["pause"].append(rec.first_speech(*ep.pause_ms) is not None)
    if not ep.typed:
        first = rec.first_speech(ep.input_end_ms, ep.input_end_ms + RESPONSE_WINDOW_MS)
        out["fallback_takeover" if ep.kind == "fallback" else "takeover"].append(first is not None)
        if first is not None and ep.kind != "fallback":
            out["latency"].append(first - ep.input_end_ms)
    if ep.onset_ms is not None and rec.first_speech(ep.onset_ms - STOP_SILENCE_MS, ep.onset_ms) is not None:
        stop = rec.silent_from(ep.onset_ms, STOP_SILENCE_MS)
        out["stop"].append(stop is not None and stop - ep.onset_ms <= STOP_TARGET_MS)
        if stop is not None:
            out["stop_ms"].append(max(0.0, stop - ep.onset_ms))
    window = int(RESPONSE_WINDOW_MS // TURN_MS)
    answer_turn = ep.input_end_turn
    if ep.kind == "task":
        held = [i for row in rec.text_out[ep.input_end_turn : ep.result_turn] for i in row]
        opened = held.index(sp.TASK_START) if sp.TASK_START in held else len(held)
        out["delegation"].append(sp.TASK_END in held[opened:])
        task = held[opened + 1 : held.index(sp.TASK_END, opened)] if sp.TASK_END in held[opened:] else []
        out["task_text"].append(normalise_answer(tok.decode(task)) == normalise_answer(ep.task))
        answer_turn = ep.result_end_turn
    if ep.kind == "vision":
        named = tok.decode(rec.span(ep.input_end_turn, ep.input_end_turn + window))
        said = set(normalise_answer(named).split())
        out["vision"].append(ep.colour in said and not (said & set(COLOURS)) - {ep.colour})
    if ep.kind == "fallback":
        text = tok.decode(rec.span(answer_turn, answer_turn + window))
        out["fallback"].append(normalise_answer(text) == normalise_answer(FALLBACK_ANSWER))
    if ep.kind in ANSWER_KINDS:
        text = tok.decode(rec.span(answer_turn, answer_turn + window))
        right = normalise_answer(text) == normalise_answer(ep.answer)
        out["text"].append(right)
        out["text_typed" if ep.typed else "text_spoken"].append(right)
        out.setdefault(f"text {ep.intent} {'typed' if ep.typed else 'spoken'}", []).append(right)
        start_ms = (answer_turn + 1) * TURN_MS
        first = rec.first_speech(start_ms, start_ms + RESPONSE_WINDOW_MS)
        spoken = rec.utterance(first) if first is not None else rec.codes[:0]
        out["speech"].append(judge.correct(spoken, ep.answer, ep.candidates))


def heard_pairs(convs: list[Conversation], recordings: list[Recording],
                cfg: ModelConfig) -> tuple[list[str], list[str]]:
    """(said, heard): the normalised words of each user utterance, and the model's reading of its span."""
    said, heard = [], []
    for conv, rec in zip(convs, recordings, strict=True):
        for first, length, text in utterance_spans(conv.user_said, cfg):
            said.append(text)
            heard.append(" ".join(CtcStreamDecoder().feed(rec.heard[first : first + length]).split()))
    return said, heard


def heard_error_rates(convs: list[Conversation], recordings: list[Recording],
                      cfg: ModelConfig) -> tuple[float, float] | None:
    """(CER, WER) of what the model read at each user utterance's audio-in span against what was said."""
    return _error_rates(*heard_pairs(convs, recordings, cfg))


def _error_rates(said: list[str], heard: list[str]) -> tuple[float, float] | None:
    if not said:
        return None
    return round(float(jiwer.cer(said, heard)), 4), round(float(jiwer.wer(said, heard)), 4)


def observe(engine: Engine, convs: list[Conversation], gen: DuplexGenerator,
            wait_bias: float = 0.0) -> dict[str, list]:
    """Every episode's observations (OBSERVATIONS and "text INTENT typed|spoken"), plus "said" and
    "heard" (models that hear): what `summarise` turns into metrics, and what pools across runs."""
    obs: dict[str, list] = {k: [] for k in OBSERVATIONS}
    judge = SpeechJudge(gen)
    recordings = run(engine, convs, wait_bias)
    for conv, rec in zip(convs, recordings, strict=True):
        for ep in conv.episodes:
            score(ep, rec, judge, obs)
    if engine.hears:
        obs["said"], obs["heard"] = heard_pairs(convs, recordings, engine.config)
    obs["conversations"] = [len(convs)]
    return obs


def pool(runs: list[dict[str, list]]) -> dict[str, list]:
    return {k: [x for r in runs for x in r.get(k, [])] for k in {k for r in runs for k in r}}


def evaluate(engine: Engine, convs: list[Conversation], gen: DuplexGenerator, wait_bias: float = 0.0) -> dict:
    return summarise(observe(engine, convs, gen, wait_bias), engine.wait_bias_default + wait_bias)


def summarise(obs: dict[str, list], wait_bias: float) -> dict:
    heard = _error_rates(obs["said"], obs["heard"]) if "said" in obs else None

    def rate(key: str) -> float | None:
        return round(float(np.mean(obs[key])), 4) if obs[key] else None

    def p50(key: str) -> float | None:
        return round(float(np.median(obs[key])), 1) if obs[key] else None

    metrics = {
        "pause_takeover_rate": rate("pause"), "turn_takeover_rate": rate("takeover"),
        "turn_latency_ms_p50": p50("latency"), "interrupt_stop_ms_p50": p50("stop_ms"),
        "interrupt_stop_rate": rate("stop"), "answer_accuracy_text": rate("text"),
        "answer_accuracy_text_typed": rate("text_typed"), "answer_accuracy_text_spoken": rate("text_spoken"),
        "answer_accuracy_speech": rate("speech"), "task_delegation_rate": rate("delegation"),
        "task_text_accuracy": rate("task_text"),
        "vision_accuracy": rate("vision"), "fallback_rate": rate("fallback"),
        "fallback_takeover_rate": rate("fallback_takeover"),
        "heard_cer": heard and heard[0], "heard_wer": heard and heard[1],
    }
    by_intent = {k[len("text ") :]: f"{sum(v)}/{len(v)}" for k, v in sorted(obs.items())
                 if k.startswith("text ")}
    counts = {"pauses": len(obs["pause"]), "questions_spoken": len(obs["takeover"]),
              "interruptions_measured": len(obs["stop"]), "answers": len(obs["text"]),
              "tasks": len(obs["delegation"]), "vision_questions": len(obs["vision"]),
              "out_of_domain": len(obs["fallback"])}
    return {**metrics, "answers_right_by_intent": by_intent, "counts": counts,
            "conversations": sum(obs["conversations"]), "speech_judge": "dtw-nearest-reference-rendering",
            "sampling": "greedy", "wait_bias": round(wait_bias, 3)}


def eval_conversations(gen: DuplexGenerator, n: int) -> list[Conversation]:
    """n single-episode conversations of `gen`'s split (held-out for the figures), the scenarios in turn."""
    return [gen.conversation(i, kinds=(SCENARIOS[i % len(SCENARIOS)],)) for i in range(n)]


_SPLIT_NAMES = {"heldout": "held-out", "train": "training"}


def _table(title: str, result: dict) -> None:
    print(title)
    for key in METRIC_KEYS:
        value = result[key]
        print(f"  {key:<24} {'n/a' if value is None else value}")
    for key, value in result["counts"].items():
        print(f"  {'n ' + key:<24} {value}")
    for key, value in result["answers_right_by_intent"].items():
        print(f"  {'right ' + key:<24} {value}")


def main(args: argparse.Namespace) -> int:
    engine = Engine.from_checkpoint(args.checkpoint, max_slots=args.batch, device=args.device)
    voices = args.voices or args.split
    bias = engine.wait_bias_default + args.wait_bias
    runs = {}
    for synth in args.synth:
        gen = DuplexGenerator(engine.config, args.split, seed=args.seed, voices=voices, synth=synth)
        runs[synth] = observe(engine, eval_conversations(gen, args.conversations), gen, args.wait_bias)
    by_synth = {synth: summarise(obs, bias) for synth, obs in runs.items()}
    result = {**summarise(pool(list(runs.values())), bias), "by_synth": by_synth, "synths": list(args.synth),
              "split": args.split, "voices": voices}
    print(f"duplex evaluation of {args.checkpoint}: {args.conversations} conversations per synthesiser "
          f"({_SPLIT_NAMES[voices]} voices, {_SPLIT_NAMES[args.split]} phrasings), greedy sampling, "
          "speech judged by DTW to reference renderings")
    for synth, summary in by_synth.items():
        _table(f"{synth}:", summary)
    if len(by_synth) > 1:
        _table("all synthesisers:", result)
    print(json.dumps(result))
    return 0
