"""A small combinatorial grammar of training question phrasings: opener x core x closer.

The demo model heard seven or eight fixed phrasings per intent and answers the held-out phrasing
of an intent about 0.1 less often than its training phrasings: it learns wordings, not content.
`expand(intent)` gives every opener + core + closer of an intent (hundreds), in a fixed order,
so that a curriculum can spread the same questions over many wordings. Cores use the placeholders
of training/data.py's PHRASINGS ({a} {op} {b}, {w}); the caller names the held-out phrasings to
avoid. This module knows nothing about voices, audio or training.
"""

from __future__ import annotations

import itertools

OPENERS = ("", "okay, ", "so, ", "um, ", "right, ", "well, ", "hey, ", "excuse me, ", "quick question, ")
CLOSERS = ("", " please", " for me", " now", " then", " thanks")
CORES = {
    "greeting": ("hello", "hi", "hey", "good morning", "good evening", "good afternoon", "hi there",
                 "hello there", "how are you", "how are you doing", "hello, can you hear me",
                 "hi, how is it going", "hey, nice to meet you", "hello again", "hi, anybody home"),
    "arith": ("what is {a} {op} {b}", "what's {a} {op} {b}", "{a} {op} {b}", "tell me {a} {op} {b}",
              "work out {a} {op} {b}", "calculate {a} {op} {b}", "what do you get for {a} {op} {b}",
              "what does {a} {op} {b} make", "do you know {a} {op} {b}", "can you do {a} {op} {b}",
              "figure out {a} {op} {b}", "what would {a} {op} {b} be"),
    "repeat": ("say {w}", "repeat {w}", "repeat the word {w}", "can you say {w}", "could you repeat {w}",
               "just say {w}", "say {w} back to me", "can you repeat {w}", "I want to hear {w}",
               "try saying {w}", "say this, {w}", "repeat after me, {w}"),
    "colour": ("what colour is this", "which colour is this", "what colour do you see", "what colour is it",
               "name this colour", "what colour am I holding", "what colour is that",
               "which colour do you see", "can you see what colour this is", "what colour is this thing"),
    "hard": ("what is {a} {op} {b}", "work out {a} {op} {b}", "calculate {a} {op} {b}",
             "can you compute {a} {op} {b}", "tell me {a} {op} {b}", "what do you get for {a} {op} {b}",
             "figure out {a} {op} {b}", "what would {a} {op} {b} be"),
    "time": ("what time is it", "what's the time", "do you know the time", "have you got the time",
             "what time do you have", "could I have the time", "what's the time right now",
             "do you know what time it is", "what time is it there", "can you check the time"),
}


def plain_words(phrasing: str) -> str:
    """Lower case, no commas or apostrophes, single spaces: how phrasings are compared."""
    return " ".join(phrasing.replace(",", " ").replace("'", "").lower().split())


def expand(intent: str, avoid: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every opener + core + closer of `intent`, in a fixed order, except those holding a phrasing of
    `avoid` (punctuation and case aside)."""
    held = [plain_words(a) for a in avoid]
    every = (o + c + e for o, c, e in itertools.product(OPENERS, CORES[intent], CLOSERS))
    return tuple(p for p in every if not any(h in plain_words(p) for h in held))
