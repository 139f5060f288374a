"""The duplex-to-OpenAI response mapping (server/responses.py), turn by turn, without a server."""

from __future__ import annotations

import pytest

from microturn.server import responses as r
from microturn.server.conversation import Conversation
from microturn.server.errors import ProtocolError


class Wire:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.conversation = Conversation()
        self.responses = r.Responses(self._send, self._send, self.conversation, 4, lambda: 24_000)

    def _send(self, event) -> None:
        self.events.append(event.model_dump(mode="json"))

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def turn(self, text: str = "", speaking: bool = False, end: bool = False, seq: int = 0) -> str | None:
        return self.responses.on_turn(seq, text, len(text.encode()), end, speaking, 0, lambda: "AAAA")


LIFECYCLE = ["response.created", "response.output_item.added", "conversation.item.added",
             "response.content_part.added"]
DONE_AUDIO = ["response.output_audio.done", "response.output_audio_transcript.done",
              "response.content_part.done", "response.output_item.done", "conversation.item.done",
              "response.done"]


def test_one_utterance_is_one_response_in_the_ga_order():
    w = Wire()
    assert w.turn() is None and w.events == []  # quiet: nothing, not even audio
    item = w.turn("hello", speaking=True)
    w.turn(" there.", speaking=True, end=True)
    w.turn(speaking=True)  # the voice goes on after the text span closed
    w.turn()
    assert w.responses.active is not None
    w.turn()  # END_QUIET_TURNS of quiet speech after EPAD: done
    assert w.responses.active is None
    types = [t for t in w.types() if t != "response.output_audio.delta"]
    assert types == LIFECYCLE + ["response.output_audio_transcript.delta"] * 2 + DONE_AUDIO
    assert w.types().count("response.output_audio.delta") == 5
    done = w.events[-1]["response"]
    assert done["status"] == "completed" and done["output"][0]["id"] == item
    assert done["output"][0]["content"] == [{"type": "output_audio", "transcript": "hello there."}]
    assert done["usage"]["output_token_details"] == {"text_tokens": 12, "audio_tokens": 20}
    assert "response.output_text.delta" not in w.types()  # never both text and transcript
    assert w.conversation.get(item)["status"] == "completed"


def test_the_next_utterance_is_a_new_response_and_text_only_sessions_send_text():
    w = Wire()
    w.responses.modality = "text"
    w.turn("a.", end=True)
    w.turn("b.", end=True)
    created = [e["response"]["id"] for e in w.events if e["type"] == "response.created"]
    assert len(created) == 2 and len(set(created)) == 2
    assert "response.output_audio.delta" not in w.types()
    assert w.types().count("response.output_text.delta") == 2
    assert w.events[-1]["response"]["output"][0]["content"] == [{"type": "output_text", "text": "b."}]


