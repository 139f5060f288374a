"""Turn events of one session: the user's voice activity, when it barges in, and what the model heard.

Once per tick, on the event loop, the session calls `voice_activity` with the micro-turn's
input and output audio: at each onset of user speech it sends
`input_audio_buffer.speech_started` (and completes the transcript of the speech before)
and returns True when that onset is a barge-in (barge-in is on and the model was
speaking); the session then moves its epoch. With transcripts on, the session then calls
`transcribe` with the model's heard tokens: their text streams as transcript deltas of
the current speech item, completed once the user is quiet and the model has named
nothing new for `TRANSCRIPT_SETTLE_TURNS`. Levels are compared with the settings' live
thresholds at every call. Events go out through the `send` it is given; this module
knows nothing about epochs, outboxes, sockets or the engine.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..model.tokenizer import CtcStreamDecoder
from . import protocol as p
from .media_input import TURN_MS
from .settings import ServerSettings

SPEECH_HANGOVER_TURNS = 2  # silent input turns before user speech counts as ended
# turns without new transcript bytes, once speech has ended, before a transcript counts as complete:
# the model may name a word up to 400 ms after hearing it (training/heard.py HEARD_LAG_TOKENS)
TRANSCRIPT_SETTLE_TURNS = 3


def level_dbfs(audio: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
    return 20.0 * np.log10(max(rms, 1e-10))


class TurnEvents:
    """Voice activity, barge-in detection and the user's transcript stream of one session."""

    def __init__(self, settings: ServerSettings, send: Callable[[p.ServerEvent], None]) -> None:
        self._settings = settings
        self._send = send
        self.user_speaking = False
        self.model_speaking = False  # this micro-turn's output was above the speaking threshold
        self._silent_turns = 0
        self._heard = CtcStreamDecoder()
        self._user_item: str | None = None  # the speech item of the latest onset
        self._transcript: list[str] = []
        self._transcript_item = ""
        self._heard_quiet = 0

    def voice_activity(self, seq: int, input_audio: np.ndarray, output_audio: np.ndarray) -> bool:
        """Track who speaks in micro-turn `seq`; True when the user just barged in on the model."""
        settings = self._settings
        speech = level_dbfs(input_audio) > settings.vad_threshold_dbfs
        self._silent_turns = 0 if speech else self._silent_turns + 1
        onset = speech and not self.user_speaking
        if speech:
            self.user_speaking = True
        elif self._silent_turns >= SPEECH_HANGOVER_TURNS:
            self.user_speaking = False
        barge_in = False
        if onset:
            self._complete_transcript()
            self._user_item = item = p.new_id("item")
            self._send(p.InputAudioBufferSpeechStarted(audio_start_ms=seq * TURN_MS, item_id=item))
            barge_in = settings.barge_in and self.model_speaking
        self.model_speaking = level_dbfs(output_audio) > settings.speaking_threshold_dbfs
        return barge_in

    def transcribe(self, seq: int, heard_tokens: list[int]) -> None:
        """Stream what the model heard in micro-turn `seq` as transcript deltas of the current speech item."""
        text = self._heard.feed(heard_tokens)
        if text:
            if not self._transcript:
                self._transcript_item = self._user_item or p.new_id("item")
            self._transcript.append(text)
            self._heard_quiet = 0
            self._send(p.InputAudioTranscriptionDelta(item_id=self._transcript_item, delta=text, seq=seq))
            return
        self._heard_quiet += 1
        if not self.user_speaking and self._heard_quiet >= TRANSCRIPT_SETTLE_TURNS:
            self._complete_transcript()

    def _complete_transcript(self) -> None:
        if self._transcript:
            transcript = "".join(self._transcript).strip()
            item = self._transcript_item
            self._send(p.InputAudioTranscriptionCompleted(item_id=item, transcript=transcript))
            self._transcript = []
