"""A duplex model's output as OpenAI Realtime responses: the one place that maps one onto the other.

The interaction model decides for itself when to speak; OpenAI clients expect responses.
The mapping (README "Responses"):

- one utterance is one response. It opens at the first micro-turn with printable text-out
  or speech after the model was quiet, and ends `completed` once the model closed its
  text span (EPAD) and its speech went quiet for `END_QUIET_TURNS` (text-only sessions:
  at EPAD), or after `SILENCE_END_TURNS` of neither text nor speech. A barge-in or
  `response.cancel` ends it `cancelled`, `max_output_tokens` ends it `incomplete`; in both
  the utterance is stopped (`stop_requested`: the session forces EPAD into the model's
  text-out, which is how the model was trained to be cut off) and what the model still
  says of it is not sent (`muted` until it is quiet).
- events, in order: `response.created` -> `response.output_item.added` and
  `conversation.item.added` (assistant message) -> `response.content_part.added` ->
  per micro-turn `response.output_audio.delta` + `response.output_audio_transcript.delta`
  (audio sessions) or `response.output_text.delta` (text-only) -> `.done` of each ->
  `response.content_part.done` -> `response.output_item.done` -> `conversation.item.done`
  -> `response.done` (with `usage`). Output audio outside a response is not sent here.
- `response.create` (`request`) asks the model to speak now: while it is pending, the
  model's wait bias is lowered (`RESPONSE_CREATE_WAIT_BIAS`), and the next response
  carries its `metadata`. Asked while one is active, it waits for the next utterance.
  Unanswered for `RESPONSE_CREATE_TIMEOUT_TURNS` it ends `failed` with no output.
- `turn_detection: null` is push to talk: while no `response.create` is pending the model
  is held quiet (`PUSH_TO_TALK_WAIT_BIAS`).
- a client function call chosen by the background model is a `function_call` output item
  (added, arguments delta and done, item done): a second output of the active utterance's
  response, or, while the model is quiet, a response of its own.
- `truncate` cuts an assistant item to the audio the client played: the transcript keeps
  the characters the model's speaking rate (`speech_chars_per_s`, measured on this
  session's finished responses; `DEFAULT_SPEECH_CHARS_PER_S` before any) reaches by
  `audio_end_ms`, at a word boundary.

Events go out through `send`; audio deltas through `send_audio` (the session's bounded,
epoch-tagged outbox). Everything runs on the event loop. This module knows nothing about
sockets, tensors or the engine's internals.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from . import server_events as ev
from .conversation import MAX_ITEMS, Conversation
from .errors import ErrorCode, ProtocolError
from .protocol import new_id

TURN_MS = 200  # one micro-turn
END_QUIET_TURNS = 2  # quiet speech after the text span closed before the response counts as done
SILENCE_END_TURNS = 5  # neither text nor speech for this long ends a response whatever the text said
RESPONSE_CREATE_WAIT_BIAS = -6.0  # nats on "stay silent" while a response.create waits: speak now
PUSH_TO_TALK_WAIT_BIAS = 40.0  # nats on "stay silent" in push-to-talk: the model never takes the turn itself
RESPONSE_CREATE_TIMEOUT_TURNS = 40  # 8 s: a response.create the model does not answer ends failed
MAX_PENDING_CREATES = 4  # response.create asks waiting at once; more are refused
DEFAULT_SPEECH_CHARS_PER_S = 14.0  # transcript characters per second of speech before one was measured
MIN_RATE_SPEECH_MS = 600  # a response shorter than this does not update the measured speaking rate

Modality = Literal["audio", "text"]
Status = Literal["completed", "cancelled", "incomplete", "failed"]


@dataclass
class _Pending:
    metadata: dict[str, str] | None
    client_event_id: str | None
    waited_turns: int = 0


@dataclass
class _Response:
    id: str
    item_id: str
    modality: Modality
    metadata: dict[str, str] | None
    max_output_tokens: int | None
    text: list[str] = field(default_factory=list)
    turns: int = 0
    speech_turns: int = 0
    quiet_turns: int = 0
    text_done: bool = False
    text_tokens: int = 0
    text_in_tokens: int = 0
    calls: list[dict] = field(default_factory=list)  # function_call items, outputs 1.. of this response


@dataclass
class _Spoken:
    """What truncate needs of a finished assistant item."""

    audio_ms: int  # audio the client was sent for it
    modality: Modality


class Responses:
    """The response lifecycle of one session."""

    def __init__(
        self,
        send: Callable[[ev.ServerEvent], None],
        send_audio: Callable[[ev.ServerEvent], None],
        conversation: Conversation,
        audio_tokens_per_turn: int,
        output_rate: Callable[[], int],
    ) -> None:
        self._send = send
        self._send_audio = send_audio
        self._conversation = conversation
        self._audio_tokens = audio_tokens_per_turn
        self._output_rate = output_rate
        # config (session.update)
        self.modality: Modality = "audio"
        self.max_output_tokens: int | None = None
        self.push_to_talk = False
        # state
        self.active: _Response | None = None
        self.muted = False  # an utterance was cut off: what the model still says of it is not sent
        self.stop_requested = False  # the session forces EPAD into text-out next tick, then clears this
        self._pending: deque[_Pending] = deque()
        self._spoken: OrderedDict[str, _Spoken] = OrderedDict()  # as many as the conversation keeps items
        self._speech_chars = 0
        self._speech_ms = 0
        self.on_item_text: Callable[[str, str], None] | None = None  # (item_id, final text): the record
        # (seq): a response is about to open: the user's turn, as far as the model is concerned, is over
        self.on_open: Callable[[int], None] | None = None

    # --- per tick ---
    def wait_bias_offset(self, reading: bool) -> float:
        """Nats on the model's "stay silent" this tick: a pending response.create once the model has read
        the user's queued text (`reading`: some is still waiting for text-in), else push to talk."""
        if self._pending and not reading:
            return RESPONSE_CREATE_WAIT_BIAS
        return PUSH_TO_TALK_WAIT_BIAS if self.push_to_talk else 0.0

    def on_turn(
        self,
        seq: int,
        text: str,
        text_tokens: int,
        end_of_text: bool,
        speaking: bool,
        text_in_tokens: int,
        audio: Callable[[], str] | None,
    ) -> str | None:
        """One micro-turn of the model's output: `text` (printable, `text_tokens` of it), whether its text
        span closed (EPAD), whether it speaks; `audio` encodes the turn's audio delta (None: not sent as
        JSON). Returns the item id the turn's text belongs to (None: outside any response)."""
        if self.muted:
            if not text and not speaking:
                self.muted = False
            else:
                return None
        r = self.active
        if r is None:
            self._age_pending()
            if not text and not speaking:
                return None
            if self.on_open is not None:
                self.on_open(seq)
            r = self._open()
        r.turns += 1
        r.speech_turns += speaking
        r.text_in_tokens += text_in_tokens
        part = {"response_id": r.id, "item_id": r.item_id}
        if audio is not None and r.modality == "audio":
            self._send_audio(ev.OutputAudioDelta(delta=audio(), seq=seq, pts_ms=seq * TURN_MS, **part))
        if text:
            r.text.append(text)
            r.text_tokens += text_tokens
            if r.modality == "audio":
                self._send(ev.OutputAudioTranscriptDelta(delta=text, seq=seq, **part))
            else:
                self._send(ev.OutputTextDelta(delta=text, seq=seq, **part))
        r.text_done = r.text_done or end_of_text
        r.quiet_turns = 0 if (text or speaking) else r.quiet_turns + 1
        item_id = r.item_id
        if r.max_output_tokens is not None and self._output_tokens(r) >= r.max_output_tokens:
            self._finish("incomplete", {"type": "incomplete", "reason": "max_output_tokens"})
            self._stop()
        elif r.text_done and (r.modality == "text" or r.quiet_turns >= END_QUIET_TURNS):
            self._finish("completed")
        elif r.quiet_turns >= SILENCE_END_TURNS:
            self._finish("completed")
        return item_id

    # --- client asks ---
    def request(self, metadata: dict[str, str] | None, event_id: str | None) -> None:
        """`response.create`: the model is asked to speak (now, or after the active utterance)."""
        if len(self._pending) >= MAX_PENDING_CREATES:
            message = f"{MAX_PENDING_CREATES} response.create asks are already waiting for the model"
            raise ProtocolError(ErrorCode.RESPONSE_ALREADY_ACTIVE, message, event_id)
        self._pending.append(_Pending(metadata, event_id))

    def cancel(self, reason: str) -> str | None:
        """Stop the active utterance (barge-in: "turn_detected", response.cancel: "client_cancelled"); the
        id of the response cancelled, or None when none was active."""
        if self.active is None:
            return None
        response_id = self.active.id
        self._finish("cancelled", {"type": "cancelled", "reason": reason})
        self._stop()
        return response_id

    def function_call(self, name: str, arguments: dict[str, Any], task_id: str | None = None) -> str:
        """A client tool call the background model made (in task `task_id`), sent at once; its call_id."""
        call_id = new_id("call")
        r = self.active
        if r is not None:
            index = 1 + len(r.calls)
            r.calls.append(self._call_item(r.id, index, call_id, name, json.dumps(arguments), task_id))
            return call_id
        r = _Response(new_id("resp"), new_id("item"), self.modality, None, None)
        self._send(ev.ResponseCreated(response=self._response_dict(r, "in_progress")))
        done = self._call_item(r.id, 0, call_id, name, json.dumps(arguments), task_id)
        self._send(ev.ResponseDone(response=self._response_dict(r, "completed", [done])))
        return call_id

    def truncate(self, item_id: str, content_index: int, audio_end_ms: int, event_id: str | None) -> str:
        """Cut an assistant item's transcript to what `audio_end_ms` of its audio said; the text kept."""
        item = self._conversation.live(item_id)
        if item is None:
            raise ProtocolError(ErrorCode.ITEM_NOT_FOUND, f"item {item_id!r} is not in the conversation",
                                event_id, "item_id")
        spoken = self._spoken.get(item_id)
        if item.get("role") != "assistant" or spoken is None or spoken.modality != "audio":
            message = "only an assistant audio item that has finished can be truncated"
            raise ProtocolError(ErrorCode.INVALID_EVENT, message, event_id, "item_id")
        if content_index != 0:
            raise ProtocolError(ErrorCode.INVALID_EVENT, "the item has one content part (0)", event_id,
                                "content_index")
        if audio_end_ms < 0:
            message = "audio_end_ms must be >= 0"
            raise ProtocolError(ErrorCode.INVALID_EVENT, message, event_id, "audio_end_ms")
        end_ms = min(audio_end_ms, spoken.audio_ms)
        text = item["content"][0].get("transcript") or ""
        kept = cut_at_word(text, round(self.speech_chars_per_s * end_ms / 1000))
        item["content"][0]["transcript"] = kept
        spoken.audio_ms = end_ms
        self._send(ev.ConversationItemTruncated(item_id=item_id, content_index=0, audio_end_ms=end_ms))
        return kept

    @property
    def speech_chars_per_s(self) -> float:
        if self._speech_ms < MIN_RATE_SPEECH_MS:
            return DEFAULT_SPEECH_CHARS_PER_S
        return 1000.0 * self._speech_chars / self._speech_ms

    # --- lifecycle ---
    def _open(self) -> _Response:
        pending = self._pending.popleft() if self._pending else None
        metadata = dict(pending.metadata or {}) if pending else None
        if pending and pending.client_event_id and metadata is not None:
            metadata.setdefault("client_event_id", pending.client_event_id)
        r = _Response(new_id("resp"), new_id("item"), self.modality, metadata, self.max_output_tokens)
        self.active = r
        self._send(ev.ResponseCreated(response=self._response_dict(r, "in_progress")))
        item = ev.assistant_item(r.item_id, "in_progress", r.modality, "")
        self._send(ev.ResponseOutputItemAdded(response_id=r.id, item=item))
        before = self._conversation.add(dict(item))
        self._send(ev.ConversationItemAdded(item=item, previous_item_id=before))
        self._send(ev.ResponseContentPartAdded(response_id=r.id, item_id=r.item_id,
                                               part=ev.content_part(r.modality, "")))
        return r

    def _finish(self, status: Status, details: dict | None = None) -> None:
        r = self.active
        assert r is not None
        self.active = None
        text = "".join(r.text)
        part = {"response_id": r.id, "item_id": r.item_id}
        if r.modality == "audio":
            self._send(ev.OutputAudioDone(**part))
            self._send(ev.OutputAudioTranscriptDone(transcript=text, **part))
        else:
            self._send(ev.OutputTextDone(text=text, **part))
        self._send(ev.ResponseContentPartDone(part=ev.content_part(r.modality, text), **part))
        item_status = "completed" if status == "completed" else "incomplete"
        item = ev.assistant_item(r.item_id, item_status, r.modality, text)
        self._send(ev.ResponseOutputItemDone(response_id=r.id, item=item))
        live = self._conversation.live(r.item_id)
        if live is not None:
            live.update(item)
        self._send(ev.ConversationItemDone(item=item))
        self._spoken[r.item_id] = _Spoken(r.turns * TURN_MS, r.modality)
        while len(self._spoken) > MAX_ITEMS:
            self._spoken.popitem(last=False)
        if status == "completed" and r.text_done and r.speech_turns * TURN_MS >= MIN_RATE_SPEECH_MS:
            self._speech_chars += len(text)
            self._speech_ms += r.speech_turns * TURN_MS
        self._send(ev.ResponseDone(response=self._response_dict(r, status, [item, *r.calls], details)))
        if self.on_item_text is not None:
            self.on_item_text(r.item_id, text)

    def _stop(self) -> None:
        self.muted = True
        self.stop_requested = True

    def _age_pending(self) -> None:
        """A response.create the model leaves unanswered ends as a failed response with no output."""
        if not self._pending:
            return
        head = self._pending[0]
        head.waited_turns += 1
        if head.waited_turns < RESPONSE_CREATE_TIMEOUT_TURNS:
            return
        self._pending.popleft()
        metadata = dict(head.metadata or {}) if head.metadata is not None else None
        if head.client_event_id and metadata is not None:
            metadata.setdefault("client_event_id", head.client_event_id)
        r = _Response(new_id("resp"), new_id("item"), self.modality, metadata, self.max_output_tokens)
        error = {"type": "server_error", "code": "no_output",
                 "message": f"the model did not speak within {RESPONSE_CREATE_TIMEOUT_TURNS * TURN_MS} ms"}
        self._send(ev.ResponseCreated(response=self._response_dict(r, "in_progress")))
        self._send(ev.ResponseDone(response=self._response_dict(r, "failed", [], {"type": "failed",
                                                                               "error": error})))

    def _call_item(self, response_id: str, index: int, call_id: str, name: str, arguments: str,
                   task_id: str | None) -> dict:
        """Send one function_call output item of `response_id`, whole; the item as done."""
        item_id = new_id("item")
        item = ev.function_call_item(item_id, call_id, name, "", "in_progress")
        self._send(ev.ResponseOutputItemAdded(response_id=response_id, output_index=index, item=item))
        before = self._conversation.add(dict(item))
        self._send(ev.ConversationItemAdded(item=item, previous_item_id=before))
        ids = {"response_id": response_id, "item_id": item_id, "output_index": index, "call_id": call_id}
        self._send(ev.FunctionCallArgumentsDelta(delta=arguments, **ids))
        self._send(ev.FunctionCallArgumentsDone(name=name, arguments=arguments, task_id=task_id, **ids))
        done = ev.function_call_item(item_id, call_id, name, arguments, "completed")
        self._send(ev.ResponseOutputItemDone(response_id=response_id, output_index=index, item=done))
        live = self._conversation.live(item_id)
        if live is not None:
            live.update(done)
        self._send(ev.ConversationItemDone(item=done, previous_item_id=before))
        return done

    def _output_tokens(self, r: _Response) -> int:
        return r.text_tokens + (r.turns * self._audio_tokens if r.modality == "audio" else 0)

    def _response_dict(self, r: _Response, status: str, output: list[dict] | None = None,
                       details: dict | None = None) -> dict:
        usage = None if status == "in_progress" else self._usage(r)
        max_tokens: int | str = r.max_output_tokens if r.max_output_tokens is not None else "inf"
        return ev.response_dict(r.id, status, modalities=[r.modality], output=output, metadata=r.metadata,
                                usage=usage, status_details=details, output_rate=self._output_rate(),
                                max_output_tokens=max_tokens)

    def _usage(self, r: _Response) -> dict:
        """Token counts of the response's micro-turns: audio in and out at the model's positions per turn,
        text in (typed text and background results read meanwhile) and text out (printable tokens)."""
        audio_in = r.turns * self._audio_tokens
        audio_out = r.turns * self._audio_tokens if r.modality == "audio" else 0
        inputs, outputs = audio_in + r.text_in_tokens, audio_out + r.text_tokens
        return {
            "total_tokens": inputs + outputs,
            "input_tokens": inputs,
            "output_tokens": outputs,
            "input_token_details": {"text_tokens": r.text_in_tokens, "audio_tokens": audio_in,
                                    "cached_tokens": 0, "image_tokens": 0},
            "output_token_details": {"text_tokens": r.text_tokens, "audio_tokens": audio_out},
        }


def cut_at_word(text: str, chars: int) -> str:
    """`text` cut to at most `chars` characters, back to the last word boundary when the cut splits one."""
    if chars >= len(text):
        return text
    if chars <= 0:
        return ""
    cut = text[:chars]
    if not text[chars].isspace() and " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip()
