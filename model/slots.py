"""What crosses the engine boundary for one session slot per micro-turn.

The server fills a `SlotInput` per active session each tick and gets a
`SlotOutput` back. Plain numpy/python data only: the server never touches
tensors, and the engine never sees clocks, sockets or protocol events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 16_000  # engine audio rate, in and out
TURN_SAMPLES = 3_200  # 200 ms at 16 kHz: one micro-turn of audio
# |SlotInput.wait_bias_offset| at most, in nats: already far past any logit gap between PAD and the
# model's other text-out choices (holds or takes the turn for certain), yet a finite bound, so a
# client-controlled number cannot push the text logits toward overflow
MAX_WAIT_BIAS_OFFSET = 50.0


@dataclass
class SamplingParams:
    text_temperature: float = 0.8  # 0 = greedy
    text_top_k: int = 50  # 0 = whole vocabulary
    audio_temperature: float = 0.8  # 0 = greedy
    audio_top_k: int = 8  # over the 16 bins of each (frame, channel); 0 = all
    seed: int = 0  # per-session seed: same seed + same inputs = same output bytes
    # turn-taking eagerness: nats added to PAD ("stay silent") on each text-out slot while the model
    # is idle (no text since its last EPAD): > 0 waits longer before taking the turn (fewer
    # takeovers in pauses, later answers), < 0 takes it sooner; 0 = the model as trained
    wait_bias: float = 0.0


@dataclass
class SlotInput:
    audio: np.ndarray  # (TURN_SAMPLES,) float32 in [-1, 1] at 16 kHz; silence if the user sent none
    image: np.ndarray | None = None  # (H, W, 3) uint8 RGB latest camera frame, or None = keep previous
    text_in: list[int] = field(default_factory=list)  # token ids for the text-in slots (source marker incl.)
    text_in_background: bool = False  # True when text_in carries a background result
    # Constrained decoding: these ids replace the first sampled text-out tokens of this micro-turn
    # (at most text_out_slots). Used to script the model (tests, demos) through the real model path.
    force_text_out: list[int] = field(default_factory=list)
    # nats added to this row's wait bias (checkpoint default + SamplingParams.wait_bias) for this
    # micro-turn only, and like it only while the model is idle: a big positive offset holds the turn
    # (push-to-talk), a negative one takes it now (response.create). Per tick, because changing the
    # session's SamplingParams re-joins its slot and restarts the conversation. At most
    # MAX_WAIT_BIAS_OFFSET either way, else the row is refused (silence and an error)
    wait_bias_offset: float = 0.0
    # False = text only: the model still samples this turn's audio tokens (its own context needs them)
    # but they are not vocoded, and SlotOutput.audio is zeros. The row's vocoder stream restarts when
    # audio comes back on (no stale tail of the last voiced turn leaks into the new one)
    audio_out: bool = True


@dataclass
class RowControls:
    """The per-tick controls of a step's B rows, in row order: `SlotTable.pack` gathers them from the
    rows' `SlotInput`s (a refused row gets the defaults), the runner reads them. Fixed-shape numpy, so
    they cross to the engine process in shared memory with the batch (model/step_shm.py)."""

    wait_bias_offset: np.ndarray  # (B,) float32 nats on PAD while idle, this turn only
    audio_out: np.ndarray  # (B,) bool rows whose audio is vocoded (False = zeros out)

    @classmethod
    def defaults(cls, rows: int) -> RowControls:
        """No offset, audio on: what a step without controls runs."""
        return cls(np.zeros(rows, np.float32), np.ones(rows, np.bool_))


@dataclass
class SlotOutput:
    audio: np.ndarray  # (TURN_SAMPLES,) float32 at 16 kHz, after the vocoder (zeros if not audio_out)
    text_tokens: list[int]  # the text-out tokens sampled this micro-turn (PAD included)
    text: str  # printable text decoded from text_tokens (specials and task marker contents dropped)
    task_texts: list[str]  # background tasks the model's TASK_START ... TASK_END markers closed this turn
    turn_index: int  # micro-turns this slot has run since join (0-based)
    error: str | None = None  # set when this slot's row failed this step; others unaffected
    # the text head's greedy ids at this turn's audio-in positions (CTC, PAD = blank): what the model
    # heard the user say, for checkpoints trained with --heard-weight (Engine.hears)
    heard_tokens: list[int] = field(default_factory=list)
