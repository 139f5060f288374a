"""dMel audio codec in pure torch: 16 kHz mono -> discretised log-mel codes and back.

Contract (Apple's dMel, "Speech Tokenization made Simple"): 80 Slaney mel channels over
80-7600 Hz, a periodic Hann window of 800 samples (50 ms) centred in n_fft = 1024, hop 200
(12.5 ms), magnitude spectrum (power floored at 1e-10, as the reference package), log10 amplitude, and each
channel discretised into 16 evenly spaced bins over [-7, 2] (codes 0..15, decoded to the
bin centres -7, -6.4, ..., 2). Digital silence encodes to code 1 (log10 mel ~ -6.2).

Framing is causal: frame t covers samples [200 t - 824, 200 t + 200) of the signal with
zeros before sample 0 (center=False with n_fft - hop samples of left context), so a
signal of N samples gives N // 200 frames and the streaming encoder, which carries the
last n_fft - hop samples between 3200-sample chunks, gives exactly the offline frames,
16 per chunk. All tensors are batch-first; any device, float32.

This module does not know about tokens, sessions or the vocoder's algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class DMelConfig:
    sample_rate: int = 16_000  # Hz, mono
    n_fft: int = 1024  # FFT size; the window is zero-padded to it, centred
    win_length: int = 800  # 50 ms Hann window
    hop: int = 200  # 12.5 ms between frames
    n_mels: int = 80  # Slaney mel channels
    fmin: float = 80.0  # Hz, lower edge of the first mel filter
    fmax: float = 7600.0  # Hz, upper edge of the last mel filter
    power_floor: float = 1e-10  # floor on |STFT|^2 (so |STFT| >= 1e-5), as the reference package
    mel_floor: float = 1e-10  # floor on mel amplitudes before log10, as the reference package
    n_bins: int = 16  # code values per channel
    log_min: float = -7.0  # log10 amplitude of the lowest bin centre
    log_max: float = 2.0  # log10 amplitude of the highest bin centre
    chunk_samples: int = 3200  # one 200 ms micro-turn of audio

    @property
    def context(self) -> int:
        """Samples carried between chunks (left context of every frame beyond its own hop)."""
        return self.n_fft - self.hop

    @property
    def frames_per_chunk(self) -> int:
        return self.chunk_samples // self.hop


DEFAULT_CONFIG = DMelConfig()


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    """Slaney's Auditory Toolbox mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(
        hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep, hz / f_sp
    )


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), mel * f_sp)


def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """(n_mels, n_fft//2+1) float32 triangular filters, area-normalised ('slaney'), like
    librosa.filters.mel(htk=False, norm='slaney')."""
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    mel_pts = np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2)
    hz_pts = _mel_to_hz_slaney(mel_pts)
    widths = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]
    return weights.astype(np.float32)


def analysis_window(cfg: DMelConfig, device: torch.device | None = None) -> torch.Tensor:
    """(n_fft,) periodic Hann of win_length, zero-padded to n_fft with the window centred."""
    win = torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float32, device=device)
    left = (cfg.n_fft - cfg.win_length) // 2
    return torch.nn.functional.pad(win, (left, cfg.n_fft - cfg.win_length - left))


class DMel:
    """The dMel codec. Stateless offline API plus a streaming encoder (see DMelStreamState)."""

    def __init__(self, cfg: DMelConfig = DEFAULT_CONFIG, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.window = analysis_window(cfg, self.device)
        # (n_freq, n_mels) so that |STFT| (.., n_freq) @ mel_basis gives mel amplitudes
        self.mel_basis = torch.from_numpy(
            slaney_mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax).T.copy()
        ).to(self.device)
        self.bin_width = (cfg.log_max - cfg.log_min) / (cfg.n_bins - 1)
        self.centres = torch.linspace(cfg.log_min, cfg.log_max, cfg.n_bins, device=self.device)

    def _frames_to_logmel(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, n_fft) raw frames -> (B, T, n_mels) log10 mel amplitudes."""
        spec = torch.fft.rfft(frames * self.window, dim=-1)
        mag = torch.clamp(spec.real.square() + spec.imag.square(), min=self.cfg.power_floor).sqrt()
        mel = torch.clamp(mag @ self.mel_basis, min=self.cfg.mel_floor)
        return torch.log10(mel)

    def logmel(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, N) float waveform -> (B, N // hop, n_mels) log10 mel amplitudes (causal framing)."""
        wave = wave.to(self.device, torch.float32)
        padded = torch.nn.functional.pad(wave, (self.cfg.context, 0))
        frames = padded.unfold(-1, self.cfg.n_fft, self.cfg.hop)
        return self._frames_to_logmel(frames)

    def quantize(self, logmel: torch.Tensor) -> torch.Tensor:
        """Log-mel values -> nearest bin index, int64 in [0, n_bins)."""
        idx = torch.round((logmel - self.cfg.log_min) / self.bin_width)
        return idx.clamp(0, self.cfg.n_bins - 1).to(torch.int64)

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, N) waveform -> (B, N // hop, n_mels) int64 codes."""
        return self.quantize(self.logmel(wave))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T, n_mels) int64 codes -> (B, T, n_mels) float32 log10 mel at the bin centres."""
        return self.centres[codes.to(self.device)]

    def init_stream(self, batch: int) -> DMelStreamState:
        """Fresh streaming state for `batch` slots (all slots start from silence)."""
        return DMelStreamState(carry=torch.zeros(batch, self.cfg.context, device=self.device))

    def encode_chunk(self, chunk: torch.Tensor, state: DMelStreamState) -> torch.Tensor:
        """(B, chunk_samples) -> (B, frames_per_chunk, n_mels) codes; updates `state` in place.

        Equals `encode` on the concatenated stream, frame for frame.
        """
        if chunk.shape[-1] != self.cfg.chunk_samples:
            raise ValueError(f"chunk must have {self.cfg.chunk_samples} samples, got {chunk.shape[-1]}")
        buf = torch.cat([state.carry, chunk.to(self.device, torch.float32)], dim=-1)
        state.carry = buf[:, -self.cfg.context :].clone()
        frames = buf.unfold(-1, self.cfg.n_fft, self.cfg.hop)
        return self.quantize(self._frames_to_logmel(frames))


@dataclass
class DMelStreamState:
    """Per-slot streaming encoder state: the last n_fft - hop samples of each slot's input."""

    carry: torch.Tensor = field(default_factory=lambda: torch.zeros(0, DEFAULT_CONFIG.context))  # (B, ctx)

    def reset(self, mask: torch.Tensor) -> None:
        """Zero the slots where `mask` (B,) bool is True, as if their streams just started."""
        keep = ~mask.to(self.carry.device)[:, None]
        self.carry = self.carry * keep