def test_cancel_ends_cancelled_stops_the_model_and_mutes_the_rest():
    w = Wire()
    w.turn("a long answer", speaking=True)
    assert w.responses.cancel("turn_detected") is not None
    assert w.responses.stop_requested and w.responses.muted
    done = w.events[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected"
    n = len(w.events)
    assert w.turn(" still talking", speaking=True) is None and len(w.events) == n  # muted
    w.turn()  # quiet: unmuted
    w.turn("next.", end=True, speaking=True)
    assert w.events[n]["type"] == "response.created"
    assert w.responses.cancel("client_cancelled") is not None
    assert w.responses.cancel("client_cancelled") is None  # nothing active: no-op


def test_response_create_lowers_the_wait_bias_echoes_metadata_and_times_out_failed():
    w = Wire()
    assert w.responses.wait_bias_offset(False) == 0.0
    w.responses.request({"client_event_id": "x"}, "e1")
    assert w.responses.wait_bias_offset(True) == 0.0  # still reading the user's text
    assert w.responses.wait_bias_offset(False) == r.RESPONSE_CREATE_WAIT_BIAS
    w.turn("ok.", end=True)
    assert w.events[0]["response"]["metadata"] == {"client_event_id": "x"}
    assert w.responses.wait_bias_offset(False) == 0.0
    w.turn()
    w.turn()  # the "ok." response is done
    w.responses.request(None, "e2")
    for _ in range(r.RESPONSE_CREATE_TIMEOUT_TURNS):
        w.turn()
    assert w.events[-1]["type"] == "response.done" and w.events[-1]["response"]["status"] == "failed"
    for _ in range(r.MAX_PENDING_CREATES):
        w.responses.request(None, None)
    with pytest.raises(ProtocolError):
        w.responses.request(None, None)


def test_push_to_talk_holds_the_model_until_asked():
    w = Wire()
    w.responses.push_to_talk = True
    assert w.responses.wait_bias_offset(False) == r.PUSH_TO_TALK_WAIT_BIAS
    w.responses.request(None, None)
    assert w.responses.wait_bias_offset(False) == r.RESPONSE_CREATE_WAIT_BIAS


def test_max_output_tokens_ends_incomplete_and_stops_the_model():
    w = Wire()
    w.responses.max_output_tokens = 10
    w.turn("abcdef", speaking=True)  # 6 text + 4 audio tokens
    done = w.events[-1]["response"]
    assert done["status"] == "incomplete" and done["status_details"]["reason"] == "max_output_tokens"
    assert w.responses.stop_requested


def test_truncate_keeps_what_was_spoken_by_then_at_a_word_boundary():
    w = Wire()
    text = "one two three four five six seven eight nine ten."
    item = w.turn(text[:20], speaking=True)
    w.turn(text[20:], speaking=True, end=True)
    for _ in range(10):
        w.turn(speaking=True)
    w.turn()
    w.turn()
    assert w.responses.active is None
    # 12 speaking turns = 2.4 s for 50 characters: the measured rate replaces the default
    assert w.responses.speech_chars_per_s == pytest.approx(len(text) / 2.4)
    kept = w.responses.truncate(item, 0, 1000, None)
    assert text.startswith(kept) and kept == r.cut_at_word(text, round(len(text) / 2.4))
    assert not kept.endswith(" ") and text[len(kept)] == " "
    assert w.conversation.get(item)["content"][0]["transcript"] == kept
    assert w.events[-1] == {**w.events[-1], "type": "conversation.item.truncated", "audio_end_ms": 1000}
    w.responses.truncate(item, 0, 10**9, None)  # clamped to the audio sent
    assert w.events[-1]["audio_end_ms"] == 1000
    for bad in (("item_nope", 0, 0), (item, 1, 0)):
        with pytest.raises(ProtocolError):
            w.responses.truncate(*bad, "e")


def test_a_function_call_joins_the_active_response_or_makes_its_own():
    w = Wire()
    call = w.responses.function_call("get_weather", {"city": "Paris"})
    types = w.types()
    assert types[0] == "response.created" and types[-1] == "response.done"
    assert "response.function_call_arguments.done" in types
    item = w.events[-1]["response"]["output"][0]
    assert item["type"] == "function_call" and item["call_id"] == call and item["status"] == "completed"
    w.events.clear()
    w.turn("one moment.", speaking=True)
    w.responses.function_call("get_weather", {"city": "Rome"})
    added = [e for e in w.events if e["type"] == "response.output_item.added"]
    assert [a["output_index"] for a in added] == [0, 1]
    w.turn(end=True)
    for _ in range(3):
        w.turn()
    outputs = w.events[-1]["response"]["output"]
    assert [o["type"] for o in outputs] == ["message", "function_call"]


def test_push_to_talk_with_low_eagerness_stays_within_what_the_engine_takes():
    from microturn.model.slots import MAX_WAIT_BIAS_OFFSET
    from microturn.model.tokenizer import ByteTokenizer
    from microturn.server import protocol as p
    from microturn.server.session import Session
    from microturn.server.session_config import apply_session_config
    from microturn.server.settings import ServerSettings

    session = Session(ServerSettings(), ByteTokenizer(), 4, 4, on_overflow=lambda: None)
    for cfg in ({"audio": {"input": {"turn_detection": {"eagerness": "low"}}}},
                {"audio": {"input": {"turn_detection": None}}}):
        apply_session_config(session, p.SessionConfig.model_validate(cfg), None)
    assert session.turn_detection is None and session.eagerness == "low"
    inp, _ = session.take_input(0.0)
    assert 0 < inp.wait_bias_offset <= MAX_WAIT_BIAS_OFFSET
