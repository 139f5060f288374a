"""Log-mel -> waveform behind a batched, stateful `Vocoder` interface; default Griffin-Lim.

Contract: `decode_chunk` takes one micro-turn of log10 mel frames per slot (B, 16, 80), in
dMel's framing (model/dmel.py), and returns exactly 3200 new samples per slot at 16 kHz.
Samples once returned are final. The stream lags the frames by `latency_samples`: the
concatenated chunk outputs equal, up to the phase-freezing at chunk edges, `vocode` of the
whole sequence delayed by `latency_samples` (the pre-roll is near-silence).

`GriffinLimVocoder` needs no weights: mel -> linear magnitude by the pseudo-inverse of the
mel basis refined with projected-gradient NNLS, then fast Griffin-Lim (Perraudin et al.,
plain Griffin-Lim plus momentum). Streaming freezes the phase of every frame already
emitted (its windowed contribution is carried in an overlap-add tail) and iterates only on
the new chunk's frames against that frozen tail. Initial phases are a fixed function of
(absolute frame index, bin), so streaming and offline start from the same point. Every
slot is a row of the same tensor ops.

This module does not know about codes, tokens or sessions; a trained vocoder can plug in
by implementing `Vocoder`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from .dmel import DEFAULT_CONFIG, DMelConfig, analysis_window, slaney_mel_filterbank

PHASE_EPS = 1e-12  # |STFT| below which a bin's phase is taken as-is (it is ~0 anyway)


class Vocoder(ABC):
    """Batched streaming log-mel vocoder. One state holds every slot's stream."""

    latency_samples: int  # output lags the input frames by this many samples (a multiple of hop)

    @abstractmethod
    def init_state(self, batch: int, device: torch.device | str = "cpu") -> Any:
        """State for `batch` slots, all at stream start."""

    @abstractmethod
    def reset(self, state: Any, mask: torch.Tensor) -> None:
        """Restart the streams of slots where `mask` (B,) bool is True, in place."""

    @abstractmethod
    def decode_chunk(self, logmel: torch.Tensor, state: Any) -> torch.Tensor:
        """(B, frames_per_chunk, n_mels) log10 mel -> (B, chunk_samples) float32; updates `state`."""

    @abstractmethod
    def vocode(self, logmel: torch.Tensor) -> torch.Tensor:
        """(B, T, n_mels) log10 mel -> (B, T * hop) float32, the whole sequence at once, no delay."""


@dataclass(frozen=True)
class GriffinLimConfig:
    n_iter: int = 8  # Griffin-Lim iterations per chunk (and for the whole sequence offline)
    nnls_steps: int = 4  # projected-gradient steps refining the pseudo-inverse magnitude
    momentum: float = 0.5  # fast Griffin-Lim extrapolation; 0 = plain GL, 0.99 drifts further from offline
    wsum_floor: float = 1e-3  # floor on the squared-window overlap sum before dividing by it


@dataclass
class GriffinLimState:
    """Per-slot stream state of `GriffinLimVocoder`."""

    tail: torch.Tensor  # (B, n_fft - hop) un-normalised overlap-add of emitted frames beyond the output
    frames: torch.Tensor  # (B,) int64 frames consumed so far (absolute index of the next frame)


