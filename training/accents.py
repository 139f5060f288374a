"""English said by festival's Czech, Finnish and Italian voices: more real speakers for training.

Contract: `respell(text, language)` returns `text` rewritten in `language`'s spelling (one of
LANGUAGES) so that the language's own letter-to-sound rules say the English words, with an accent:
espeak-ng gives the American English phonemes (IPA), and each phoneme becomes the letters that
language reads as its nearest sound. Punctuation is kept, so clause pauses stay where they were.

Why: the only English festival voices in Debian are two male diphone voices and one female HTS voice,
and one of them is held out (training/curricula.py). Festival's other-language voices are diphones
recorded from other people (women, men, a child), whose spelling is close to phonemic, so each is
another real speaker of English-like speech. English phonemes a language lacks take its nearest
one, as its speakers would say them (th as t or d, w as u or v).
This module knows nothing about audio, festival or training; it needs `espeak-ng` on PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import lru_cache

from .espeak import ESPEAK_BINARY, EspeakMissingError

IPA_TIMEOUT_S = 30.0  # one clause; espeak-ng answers in milliseconds
LANGUAGES = ("czech", "finnish", "italian")
FRONT_VOWEL_LETTERS = "eiéí"  # Italian c and g read soft before these
IGNORED = "ˈˌ‿͡ "  # stress marks and ties: the voices place their own stress

# American English IPA (espeak-ng en-us) -> each language's letters. Longest symbols match first.
# Italian entries may be (default, before e/i) pairs: c, g and sc change their sound before e and i.
SPELLINGS: dict[str, dict[str, str | tuple[str, str]]] = {
    "czech": {
        "aɪ": "aj", "aʊ": "au", "eɪ": "ej", "oʊ": "ou", "ɔɪ": "oj", "tʃ": "č", "dʒ": "dž",
        "ɚɹ": "er", "ɑːɹ": "ár", "ɔːɹ": "ór", "oːɹ": "ór", "ɛɹ": "er", "ɪɹ": "ír", "ʊɹ": "úr", "iə": "ia",
        "ɑː": "á", "ɔː": "ó", "oː": "ó", "iː": "í", "uː": "ú", "ɜː": "ér", "ɚ": "er",
        "ʌ": "a", "ɑ": "a", "æ": "e", "ɛ": "e", "ɪ": "y", "i": "i", "ʊ": "u", "ɔ": "o", "o": "o",
        "ə": "e", "ɐ": "a", "ᵻ": "y", "e": "e", "a": "a", "u": "u",
        "p": "p", "b": "b", "t": "t", "d": "d", "k": "k", "ɡ": "g", "f": "f", "v": "v", "θ": "t",
        "ð": "d", "s": "s", "z": "z", "ʃ": "š", "ʒ": "ž", "h": "h", "m": "m", "n": "n", "ŋ": "ng",
        "l": "l", "ɹ": "r", "j": "j", "w": "u", "ɾ": "d", "ʔ": "", "x": "ch", "n̩": "n", "l̩": "l",
    },
    "finnish": {
        "aɪ": "ai", "aʊ": "au", "eɪ": "ei", "oʊ": "ou", "ɔɪ": "oi", "tʃ": "ts", "dʒ": "dj",
        "ɚɹ": "er", "ɑːɹ": "aar", "ɔːɹ": "oor", "oːɹ": "oor", "ɛɹ": "er", "ɪɹ": "iir", "ʊɹ": "uur",
        "iə": "ia",
        "ɑː": "aa", "ɔː": "oo", "oː": "oo", "iː": "ii", "uː": "uu", "ɜː": "öör", "ɚ": "er",
        "ʌ": "a", "ɑ": "a", "æ": "ä", "ɛ": "e", "ɪ": "i", "i": "i", "ʊ": "u", "ɔ": "o", "o": "o",
        "ə": "e", "ɐ": "a", "ᵻ": "i", "e": "e", "a": "a", "u": "u",
        "p": "p", "b": "b", "t": "t", "d": "d", "k": "k", "ɡ": "g", "f": "f", "v": "v", "θ": "t",
        "ð": "d", "s": "s", "z": "s", "ʃ": "s", "ʒ": "s", "h": "h", "m": "m", "n": "n", "ŋ": "ng",
        "l": "l", "ɹ": "r", "j": "j", "w": "v", "ɾ": "d", "ʔ": "", "x": "h", "n̩": "n", "l̩": "l",
    },
    "italian": {
        "aɪ": "ai", "aʊ": "au", "eɪ": "ei", "oʊ": "ou", "ɔɪ": "oi", "tʃ": ("ci", "c"), "dʒ": ("gi", "g"),
        "ɚɹ": "er", "ɑːɹ": "ar", "ɔːɹ": "or", "oːɹ": "or", "ɛɹ": "er", "ɪɹ": "ir", "ʊɹ": "ur", "iə": "ia",
        "ɑː": "a", "ɔː": "o", "oː": "o", "iː": "i", "uː": "u", "ɜː": "er", "ɚ": "er",
        "ʌ": "a", "ɑ": "a", "æ": "e", "ɛ": "e", "ɪ": "i", "i": "i", "ʊ": "u", "ɔ": "o", "o": "o",
        "ə": "e", "ɐ": "a", "ᵻ": "i", "e": "e", "a": "a", "u": "u",
        "p": "p", "b": "b", "t": "t", "d": "d", "k": ("c", "ch"), "ɡ": ("g", "gh"), "f": "f", "v": "v",
        "θ": "t", "ð": "d", "s": "s", "z": "s", "ʃ": ("sci", "sc"), "ʒ": ("gi", "g"), "h": "", "m": "m",
        "n": "n", "ŋ": "n", "l": "l", "ɹ": "r", "j": "i", "w": "u", "ɾ": "d", "ʔ": "", "x": "c",
        "n̩": "n", "l̩": "l",
    },
}
_SYMBOLS = {lang: sorted(table, key=len, reverse=True) for lang, table in SPELLINGS.items()}


@lru_cache(maxsize=4096)
def english_ipa(clause: str) -> str:
    """American English phonemes of one clause (no punctuation), words separated by spaces."""
    binary = shutil.which(ESPEAK_BINARY)
    if binary is None:
        raise EspeakMissingError(f"{ESPEAK_BINARY} not found on PATH; install it (apt-get install espeak-ng)")
    proc = subprocess.run([binary, "-q", "--ipa", "-v", "en-us", clause], capture_output=True, text=True,
                          timeout=IPA_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{ESPEAK_BINARY} --ipa failed ({proc.returncode}): {proc.stderr[-300:]}")
    return " ".join(proc.stdout.split())


def _respell_word(ipa: str, language: str) -> str:
    table, symbols = SPELLINGS[language], _SYMBOLS[language]
    pieces: list[str | tuple[str, str]] = []
    i = 0
    while i < len(ipa):
        if ipa[i] in IGNORED:
            i += 1
            continue
        symbol = next((s for s in symbols if ipa.startswith(s, i)), None)
        if symbol is None:  # a sound no table names (a rare diacritic): skipped, never spelled raw
            i += 1
            continue
        pieces.append(table[symbol])
        i += len(symbol)
    letters = ""
    for k, piece in enumerate(pieces):
        if isinstance(piece, tuple):  # Italian: which spelling depends on the next letter
            following = next((p if isinstance(p, str) else p[0] for p in pieces[k + 1:] if p), "")
            piece = piece[1] if following and following[0] in FRONT_VOWEL_LETTERS else piece[0]
        letters += piece
    return letters


def respell(text: str, language: str) -> str:
    """`text` in `language`'s spelling, said as American English; punctuation kept."""
    if language not in SPELLINGS:
        raise ValueError(f"unknown language {language!r}; one of {LANGUAGES}")
    out = []
    for part in re.split(r"([,.?!;:])", text):
        if re.fullmatch(r"[,.?!;:]", part):
            out.append(part)
        elif part.strip():
            out.extend(w for w in (_respell_word(w, language) for w in english_ipa(part).split()) if w)
    return re.sub(r" ([,.?!;:])", r"\1", " ".join(out))
