"""A session as a resumption record and back, and the handles a live resumable session is sent.

`snapshot` takes what a handle carries from a live session (on the event loop, bounded:
the newest conversation items and background-record entries within `ITEM_BUDGET_CHARS`).
`restore` rebuilds a new session from a record before it joins the engine: its settings
(through the same all-or-nothing path as `session.update`), sampling, conversation items
(so `conversation.item.retrieve` finds the turns from before the move), and, as the model's
memory, the newest lines of the text record ("user: ...", "assistant: ...", "result: ...")
that fit the engine's pinned prefix after the instructions: the join prefills them, as it
prefills instructions, so no engine change is needed. `restore_background` refills the
background record, finished results included, so later tasks' context packages hold them.
`redeem` spends a reconnect's handle and finds its session when this replica still holds it.
`HandleRotation` seals handles off the event loop and decides when a live session gets a new
one: after every finished turn and before the last one expires. This module knows nothing
about sockets.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..model.slots import SamplingParams
from . import protocol as p
from . import server_events as ev
from .background_service import SessionBackground
from .errors import ErrorCode, ProtocolError
from .resumption import ResumeError, ResumeRecord, Resumption
from .session import Session
from .session_config import apply_session_config

ITEM_BUDGET_CHARS = 24_000  # JSON of conversation items (and of record entries) a handle starts from
TAKE_OVER_TIMEOUT_S = 5.0  # how long a reconnect waits for the old connection to hand its session over
HANDLE_CHECK_S = 1.0  # how often a resumable session looks for a finished turn to send a new handle for
SPEAKING_HANDLE_S = 5.0  # while a response runs on, a changed record still gets a handle this often
ROLE_LABELS = {"user": "user", "model": "assistant", "task": "result", "system": "system"}
SESSION_KEYS_DROPPED = ("type", "object", "id", "model", "replica")  # session object fields no config has


def snapshot(session: Session, bind: str, replica: str, iat: float, exp: float) -> ResumeRecord:
    """The session as a record; takes the next handle generation."""
    config = {k: v for k, v in session.session_dict().items() if k not in SESSION_KEYS_DROPPED}
    config["instructions"] = session.client_instructions
    config["tools"] = [{"type": "function", "name": t.name, "description": t.description,
                        "parameters": t.parameters, **({"behavior": "background"} if t.background else {})}
                       for t in session.tools]
    entries = session.background.record.items if session.background is not None else []
    fields = {"role", "text", "source", "task_id", "item_id"}
    record = (e.model_dump(include=fields) for e in reversed(entries))
    gen, session.resume_gen = session.resume_gen, session.resume_gen + 1
    return ResumeRecord(
        sid=session.id, gen=gen, bind=bind, iat=iat, exp=exp, replica=replica, config=config,
        sampling=dataclasses.asdict(session.sampling), task_events=session.task_events,
        items=_newest_within(session.conversation.newest(), ITEM_BUDGET_CHARS),
        record=_newest_within(record, ITEM_BUDGET_CHARS),
    )


def _newest_within(newest_first: Iterator[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    kept: list[dict[str, Any]] = []
    for item in newest_first:
        budget -= len(json.dumps(item))
        if budget < 0:
            break
        kept.append(copy.deepcopy(item))
    return kept[::-1]


def restore(session: Session, record: ResumeRecord, prefix_len: int, measure: Callable[[str], int]) -> None:
    """Rebuild `session` from `record` before it joins (prefix_len: the engine's pinned prefix, in tokens
    `measure` counts). ResumeError (invalid) when the record does not fit this server (version, model)."""
    session.id = record.sid
    try:
        apply_session_config(session, p.SessionConfig.model_validate(record.config), None)
        session.sampling = SamplingParams(**record.sampling)
        for item in record.items:
            session.conversation.add(item)
    except (ProtocolError, ValidationError, TypeError, KeyError) as exc:
        message = f"the resumption record does not fit this server: {exc}"
        raise ResumeError(ErrorCode.RESUME_INVALID, message) from None
    session.task_events = record.task_events
    session.resume_gen = record.gen + 1
    instructions = session.client_instructions
    budget = prefix_len - 1 - (measure(instructions + "\n") if instructions else 0)  # 1: the INSTR marker
    session.restored_context = _tail(_record_lines(record), budget, measure)


def restore_background(background: SessionBackground, record: ResumeRecord) -> None:
    for entry in record.record:
        role, text, item_id = entry.get("role"), str(entry.get("text", "")), entry.get("item_id")
        if role == "user":
            background.record.add_user_text(text, source=entry.get("source") or "text", item_id=item_id)
        elif role == "model" and entry.get("source") == "model_text" and item_id is not None:
            background.record.add_model_text(text, item_id)
            background.record.end_model_turn()
        elif role in ("model", "system"):
            background.record.add_text(role, text, item_id=item_id)
        elif role == "task":
            background.record.add_task_result(str(entry.get("task_id")), text,
                                              ok=entry.get("source") != "task_error")


def _record_lines(record: ResumeRecord) -> list[str]:
    """Both sides' text (and finished results) oldest first: the background record when there is one, as
    it holds results in order, else the conversation items."""
    if record.record:
        return [f"{ROLE_LABELS.get(e.get('role', ''), 'note')}: {e.get('text', '')}" for e in record.record
                if e.get("text") and e.get("source") != "task_error"]
    lines = []
    for item in record.items:
        text = " ".join(str(part.get("text") or part.get("transcript") or "")
                        for part in item.get("content", []) if isinstance(part, dict)).strip()
        if text and item.get("role") in ("user", "assistant"):
            lines.append(f"{item['role']}: {text}")
    return lines


def _tail(lines: list[str], budget: int, measure: Callable[[str], int]) -> str:
    """The newest text that fits `budget` units: whole lines, then the end of the one that fits in part."""
    kept: list[str] = []
    for line in reversed(lines):
        if measure("\n".join([line, *kept])) <= budget:
            kept.insert(0, line)
            continue
        room = budget - (measure("\n".join(kept)) + 1 if kept else 0)
        low, high = 0, len(line)  # the most trailing characters that fit `room`
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if measure(line[-mid:]) <= room else (low, mid - 1)
        if low:
            kept.insert(0, line[-low:])
        break
    return "\n".join(kept)


@dataclass
class Resumed:
    """What a reconnect's handle gave: its record, the session when it is still held here, and the undo
    that gives the handle back when admission then fails."""

    record: ResumeRecord | None = None
    session: Session | None = None
    undo: Callable[[], None] = lambda: None


async def redeem(resume: Resumption, handle: str, bind: str, live: Iterable[Any]) -> Resumed:
    """Open and spend a handle (ResumeError: refused, nothing spent); the session comes back from the
    parking lot, or from a live connection (`live`) that has not yet noticed its socket died."""
    record = await resume.open(handle, bind)
    undo = resume.replay.redeem(record)
    session = resume.parked.claim(record.sid) or await _take_over(live, record.sid)
    if session is not None and session.failed:  # lost with its engine while parked: rebuilt from the record
        resume.end_parked(session)
        session = None
    return Resumed(record, session, undo)


async def _take_over(live: Iterable[Any], sid: str) -> Session | None:
    """The old connection hands the session over (it is closed with session_resumed_elsewhere)."""
    old = next((c for c in live if c.session.id == sid and c.resumable), None)
    if old is None:
        return None
    try:
        return await asyncio.wait_for(old.hand_over(), TAKE_OVER_TIMEOUT_S)
    except TimeoutError:
        return None


class HandleRotation:
    """The handles of one live resumable session: sealed off the loop, rotated after finished turns."""

    def __init__(self, session: Session, resume: Resumption, bind: str, version: Callable[[], int]) -> None:
        self.session = session
        self.resume = resume
        self.bind = bind
        self._version = version  # bumped by client changes the record key cannot see (config, truncate)
        self.stopped = False  # the drain sent the last handle

    async def seal(self) -> dict[str, Any]:
        """A fresh handle: {handle, expires_at, replica}."""
        iat, exp = self.resume.codec.expiry()
        record = snapshot(self.session, self.bind, self.resume.replica, iat, exp)
        handle = await asyncio.to_thread(self.resume.codec.seal, record)
        return {"handle": handle, "expires_at": int(exp), "replica": self.resume.replica}

    async def update(self, reason: str) -> ev.SessionResumptionUpdate:
        return ev.SessionResumptionUpdate(type=ev.RESUMPTION_UPDATE, reason=reason, **await self.seal())

    def _key(self) -> tuple:
        """Changes whenever a handle sealed now would carry something the last one did not."""
        session = self.session
        entries = session.background.record.items if session.background is not None else []
        last = (entries[-1].item_id, len(entries[-1].text)) if entries else None
        conversation = session.conversation
        return len(conversation), conversation.last_id, len(entries), last, self._version()

    async def run(self) -> None:
        """Send a new handle after each finished turn (nothing being said; a model that speaks on gets one
        every SPEAKING_HANDLE_S) and before the last expires."""
        sent_key, sent_at = self._key(), time.monotonic()
        while not self.stopped:
            await asyncio.sleep(HANDLE_CHECK_S)
            key, age = self._key(), time.monotonic() - sent_at
            finished = self.session.responses.active is None or age >= SPEAKING_HANDLE_S
            if (key != sent_key and finished) or age >= self.resume.refresh_s:
                update = await self.update("turn" if key != sent_key else "refresh")
                if not self.stopped:
                    self.session.send(update)
                sent_key, sent_at = key, time.monotonic()

    async def last(self) -> ev.SessionResumptionUpdate:
        """The drain's handle: no rotation after it."""
        self.stopped = True
        return await self.update("go_away")