def _initial_phase(frame_idx: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """(B, T) int64 frame indices -> (B, T, n_fft//2+1) starting phases, in turns.

    Each bin advances by its centre frequency times the hop from frame to frame (what a
    steady sinusoid does), from a fixed pseudo-random offset per bin so that bins do not
    all line up into a click. Integer arithmetic modulo n_fft keeps it exact for endless
    streams.
    """
    k = torch.arange(n_fft // 2 + 1, device=frame_idx.device, dtype=torch.int64)
    advance = ((frame_idx[..., None] * hop) % n_fft * k) % n_fft
    offset = ((k * 73856093) ^ 19349663) * 83492791 & 0xFFFF
    return advance.to(torch.float32) / n_fft + offset.to(torch.float32) / 65536.0


class GriffinLimVocoder(Vocoder):
    """Weight-free default vocoder; tensors live on `device`, and so must states and inputs."""

    def __init__(
        self,
        dmel_cfg: DMelConfig = DEFAULT_CONFIG,
        cfg: GriffinLimConfig = GriffinLimConfig(),  # noqa: B008 - frozen dataclass, safe default
        device: torch.device | str = "cpu",
    ) -> None:
        self.dcfg = dmel_cfg
        self.cfg = cfg
        self.device = torch.device(device)
        self.window = analysis_window(dmel_cfg, self.device)
        basis = torch.from_numpy(
            slaney_mel_filterbank(
                dmel_cfg.sample_rate, dmel_cfg.n_fft, dmel_cfg.n_mels, dmel_cfg.fmin, dmel_cfg.fmax
            )
        ).to(torch.float64)
        self.mel_basis = basis.T.contiguous().to(self.device, torch.float32)  # (n_freq, n_mels)
        self.mel_pinv = torch.linalg.pinv(basis.T).to(self.device, torch.float32)  # (n_mels, n_freq)
        self.step = float(1.0 / torch.linalg.matrix_norm(basis, ord=2) ** 2)
        hop, n_fft = dmel_cfg.hop, dmel_cfg.n_fft
        self.context = n_fft - hop
        # A frame's first nonzero window sample lies `reach` samples before its own hop, so
        # output is final only that far behind the newest frame; round up to whole frames.
        reach = self.context - (n_fft - dmel_cfg.win_length) // 2
        self.latency_samples = -(-reach // hop) * hop
        n = dmel_cfg.frames_per_chunk
        history = -(-n_fft // hop)
        full = self._overlap_add(self.window.square().expand(1, n + history, n_fft))[0]
        # squared-window overlap sum over a chunk's workspace (tail + chunk), past frames included
        self.chunk_wsum = torch.clamp(full[history * hop :], min=cfg.wsum_floor)

    def _overlap_add(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, n_fft) -> (B, (T - 1) * hop + n_fft) overlap-added signal."""
        b, t, n_fft = frames.shape
        hop = self.dcfg.hop
        out = torch.nn.functional.fold(
            frames.transpose(1, 2),
            output_size=(1, (t - 1) * hop + n_fft),
            kernel_size=(1, n_fft),
            stride=(1, hop),
        )
        return out.reshape(b, -1)

    def _frame(self, signal: torch.Tensor) -> torch.Tensor:
        return signal.unfold(-1, self.dcfg.n_fft, self.dcfg.hop)

    def magnitude(self, logmel: torch.Tensor) -> torch.Tensor:
        """(.., n_mels) log10 mel -> (.., n_freq) nonnegative linear magnitude fitting it."""
        mel = torch.pow(10.0, logmel.to(self.device, torch.float32))
        mag = torch.clamp(mel @ self.mel_pinv, min=0.0)
        for _ in range(self.cfg.nnls_steps):
            grad = (mag @ self.mel_basis - mel) @ self.mel_basis.T
            mag = torch.clamp(mag - self.step * grad, min=0.0)
        return mag

    def _griffin_lim(
        self, mag: torch.Tensor, first_frame: torch.Tensor, tail: torch.Tensor, wsum: torch.Tensor
    ) -> torch.Tensor:
        """Iterate the phase of frames `mag` (B, T, n_freq) against a frozen overlap-add `tail`
        (B, context) sitting under their start; returns the un-normalised overlap-add
        (B, context + T * hop) of tail plus the final frames."""
        t = mag.shape[1]
        idx = first_frame[:, None] + torch.arange(t, device=self.device)
        spec = torch.polar(mag, 2 * math.pi * _initial_phase(idx, self.dcfg.n_fft, self.dcfg.hop))
        pad = (0, t * self.dcfg.hop + self.context - tail.shape[-1])
        frozen = torch.nn.functional.pad(tail, pad)
        previous = torch.zeros_like(spec)
        blend = self.cfg.momentum / (1.0 + self.cfg.momentum)
        for _ in range(self.cfg.n_iter):
            ola = frozen + self._overlap_add(torch.fft.irfft(spec, n=self.dcfg.n_fft) * self.window)
            rebuilt = torch.fft.rfft(self._frame(ola / wsum) * self.window)
            extrapolated = rebuilt - blend * previous
            spec = extrapolated * (mag / torch.clamp(extrapolated.abs(), min=PHASE_EPS))
            previous = rebuilt
        return frozen + self._overlap_add(torch.fft.irfft(spec, n=self.dcfg.n_fft) * self.window)

    def init_state(self, batch: int, device: torch.device | str | None = None) -> GriffinLimState:
        dev = self.device if device is None else torch.device(device)
        return GriffinLimState(
            tail=torch.zeros(batch, self.context, device=dev),
            frames=torch.zeros(batch, dtype=torch.int64, device=dev),
        )

    def reset(self, state: GriffinLimState, mask: torch.Tensor) -> None:
        keep = ~mask.to(state.tail.device)
        state.tail = state.tail * keep[:, None]
        state.frames = state.frames * keep

    @torch.no_grad()
    def decode_chunk(self, logmel: torch.Tensor, state: GriffinLimState) -> torch.Tensor:
        n, hop = self.dcfg.frames_per_chunk, self.dcfg.hop
        if logmel.shape[1] != n:
            raise ValueError(f"expected {n} frames per chunk, got {logmel.shape[1]}")
        ola = self._griffin_lim(self.magnitude(logmel), state.frames, state.tail, self.chunk_wsum)
        start = self.context - self.latency_samples
        out = ola[:, start : start + n * hop] / self.chunk_wsum[start : start + n * hop]
        state.tail = ola[:, n * hop :].clone()
        state.frames = state.frames + n
        return out

    @torch.no_grad()
    def vocode(self, logmel: torch.Tensor) -> torch.Tensor:
        b, t, _ = logmel.shape
        wsum = self._overlap_add(self.window.square().expand(1, t, self.dcfg.n_fft))[0]
        wsum = torch.clamp(wsum, min=self.cfg.wsum_floor)
        tail = torch.zeros(b, self.context, device=self.device)
        first = torch.zeros(b, dtype=torch.int64, device=self.device)
        ola = self._griffin_lim(self.magnitude(logmel), first, tail, wsum)
        return (ola / wsum)[:, self.context :]
