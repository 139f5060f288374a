"""When background results are fed to the live model: the interleaving policy.

Contract: one `ResultScheduler` per session. The session `push`es every partial
or final result text with its task's scheduling and the session epoch at
arrival, and each tick asks `take(model_speaking, epoch, budget, measure)` for
the text to put in that micro-turn's text-in slots (with the background source
marker). The policy:

- `interrupt`: delivered at the next micro-turn, whether or not the model speaks.
- `when_idle`: delivered only on a tick where the model is not speaking; an item
  still waiting when the epoch moves on (a barge-in) is stale and dropped.
- `silent`: never delivered (context only: the conversation record keeps it).

Interrupt items go first, then when_idle items, each in arrival order. `budget`
is in the session's units (text-in token slots) and `measure(text)` counts them
(default: characters); an item that does not fit is split, its rest waiting at
the head for the next tick. Pending text per session is bounded; overflow drops
the oldest waiting item and counts it in `dropped`. No tensors, no tokenizer, no
clocks: the session owns those.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .context import Scheduling

MAX_PENDING_CHARS = 8_000  # waiting background text per session; beyond it the oldest waiting item goes


@dataclass
class Piece:
    task_id: str  # the task the text belongs to
    text: str  # text for the text-in slots
    final: bool  # True for the task's final result, False for a partial


@dataclass
class _Pending:
    piece: Piece
    epoch: int  # session epoch when the text arrived


class ResultScheduler:
    """Per-session queues of background text waiting for text-in slots."""

    def __init__(self, max_pending_chars: int = MAX_PENDING_CHARS) -> None:
        self.max_pending_chars = max_pending_chars
        self._interrupt: deque[_Pending] = deque()
        self._when_idle: deque[_Pending] = deque()
        self._chars = 0
        self.dropped = 0  # items dropped: stale after a barge-in, or over the pending bound

    def push(self, task_id: str, text: str, scheduling: Scheduling, epoch: int, final: bool = False) -> None:
        if scheduling == "silent" or not text:
            return
        queue = self._interrupt if scheduling == "interrupt" else self._when_idle
        queue.append(_Pending(Piece(task_id, text, final), epoch))
        self._chars += len(text)
        while self._chars > self.max_pending_chars:
            oldest = self._when_idle or self._interrupt
            self._chars -= len(oldest.popleft().piece.text)
            self.dropped += 1

    def drop_task(self, task_id: str) -> None:
        """Forget a task's waiting text (cancelled tasks are not spoken)."""
        for queue in (self._interrupt, self._when_idle):
            kept = [p for p in queue if p.piece.task_id != task_id]
            self._chars -= sum(len(p.piece.text) for p in queue) - sum(len(p.piece.text) for p in kept)
            queue.clear()
            queue.extend(kept)

    def pending(self) -> int:
        """Items waiting (stale ones included until the next `take`)."""
        return len(self._interrupt) + len(self._when_idle)

    def take(
        self, model_speaking: bool, epoch: int, budget: int, measure: Callable[[str], int] = len
    ) -> list[Piece]:
        """The pieces for this tick's text-in slots, at most `budget` units by `measure`."""
        stale = [p for p in self._when_idle if p.epoch < epoch]
        for item in stale:
            self._when_idle.remove(item)
            self._chars -= len(item.piece.text)
            self.dropped += 1
        out: list[Piece] = []
        queues = [self._interrupt] if model_speaking else [self._interrupt, self._when_idle]
        for queue in queues:
            while queue and budget > 0:
                piece = queue[0].piece
                cost = measure(piece.text)
                if cost <= budget:
                    queue.popleft()
                    self._chars -= len(piece.text)
                    out.append(piece)
                    budget -= cost
                    continue
                cut = _fit(piece.text, budget, measure)
                if cut == 0:
                    return out
                out.append(Piece(piece.task_id, piece.text[:cut], final=False))
                piece.text = piece.text[cut:]
                self._chars -= cut
                return out
        return out


def _fit(text: str, budget: int, measure: Callable[[str], int]) -> int:
    """Longest prefix length of `text` whose measure is within `budget` (measure grows with length)."""
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if measure(text[:mid]) <= budget:
            low = mid
        else:
            high = mid - 1
    return low
