"""Griffin-Lim vocoder on espeak-ng speech: dMel round trip, streaming vs offline, batching
and per-slot reset.

Error metric (dB): 20 * |log10 mel difference| averaged over channels and frames, both
sides clamped to the dMel range [-7, 2]. Frames whose whole 1024-sample analysis span is
digital silence in the input (below one PCM16 step; espeak-ng's pauses plus the
resampler's ringing into them) are skipped: the log metric would weigh Griffin-Lim's
inaudible leakage at -100 dBFS into them like audible errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from microturn.model.dmel import DMel
from microturn.model.vocoder import GriffinLimVocoder, Vocoder

CHUNK, FRAMES = 3200, 16
SILENCE = 2.0**-15  # one PCM16 step
ROUND_TRIP_DB = 4.5  # measured ~3.4 offline, ~3.5 streaming
STREAM_VS_OFFLINE_DB = 0.5  # measured ~0.4


@pytest.fixture(scope="module")
def dmel() -> DMel:
    return DMel()


@pytest.fixture(scope="module")
def vocoder() -> GriffinLimVocoder:
    return GriffinLimVocoder()


@pytest.fixture(scope="module")
def speech(speech_16k: np.ndarray) -> torch.Tensor:
    n = len(speech_16k) // CHUNK * CHUNK
    return torch.from_numpy(speech_16k[:n].copy())[None]


def _voiced_frames(dmel: DMel, wave: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(wave.abs(), (dmel.cfg.context, 0))
    return padded.unfold(-1, dmel.cfg.n_fft, dmel.cfg.hop).amax(-1) >= SILENCE


def _mel_db(dmel: DMel, a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> float:
    t = min(a.shape[1], b.shape[1], keep.shape[1])
    diff = (a[:, :t].clamp(-7, 2) - b[:, :t].clamp(-7, 2)).abs().mean(-1) * 20
    return diff[keep[:, :t]].mean().item()


def _stream(vocoder: Vocoder, logmel: torch.Tensor) -> torch.Tensor:
    state = vocoder.init_state(logmel.shape[0])
    return torch.cat([vocoder.decode_chunk(c, state) for c in logmel.split(FRAMES, dim=1)], dim=-1)


def test_shapes(vocoder: GriffinLimVocoder) -> None:
    logmel = torch.full((3, FRAMES, 80), -3.0)
    state = vocoder.init_state(3)
    out = vocoder.decode_chunk(logmel, state)
    assert out.shape == (3, CHUNK) and out.dtype == torch.float32
    assert vocoder.vocode(torch.full((2, 40, 80), -3.0)).shape == (2, 40 * 200)
    with pytest.raises(ValueError):
        vocoder.decode_chunk(logmel[:, :15], state)


def test_round_trip_offline_and_streaming(
    dmel: DMel, vocoder: GriffinLimVocoder, speech: torch.Tensor
) -> None:
    target = dmel.decode(dmel.encode(speech))
    keep = _voiced_frames(dmel, speech)
    offline = vocoder.vocode(target)
    assert offline.shape == speech.shape
    offline_db = _mel_db(dmel, dmel.logmel(offline), target, keep)
    assert offline_db <= ROUND_TRIP_DB, offline_db

    lag = vocoder.latency_samples
    assert lag % dmel.cfg.hop == 0
    streamed = _stream(vocoder, target)
    assert streamed.shape == speech.shape
    assert streamed[:, : lag // 2].abs().max() < 1e-3  # pre-roll before the first frame's centre
    aligned = streamed[:, lag:]  # = offline[:, :-lag] up to phase freezing at chunk edges
    stream_db = _mel_db(dmel, dmel.logmel(aligned), target, keep)
    assert stream_db <= ROUND_TRIP_DB, stream_db

    # the offline tail is unfinished (no frames after it), so compare where both are final
    gap_db = _mel_db(dmel, dmel.logmel(aligned), dmel.logmel(offline[:, :-lag]), keep)
    assert gap_db <= STREAM_VS_OFFLINE_DB, gap_db


def test_batched_rows_match_single_streams(
    dmel: DMel, vocoder: GriffinLimVocoder, speech: torch.Tensor
) -> None:
    a = dmel.decode(dmel.encode(speech[:, : 4 * CHUNK]))
    b = dmel.decode(dmel.encode(0.2 * speech[:, -4 * CHUNK :]))
    both = _stream(vocoder, torch.cat([a, b]))
    assert torch.allclose(both[0], _stream(vocoder, a)[0], atol=1e-4)
    assert torch.allclose(both[1], _stream(vocoder, b)[0], atol=1e-4)


def test_reset_restarts_only_masked_slots(
    dmel: DMel, vocoder: GriffinLimVocoder, speech: torch.Tensor
) -> None:
    logmel = dmel.decode(dmel.encode(speech[:, : 5 * CHUNK])).repeat(2, 1, 1)
    chunks = logmel.split(FRAMES, dim=1)
    state = vocoder.init_state(2)
    for c in chunks[:3]:
        vocoder.decode_chunk(c, state)
    vocoder.reset(state, torch.tensor([True, False]))
    after = torch.cat([vocoder.decode_chunk(c, state) for c in chunks[3:]], dim=-1)
    fresh = _stream(vocoder, logmel[:1, 3 * FRAMES :])
    continued = _stream(vocoder, logmel[:1])[:, 3 * CHUNK :]
    assert torch.allclose(after[0], fresh[0], atol=1e-4)
    assert torch.allclose(after[1], continued[0], atol=1e-4)
    assert not torch.allclose(fresh[0], continued[0], atol=1e-2)  # the reset made a difference
