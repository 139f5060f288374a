"""Out-of-domain user utterances and the model's one fixed answer to them.

Contract: `utterances(split, grammar)` lists every out-of-domain utterance of a split: a training
grammar's (opener x request x closer) or the evaluation's (a smaller grammar of its own). The
"narrow" training grammar has ~60 requests over weather, stories, small talk, facts and errands; the
"wide" one adds ~1700 made of verb, object and question frames over a few hundred content words,
so that "not one of my intents" is learnt as a class and not as a list. Training and evaluation
share no content word and no word pair (`wording`), so the evaluation measures the fallback on
wording never heard in training; the wide grammar also keeps no word with a held-out word's stem
(`shares_stem`: "paint" beside "painted"). None of
them holds a word of the model's domain (IN_DOMAIN_WORDS: numbers, sums, colours, time, repeating),
so "none of the things I can do" is always the right reading. The model answers every one of them
with FALLBACK_ANSWER (training/data.py's "fallback" scenario). This module knows nothing about audio.
"""

from __future__ import annotations

import functools
import itertools
import re

from .fallback_wide import candidate_requests

# what the model says to anything it cannot do: one short sentence naming what it can
FALLBACK_ANSWER = "sorry, I can do sums, words, colours and the time."
# words that never count as wording: grammar, not content (interrogatives, forms of "be", "I'm")
FUNCTION_WORDS = frozenset(
    "a an the i you me my your it is are was were am i'm be do does did to of in on at for and or so "
    "what which who how can could would will should have please just about with this that there any "
    "some".split())
# the model's domain: an out-of-domain utterance holding one of these could be read as a question it answers
IN_DOMAIN_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten plus minus times sum sums number numbers "
    "colour color colours red green blue yellow orange purple white black time clock hour minute say "
    "repeat word words hello hi hey morning evening".split())

# openers and closers of the training wordings; a curriculum's `carrier_share` gives in-domain questions
# them too, so that they say nothing about whether a question is out of the domain
TRAIN_OPENERS = ("", "so, ", "okay, ", "um, ", "quick question, ", "listen, ", "by the way, ", "well, ")
TRAIN_CLOSERS = ("", " please", " if you can", " right now", " for me", " thanks")
# the wide grammar's: more ways into a request, so that no opener says "out of the domain"
WIDE_OPENERS = (*TRAIN_OPENERS, "actually, ", "right, ", "oh, ", "also, ", "now, ", "excuse me, ",
                "let me ask, ", "you know what, ", "I'm just asking, ", "I'm back, ", "tell me, ", "and, ")
WIDE_CLOSERS = (*TRAIN_CLOSERS, " thank you", " today", " now", " okay")
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


GRAMMARS = ("narrow", "wide")  # training grammars a curriculum can name (`Curriculum.fallback_grammar`)


def _grammar(openers: tuple[str, ...], requests: tuple[str, ...], closers: tuple[str, ...]) -> list[str]:
    return [f"{o}{r}{c}" for o, r, c in itertools.product(openers, requests, closers)]


@functools.cache
def utterances(split: str, grammar: str = "narrow") -> tuple[str, ...]:
    """Every out-of-domain utterance of "train" (in the named training grammar) or "heldout" (its own
    grammar whatever is named), in a fixed order."""
    if split == "heldout":
        return tuple(_grammar(_HELD_OUT_OPENERS, _HELD_OUT_REQUESTS, ("",)))
    if split != "train":
        raise ValueError(f"unknown split {split!r}")
    if grammar == "narrow":
        return tuple(_grammar(TRAIN_OPENERS, _TRAIN_REQUESTS, TRAIN_CLOSERS))
    if grammar == "wide":
        return tuple(_grammar(WIDE_OPENERS, (*_TRAIN_REQUESTS, *wide_requests()), WIDE_CLOSERS))
    raise ValueError(f"unknown out-of-domain grammar {grammar!r}; known: {GRAMMARS}")


def carriers(grammar: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(openers, closers) of a training grammar: what `Curriculum.carrier_share` lends in-domain questions."""
    return (WIDE_OPENERS, WIDE_CLOSERS) if grammar == "wide" else (TRAIN_OPENERS, TRAIN_CLOSERS)


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def wording(text: str) -> set[str]:
    """Its content words and its word pairs: what two utterances must not share to count as new wording."""
    ws = words(text)
    return {w for w in ws if w not in FUNCTION_WORDS} | {f"{a} {b}" for a, b in itertools.pairwise(ws)}


def shares_stem(a: str, b: str) -> bool:
    """Whether two content words are one word's forms: one a prefix of the other (4+ letters), or the
    same first five letters ("paint" / "painted", "grow" / "grows", "expect" / "expected")."""
    short, long = sorted((a, b), key=len)
    return a == b or (len(short) >= 4 and long.startswith(short)) or (len(short) >= 5 and a[:5] == b[:5])


@functools.cache
def wide_requests() -> tuple[str, ...]:
    """The wide grammar's requests (fallback_wide.py's frames), less any that holds a word of the
    domain, shares wording with the evaluation's utterances or a word's stem with theirs."""
    held = utterances("heldout")
    held_wording = set().union(*(wording(u) for u in held))
    held_words = {w for u in held for w in words(u) if w not in FUNCTION_WORDS}

    def fits(request: str) -> bool:
        ws = words(request)
        return not (wording(request) & held_wording or set(ws) & IN_DOMAIN_WORDS
                    or any(shares_stem(w, h) for w in ws if w not in FUNCTION_WORDS for h in held_words))

    return tuple(r for r in dict.fromkeys(candidate_requests()) if r not in _TRAIN_REQUESTS and fits(r))
