"""Out-of-domain user utterances and the model's one fixed answer to them.

Contract: `utterances(split)` lists every out-of-domain utterance of a split: the training grammar's
(opener x request x closer, over weather, stories, small talk, facts and errands: thousands) or the
evaluation's (a smaller grammar of its own). The two share no content word and no word pair
(`wording`), so the evaluation measures the fallback on wording never heard in training. None of
them holds a word of the model's domain (IN_DOMAIN_WORDS: numbers, sums, colours, time, repeating),
so "none of the things I can do" is always the right reading. The model answers every one of them
with FALLBACK_ANSWER (training/data.py's "fallback" scenario). This module knows nothing about audio.
"""

from __future__ import annotations

import itertools
import re

# what the model says to anything it cannot do: one short sentence naming what it can
FALLBACK_ANSWER = "sorry, I can do sums, words, colours and the time."
# words that never count as wording: grammar, not content
FUNCTION_WORDS = frozenset(
    "a an the i you me my your it is are was be do does did to of in on at for and or so what who how "
    "can could would will should have please just about with this that there any some".split())
# the model's domain: an out-of-domain utterance holding one of these could be read as a question it answers
IN_DOMAIN_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten plus minus times sum sums number numbers "
    "colour color colours red green blue yellow orange purple white black time clock hour minute say "
    "repeat word words hello hi hey morning evening".split())

# openers and closers of the training wordings; a curriculum's `carrier_share` gives in-domain questions
# them too, so that they say nothing about whether a question is out of the domain
TRAIN_OPENERS = ("", "so, ", "okay, ", "um, ", "quick question, ", "listen, ", "by the way, ", "well, ")
TRAIN_CLOSERS = ("", " please", " if you can", " right now", " for me", " thanks")
_TRAIN_REQUESTS = (
    # weather
    *(f"will it rain {w}" for w in ("tomorrow", "tonight", "this weekend", "later")),
    *(f"how hot will it get {w}" for w in ("tomorrow", "this weekend")),
    "should I bring an umbrella", "is there snow coming", "what's the forecast", "is it windy outside",
    # stories
    *(f"tell me a story about {t}" for t in ("a brave knight", "a lost puppy", "pirates", "a robot",
                                              "a wizard")),
    "make up a bedtime tale", "can you invent a fairy tale", "read me a poem",
    # small talk
    *(f"do you like {h}" for h in ("football", "cooking", "dancing", "movies", "books", "chess")),
    "what is your favourite food", "where do you live", "how old are you", "what is your name",
    "do you have any pets", "I had a long day", "I am feeling tired", "my cat is sleeping",
    "are you a real person", "what did you do yesterday", "do you dream",
    # facts
    *(f"what is the capital of {c}" for c in ("france", "japan", "brazil", "canada")),
    "who won the match", "how tall is mount everest", "who wrote hamlet", "why is the sky dark at night",
    # errands
    "play some jazz", "set an alarm", "turn off the lights", "send a message to my mum",
    "book a table at the restaurant", "order a pizza", "call my brother", "find a recipe for soup",
    "translate goodbye into french",
)
_HELD_OUT_OPENERS = ("", "honestly, ", "I'm curious, ")
_HELD_OUT_REQUESTS = (
    "is sunshine expected in madrid", "any chance of thunderstorms on sunday",
    "recite a limerick", "narrate a legend featuring elves",
    "have you ever visited london", "which season suits you best", "how were your holidays",
    "who painted the mona lisa", "which country grows pineapples",
    "recommend a good film", "dim the bedroom lamp", "remind me to water plants",
)


def _grammar(openers: tuple[str, ...], requests: tuple[str, ...], closers: tuple[str, ...]) -> list[str]:
    return [f"{o}{r}{c}" for o, r, c in itertools.product(openers, requests, closers)]


def utterances(split: str) -> list[str]:
    """Every out-of-domain utterance of "train" or "heldout", in a fixed order."""
    if split == "train":
        return _grammar(TRAIN_OPENERS, _TRAIN_REQUESTS, TRAIN_CLOSERS)
    if split == "heldout":
        return _grammar(_HELD_OUT_OPENERS, _HELD_OUT_REQUESTS, ("",))
    raise ValueError(f"unknown split {split!r}")


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def wording(text: str) -> set[str]:
    """Its content words and its word pairs: what two utterances must not share to count as new wording."""
    ws = words(text)
    return {w for w in ws if w not in FUNCTION_WORDS} | {f"{a} {b}" for a, b in itertools.pairwise(ws)}
