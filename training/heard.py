"""What the user said, as a dense training target on the audio-in positions (CTC).

The answer loss only says what to reply; a question in a new wording then has to be mapped to
an answer without the model ever having been told which words it heard. This target tells it:
the text head, read at each audio-in position, transcribes the user's speech under CTC (blank =
PAD), an inner monologue on the input side. It shares the text head, so it adds no weights and a
checkpoint trained with it loads anywhere.

Contract: `heard_targets(said, cfg)` takes each batch row's whole user utterances (start sample,
end sample, text) and returns a `Heard`: per utterance a normalised byte target (`normalise_spoken`)
and a span of audio-in positions from its first audio token to HEARD_LAG_TOKENS past its last
(a causal model hears a word before it can name it), cut at the row's next utterance
(`utterance_spans`, which the evaluation reads the model's transcripts over too).
`heard_loss(model, h, heard)` is the mean CTC loss per target byte over those spans.
This module knows nothing about how conversations are made or about optimisers.

Legend: B rows, T audio-in positions per row (N turns x A), U utterances, S target bytes, D width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.config import ModelConfig
from ..model.slots import TURN_SAMPLES
from ..model.tokenizer import ByteTokenizer
from ..model.transformer import InteractionModel

# audio tokens (400 ms) past an utterance's end that its transcript may still come in: a causal model
# names a word after hearing it, and fast speech holds nearly one byte per 50 ms token
HEARD_LAG_TOKENS = 8
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TOK = ByteTokenizer()
_DIGIT = {w: str(i) for i, w in enumerate(NUMBER_WORDS)}


def normalise_spoken(text: str) -> str:
    """Lower case, number words as digits (the audio of "3" and "three" is the same), letters,
    digits, apostrophes and single spaces only: one target per sound. Unlike the evaluation's
    `normalise_answer`, it says how words sound, not how an answer is written."""
    words = re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()
    return " ".join(_DIGIT.get(w, w) for w in words)


@dataclass
class Heard:
    row: torch.Tensor  # (U,) long: batch row of each utterance
    start: torch.Tensor  # (U,) long: first audio-in position of its span
    length: torch.Tensor  # (U,) long: audio-in positions in its span
    targets: torch.Tensor  # (U, S) long: normalised bytes, PAD past target_length
    target_length: torch.Tensor  # (U,) long

    def to(self, device: torch.device | str) -> Heard:
        return Heard(**{k: v.to(device) for k, v in vars(self).items()})


def utterance_spans(utterances: list[tuple[int, int, str]], cfg: ModelConfig) -> list[tuple[int, int, str]]:
    """One conversation's utterances (start sample, end sample, text), sorted by start -> (first
    audio-in position, positions, normalised text) of each that has something to transcribe."""
    token = TURN_SAMPLES // cfg.audio_tokens  # samples per audio token
    spans = []
    for i, (s0, s1, text) in enumerate(utterances):
        first, last = s0 // token, (s1 - 1) // token + HEARD_LAG_TOKENS
        if i + 1 < len(utterances):
            last = min(last, utterances[i + 1][0] // token - 1)
        said = normalise_spoken(text)
        if said and last >= first:
            spans.append((first, last - first + 1, said))
    return spans


def heard_targets(said: list[list[tuple[int, int, str]]], cfg: ModelConfig) -> Heard:
    """Per batch row, its utterances (start sample, end sample, text), sorted by start -> `Heard`."""
    rows, starts, lengths, targets = [], [], [], []
    for b, utterances in enumerate(said):
        for first, length, text in utterance_spans(utterances, cfg):
            rows.append(b)
            starts.append(first)
            lengths.append(length)
            targets.append(_TOK.encode(text))
    width = max((len(t) for t in targets), default=1)
    padded = [t + [_TOK.special.PAD] * (width - len(t)) for t in targets]
    long = torch.long
    return Heard(torch.tensor(rows, dtype=long), torch.tensor(starts, dtype=long),
                 torch.tensor(lengths, dtype=long), torch.tensor(padded, dtype=long).view(len(padded), width),
                 torch.tensor([len(t) for t in targets], dtype=long))


def heard_loss(model: InteractionModel, h: torch.Tensor, heard: Heard) -> torch.Tensor:
    """CTC of the text head on the audio-in hidden states h (B, T, D) -> mean nats per target byte.
    Spans running past T (an utterance ending in the last turns) are cut there; an impossible
    alignment counts zero rather than infinity."""
    if not len(heard.row):
        return h.new_zeros((), dtype=torch.float32)
    T = h.shape[1]
    length = torch.minimum(heard.length, T - heard.start)  # (U,)
    steps = torch.arange(int(length.max()), device=h.device)
    idx = (heard.start[:, None] + steps).clamp(max=T - 1)  # (U, Tu)
    logp = model.text_logits(h[heard.row[:, None], idx]).log_softmax(-1)  # (U, Tu, V)
    return F.ctc_loss(logp.transpose(0, 1), heard.targets, length, heard.target_length,
                      blank=_TOK.special.PAD, zero_infinity=True)
