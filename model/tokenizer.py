"""Byte-level text tokenizer with special tokens.

Ids 0..255 are raw UTF-8 bytes; specials follow. A `tokenizers` JSON
vocabulary is a later option (the vocab size is a config field).
Decoding is streaming-safe: `ByteStreamDecoder` holds back an incomplete
UTF-8 sequence until its last byte arrives. This module knows nothing about
tensors or the micro-turn layout beyond the special ids it names.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

SPECIALS = (
    "PAD",  # nothing in this slot (empty text-in, silent text-out)
    "EPAD",  # end of a text span: the text stream goes quiet after this
    "BOS",  # start of the session (first CTRL of the conversation)
    "CTRL",  # start of every micro-turn
    "TASK_START",  # the model opens a background task description
    "TASK_END",  # the model closes a background task description
    "SRC_USER",  # text-in source: typed by the user
    "SRC_BACKGROUND",  # text-in source: a background result
    "INSTR",  # start of the pinned instructions prefix
)


@dataclass(frozen=True)
class SpecialIds:
    PAD: int
    EPAD: int
    BOS: int
    CTRL: int
    TASK_START: int
    TASK_END: int
    SRC_USER: int
    SRC_BACKGROUND: int
    INSTR: int


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, specials from 256."""

    n_bytes = 256

    def __init__(self) -> None:
        self.special = SpecialIds(**{name: self.n_bytes + i for i, name in enumerate(SPECIALS)})
        self.vocab_size = self.n_bytes + len(SPECIALS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < self.n_bytes).decode("utf-8", errors="replace")

    def is_special(self, token: int) -> bool:
        return token >= self.n_bytes

    def special_name(self, token: int) -> str | None:
        if self.n_bytes <= token < self.vocab_size:
            return SPECIALS[token - self.n_bytes]
        return None


class ByteStreamDecoder:
    """Incremental UTF-8 decoding of byte ids; specials are skipped."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: list[int]) -> str:
        return self._dec.decode(bytes(i for i in ids if i < ByteTokenizer.n_bytes))


MAX_TASK_MARKER_BYTES = 512  # a task marker longer than this is dropped (runaway generation)


@dataclass
class DecodedText:
    """One micro-turn of text-out, decoded once for everyone who reads it."""

    # printable text: the bytes outside task markers (TASK_START ... TASK_END contents, and a runaway
    # marker's, are not for the user to read); specials dropped. A multi-byte character split across
    # calls, or around a marker, comes out whole once its last byte arrives
    text: str
    task_texts: list[str]  # TASK_START ... TASK_END spans completed in these tokens, stripped, non-empty


class TextOutDecoder:
    """Streaming decoder of one session's text-out: printable text, and the task markers it closes.

    A marker's bytes go to its task text, never to the printable text, even before it closes (the
    text streams to the user as it is decoded, so a marker cannot be shown first and taken back).
    A runaway marker (more than MAX_TASK_MARKER_BYTES bytes) yields no task, and its bytes stay out
    of the printable text until the TASK_END that closes it: what the model meant as a task
    description is no more for the user past the cap than before it. The model's EPAD (end of its
    text span) or a new TASK_START also ends that exclusion, so a model that never closes its
    runaway marker does not mute its transcript for the rest of the session.
    """

    def __init__(self, tokenizer: ByteTokenizer) -> None:
        self._text = ByteStreamDecoder()
        self._start = tokenizer.special.TASK_START
        self._end = tokenizer.special.TASK_END
        self._epad = tokenizer.special.EPAD
        self._marker: list[int] | None = None  # inside a marker: its bytes so far
        self._runaway = False  # a dropped marker's bytes are still coming: keep them out of the text

    def feed(self, ids: list[int]) -> DecodedText:
        tasks: list[str] = []
        printable: list[int] = []  # the bytes of these ids outside any marker
        for t in ids:
            if t == self._start:
                self._marker, self._runaway = [], False
            elif t == self._end:
                if self._marker is not None:
                    task = bytes(self._marker).decode("utf-8", errors="replace").strip()
                    if task:
                        tasks.append(task)
                self._marker, self._runaway = None, False
            elif t == self._epad:
                self._runaway = False
            elif t < ByteTokenizer.n_bytes:
                if self._marker is not None:
                    self._marker.append(t)
                    if len(self._marker) > MAX_TASK_MARKER_BYTES:
                        self._marker, self._runaway = None, True
                elif not self._runaway:
                    printable.append(t)
        return DecodedText(self._text.feed(printable), tasks)


class CtcStreamDecoder:
    """Greedy CTC read-out, streamed: a run of one id is one byte, specials (PAD is the blank) are
    gaps, so a doubled letter needs a blank between its two; runs continue across calls."""

    def __init__(self) -> None:
        self._bytes = ByteStreamDecoder()
        self._last = -1

    def feed(self, ids: list[int]) -> str:
        kept = []
        for i in ids:
            if i != self._last and i < ByteTokenizer.n_bytes:
                kept.append(i)
            self._last = i
        return self._bytes.feed(kept)

