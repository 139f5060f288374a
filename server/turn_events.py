"""The user's side of a session: voice activity, barge-in, user speech items and their transcripts.

Once per tick, on the event loop, the session calls `voice_activity` with the micro-turn's
input and output audio. With turn detection on (`vad`), an onset of user speech sends
`input_audio_buffer.speech_started` (a new user item) and returns True when it is a
barge-in (barge-in is on and the model spoke within the last `MODEL_HANGOVER_TURNS` turns);
the end of that speech (`SPEECH_HANGOVER_TURNS` quiet turns, or the model taking the turn
first: `end_turn`) sends `speech_stopped`, `input_audio_buffer.committed` and the user item
(`conversation.item.added` / `.done`). With turn detection off (push to
talk) there are no VAD events: the client's `input_audio_buffer.commit` makes the item
(`commit`). With transcripts on, `transcribe` takes the model's heard tokens: their text
becomes `conversation.item.input_audio_transcription.delta` events of the current item
(held back until the item is committed, so no delta names an item the client was not
told of), then one `.completed` (with `usage`) once the user is quiet and the model has
named nothing new for `TRANSCRIPT_SETTLE_TURNS`; nothing is sent for an item after its
`.completed`. Levels are compared with the settings' live thresholds at every call.
Events go out through `send`; items are added to the session's `Conversation`; finished
transcripts go to `on_transcript` (the background's record). This module knows nothing
about epochs, outboxes, sockets or the engine.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..model.tokenizer import CtcStreamDecoder
from . import server_events as ev
from .conversation import Conversation
from .media_input import TURN_MS
from .protocol import new_id
from .settings import ServerSettings

SPEECH_HANGOVER_TURNS = 2  # silent input turns before user speech counts as ended
# quiet output turns a reply may pause for (between words, before its end) and still be talked over:
# speech that starts in such a gap is a barge-in, or the reply would go on over the user
MODEL_HANGOVER_TURNS = 2
# turns without new transcript bytes, once speech has ended, before a transcript counts as complete:
# the model may name a word up to 400 ms after hearing it (training/heard.py HEARD_LAG_TOKENS)
TRANSCRIPT_SETTLE_TURNS = 3


def level_dbfs(audio: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
    return 20.0 * np.log10(max(rms, 1e-10))


class TurnEvents:
    """Voice activity, barge-in detection and the user's speech items of one session."""

    def __init__(
        self,
        settings: ServerSettings,
        send: Callable[[ev.ServerEvent], None],
        conversation: Conversation,
        on_transcript: Callable[[str, str], None] | None = None,
    ) -> None:
        self._settings = settings
        self._send = send
        self._conversation = conversation
        self.on_transcript = on_transcript  # (item_id, transcript) of each completed transcript
        self.vad = True  # turn detection on: speech onsets and ends make the user's items
        self.user_speaking = False
        self.model_speaking = False  # this micro-turn's output was above the speaking threshold
        self._model_quiet_turns = MODEL_HANGOVER_TURNS  # output turns since the model last spoke
        self._silent_turns = 0
        self._heard = CtcStreamDecoder()
        self._item: str | None = None  # the user item being spoken or transcribed
        self._committed = False  # the client was told of `_item`
        self._speech_start_ms = 0
        self._speech_ms = 0
        self._text: list[str] = []  # transcript of `_item` so far
        self._unsent: list[str] = []  # transcript text held back until `_item` is committed
        self._heard_quiet = 0
        self._talk_start_ms: int | None = None  # push to talk: the first speech since the last commit

    def voice_activity(self, seq: int, input_audio: np.ndarray, output_audio: np.ndarray) -> bool:
        """Track who speaks in micro-turn `seq`; True when the user just barged in on the model."""
        settings = self._settings
        speech = level_dbfs(input_audio) > settings.vad_threshold_dbfs
        self._silent_turns = 0 if speech else self._silent_turns + 1
        onset = speech and not self.user_speaking
        ended = False
        if speech:
            self.user_speaking = True
        elif self.user_speaking and self._silent_turns >= SPEECH_HANGOVER_TURNS:
            self.user_speaking, ended = False, True
        barge_in = False
        if not self.vad and onset and self._talk_start_ms is None:
            self._talk_start_ms = seq * TURN_MS
        if self.vad and onset:
            self._complete_transcript()
            self._item, self._committed = new_id("item"), False
            self._speech_start_ms = seq * TURN_MS
            self._send(ev.InputAudioBufferSpeechStarted(audio_start_ms=self._speech_start_ms,
                                                        item_id=self._item))
            barge_in = settings.barge_in and self._model_quiet_turns < MODEL_HANGOVER_TURNS
        if self.vad and ended and self._item is not None and not self._committed:
            end_ms = (seq - SPEECH_HANGOVER_TURNS + 1) * TURN_MS
            self._speech_ms = max(end_ms - self._speech_start_ms, 0)
            self._send(ev.InputAudioBufferSpeechStopped(audio_end_ms=end_ms, item_id=self._item))
            self._commit_item()
        self.model_speaking = level_dbfs(output_audio) > settings.speaking_threshold_dbfs
        self._model_quiet_turns = 0 if self.model_speaking else self._model_quiet_turns + 1
        return barge_in

    def commit(self, seq: int) -> str | None:
        """The client's input_audio_buffer.commit: the speech so far becomes an item (its id), or None when
        turn detection is on and no speech item is open (its items come from speech onsets)."""
        if self._committed:
            self._complete_transcript()
        if self._item is None:
            if self.vad:
                return None
            self._item = new_id("item")
            self._speech_start_ms = self._talk_start_ms if self._talk_start_ms is not None else seq * TURN_MS
        self._talk_start_ms = None
        self._speech_ms = max(seq * TURN_MS - self._speech_start_ms, 0)
        self._commit_item()
        return self._item

    def end_turn(self, seq: int) -> None:
        """The model takes the turn in micro-turn `seq`: a user item still being spoken is committed now
        (`speech_stopped` at `seq`), so it comes before the model's reply, as OpenAI clients order history;
        what the user still says of it goes on streaming as its transcript."""
        if self.vad and self._item is not None and not self._committed:
            end_ms = seq * TURN_MS
            self._speech_ms = max(end_ms - self._speech_start_ms, 0)
            self._send(ev.InputAudioBufferSpeechStopped(audio_end_ms=end_ms, item_id=self._item))
            self._commit_item()

    def transcribe(self, seq: int, heard_tokens: list[int]) -> None:
        """What the model heard in micro-turn `seq`, as transcript deltas of the current user item."""
        text = self._heard.feed(heard_tokens)
        if text:
            self._heard_quiet = 0
            if self._item is None and self.vad:
                return  # heard with no speech onset (below the VAD threshold): no item to give it to
            self._text.append(text)
            if self._committed:
                self._send(ev.InputAudioTranscriptionDelta(item_id=self._item, delta=text, seq=seq))
            else:
                self._unsent.append(text)
            return
        self._heard_quiet += 1
        if self._committed and not self.user_speaking and self._heard_quiet >= TRANSCRIPT_SETTLE_TURNS:
            self._complete_transcript()

    def _commit_item(self) -> None:
        item_id = self._item
        assert item_id is not None
        self._committed = True
        item = ev.user_audio_item(item_id, None)
        before = self._conversation.add(dict(item, content=[dict(item["content"][0])]))
        self._send(ev.InputAudioBufferCommitted(item_id=item_id, previous_item_id=before))
        self._send(ev.ConversationItemAdded(item=item, previous_item_id=before))
        self._send(ev.ConversationItemDone(item=item, previous_item_id=before))
        if self._unsent:
            self._send(ev.InputAudioTranscriptionDelta(item_id=item_id, delta="".join(self._unsent),
                                                       seq=self._speech_start_ms // TURN_MS))
            self._unsent = []

    def _complete_transcript(self) -> None:
        """Send the current item's one `.completed` (when it was committed) and close it."""
        item_id = self._item
        if item_id is None or not self._committed:
            return
        transcript = "".join(self._text).strip()
        usage = {"type": "duration", "seconds": round(self._speech_ms / 1000, 3)}
        self._send(ev.InputAudioTranscriptionCompleted(item_id=item_id, transcript=transcript, usage=usage))
        live = self._conversation.live(item_id)
        if live is not None:
            live["content"][0]["transcript"] = transcript
        if self.on_transcript is not None and transcript:
            self.on_transcript(item_id, transcript)
        self._item, self._committed, self._text = None, False, []
