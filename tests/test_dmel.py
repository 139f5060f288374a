"""dMel codec: filterbank, shapes and code range, streaming == offline framing, reset masks,
parity with the reference `dmel` package, espeak fixture and resampler."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch
from dmel import DiscretizedLogMelFbank, LogMelFbank

from microturn.model.dmel import DMel, slaney_mel_filterbank
from microturn.model.resample import StreamResampler, resample

CHUNK = 3200


def _whole_chunks(wave: np.ndarray, n_chunks: int | None = None) -> torch.Tensor:
    n = len(wave) // CHUNK if n_chunks is None else n_chunks
    return torch.from_numpy(wave[: n * CHUNK].copy())[None]


def test_speech_fixture_is_speech(speech_16k: np.ndarray) -> None:
    assert speech_16k.dtype == np.float32 and speech_16k.ndim == 1
    assert 3.0 < len(speech_16k) / 16_000 < 15.0
    assert 0.1 < np.abs(speech_16k).max() <= 1.0


def test_filterbank_matches_librosa() -> None:
    ours = slaney_mel_filterbank(16_000, 1024, 80, 80.0, 7600.0)
    ref = librosa.filters.mel(sr=16_000, n_fft=1024, n_mels=80, fmin=80, fmax=7600, htk=False, norm="slaney")
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-8)


def test_shapes_and_code_range(speech_16k: np.ndarray) -> None:
    d = DMel()
    wave = torch.from_numpy(speech_16k)[None].repeat(2, 1)
    codes = d.encode(wave)
    assert codes.shape == (2, len(speech_16k) // 200, 80)
    assert codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert len(torch.unique(codes)) >= 12  # speech spans most of the range
    values = d.decode(codes)
    assert values.shape == codes.shape and values.dtype == torch.float32
    assert torch.allclose(d.centres, torch.linspace(-7, 2, 16))
    logmel = d.logmel(wave)
    inside = (logmel >= -7) & (logmel <= 2)
    assert (values - logmel)[inside].abs().max() <= 0.3 + 1e-5  # nearest bin centre: half a bin


def test_silence_and_clipping_codes() -> None:
    d = DMel()
    assert torch.all(d.encode(torch.zeros(1, CHUNK)) == 1)  # power floor: log10 mel ~ -6.2
    assert torch.all(d.quantize(torch.tensor([-50.0, 50.0])) == torch.tensor([0, 15]))


def test_streaming_equals_offline(speech_16k: np.ndarray) -> None:
    d = DMel()
    a = _whole_chunks(speech_16k)
    wave = torch.cat([a, 0.3 * a.flip(-1)])  # two different slots in one batch
    offline = d.encode(wave)
    state = d.init_stream(2)
    chunks = [d.encode_chunk(c, state) for c in wave.split(CHUNK, dim=-1)]
    assert all(c.shape == (2, 16, 80) for c in chunks)
    streamed = torch.cat(chunks, dim=1)
    assert streamed.shape == offline.shape
    assert torch.equal(streamed, offline)


def test_reset_mask_restarts_only_masked_slots(speech_16k: np.ndarray) -> None:
    d = DMel()
    a = _whole_chunks(speech_16k, 3)
    wave = torch.cat([a, a.roll(5000, dims=-1)])
    state = d.init_stream(2)
    first, second, third = wave.split(CHUNK, dim=-1)
    d.encode_chunk(first, state)
    d.encode_chunk(second, state)
    state.reset(torch.tensor([True, False]))
    out = d.encode_chunk(third, state)
    assert torch.equal(out[0], d.encode(third[:1])[0])  # slot 0: fresh stream
    assert torch.equal(out[1], d.encode(wave[1:])[0, 32:])  # slot 1: untouched


def test_encode_chunk_rejects_wrong_size() -> None:
    d = DMel()
    with pytest.raises(ValueError):
        d.encode_chunk(torch.zeros(1, CHUNK - 1), d.init_stream(1))


def test_parity_with_reference_package(speech_16k: np.ndarray) -> None:
    """Codes agree with Apple's `dmel` package configured as model/dmel.py's contract says.

    The reference frames with center=True (reflect padding n_fft/2), frame j centred on
    sample 200 j; ours frame t spans [200 t - 824, 200 t + 200), centred on 200 t - 312.
    Feeding the reference the signal from sample 88 on makes its frame j our frame j + 2;
    its first frames touch reflect padding and are dropped.
    """
    d = DMel()
    wave = torch.from_numpy(speech_16k)[None]
    shift, lag, first_clean = 88, 2, 3
    ref_fbank = LogMelFbank(
        sampling_freq=16_000,
        n_fft=1024,
        frame_size_ms=50,
        frame_stride_ms=12.5,
        n_filterbank=80,
        low_freq=80,
        high_freq=7600,
    )
    ref = DiscretizedLogMelFbank(ref_fbank, n_bits=4, quantize_min_value=-7, quantize_max_value=2)
    shifted = wave[:, shift:].clone()
    ref_codes, _ = ref(shifted, torch.tensor([shifted.shape[1]]))
    ref_codes = ref_codes[:, 1:-1]  # drop <bos> / <eos>
    ours = d.encode(wave)
    n = min(ours.shape[1] - lag, ref_codes.shape[1])
    agree = (ours[:, first_clean + lag : n + lag] == ref_codes[:, first_clean:n]).float().mean().item()
    assert n - first_clean > 300
    assert agree >= 0.999, f"agreement {agree:.5f}"  # measured 1.0 on this speech


def test_resample_tone_and_stream() -> None:
    sr_in, sr_out, hz = 24_000, 16_000, 440.0
    t = np.arange(sr_in) / sr_in
    tone = (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    out = resample(tone, sr_in, sr_out)
    assert out.dtype == np.float32 and abs(len(out) - sr_out) <= 1
    expected = 0.5 * np.sin(2 * np.pi * hz * np.arange(len(out)) / sr_out)
    assert np.abs(out - expected)[200:-200].max() < 1e-3
    stream = StreamResampler(sr_in, sr_out)
    pieces = [stream.process(c) for c in np.split(tone, 10)] + [
        stream.process(np.zeros(0, np.float32), last=True)
    ]
    streamed = np.concatenate(pieces)
    assert abs(len(streamed) - len(out)) <= 1
    n = min(len(streamed), len(out))
    assert np.abs(streamed[:n] - out[:n])[200:-200].max() < 1e-3
