"""Client media on its way into model input: the audio jitter buffer, PCM16 codecs, JPEG decoding.

Input audio arrives in packets of any size at 16 or 24 kHz; `InputAudioBuffer` resamples
it to the model's 16 kHz and hands out one 200 ms micro-turn per tick. A stream starts
once `jitter_ms` of audio beyond a turn is buffered; a stream that runs short at a tick
gets what it has padded with silence and counts an underrun, then re-buffers. The audio
of ticks the engine skipped (overruns) is dropped so latency does not grow. The buffer is
the one object both the event loop (`append`) and the tick thread (`take`, `skip`) touch,
so it guards its state with a lock. `check_input_ahead` applies the buffer's bound from a
packet's byte count alone, so an unpaced flood is refused before it is decoded. `decode_image`
turns a JPEG (or PNG) into RGB off the event loop, after reading its size from the header: a
small file can claim a 100-megapixel frame, and decoding it would take that memory. Malformed
media raises `ProtocolError` naming the client event. This module knows nothing about
sessions, sockets or the engine.
"""

from __future__ import annotations

import asyncio
import threading
import time

import cv2
import numpy as np

from ..model.resample import StreamResampler
from ..model.slots import SAMPLE_RATE, TURN_SAMPLES
from . import protocol as p
from .errors import ErrorCode, ProtocolError

TURN_MS = TURN_SAMPLES * 1000 // SAMPLE_RATE


def pcm16_to_float(data: bytes, event_id: str | None = None) -> np.ndarray:
    if len(data) % 2:
        raise ProtocolError(
            ErrorCode.INVALID_AUDIO, "PCM16 audio must have an even number of bytes", event_id
        )
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def check_input_ahead(
    pcm_bytes: int, rate: int, buffered_ms: int, max_ahead_ms: int, event_id: str | None = None
) -> None:
    """Refuse PCM16 audio of `pcm_bytes` at `rate` that would go past the bound, before decoding it.

    Both terms round down, so this refuses only what `InputAudioBuffer.append` would refuse too."""
    if rate not in p.PCM_RATES:
        return  # append names the rate
    incoming_ms = pcm_bytes // 2 * 1000 // rate
    if buffered_ms + incoming_ms > max_ahead_ms:
        raise _too_far_ahead(max_ahead_ms, event_id)


def _too_far_ahead(max_ahead_ms: int, event_id: str | None) -> ProtocolError:
    return ProtocolError(
        ErrorCode.INPUT_RATE_EXCEEDED, f"input audio over {max_ahead_ms} ms ahead of real time", event_id
    )


def base64_decoded_min(encoded_chars: int) -> int:
    """Fewest bytes `encoded_chars` of valid (unpadded or padded) base64 can decode to."""
    return max(0, encoded_chars * 3 // 4 - 2)


def float_to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class InputAudioBuffer:
    """Input audio buffer at 16 kHz with the jitter/underrun policy; thread-safe."""

    def __init__(self, jitter_ms: int, max_ahead_ms: int) -> None:
        self._lock = threading.Lock()
        self._buf = np.zeros(0, np.float32)
        self._jitter = jitter_ms * SAMPLE_RATE // 1000
        self._max_ahead = max_ahead_ms * SAMPLE_RATE // 1000
        self._jitter_s = jitter_ms / 1000.0
        self._resampler: StreamResampler | None = None
        self._primed = False
        self._flush = False
        self._last_arrival = -1e9
        self.underruns = 0
        self.dropped_samples = 0  # input of ticks the engine skipped (kept, it would add latency for good)

    def append(self, samples: np.ndarray, rate: int, event_id: str | None = None) -> None:
        """Add samples at `rate`; refuses audio beyond the real-time bound (nothing is buffered then)."""
        if rate not in p.PCM_RATES:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_SAMPLE_RATE, f"input rate {rate} not in {p.PCM_RATES}", event_id
            )
        incoming = len(samples) * SAMPLE_RATE // rate
        with self._lock:
            if len(self._buf) + incoming > self._max_ahead:
                raise _too_far_ahead(self._max_ahead * 1000 // SAMPLE_RATE, event_id)
            if self._resampler is None or self._resampler.sr_in != rate:
                self._resampler = StreamResampler(rate, SAMPLE_RATE)
            self._buf = np.concatenate([self._buf, self._resampler.process(samples)])
            self._last_arrival = time.monotonic()

    def skip(self, turns: int) -> None:
        """The clock moved on `turns` ticks without a step: their audio is dropped, not delayed."""
        with self._lock:
            drop = min(len(self._buf), turns * TURN_SAMPLES) if self._primed else 0
            self._buf = self._buf[drop:]
            self.dropped_samples += drop

    def commit(self) -> None:
        """The client says the stream paused: hand over the tail without waiting for jitter."""
        with self._lock:
            self._flush = True

    def clear(self) -> None:
        with self._lock:
            self._buf = np.zeros(0, np.float32)
            self._primed = False

    @property
    def buffered_ms(self) -> int:
        return len(self._buf) * 1000 // SAMPLE_RATE

    def take(self, now: float) -> tuple[np.ndarray, bool]:
        """One turn of input for the tick at `now`; returns (audio, underrun)."""
        with self._lock:
            n = len(self._buf)
            quiet = now - self._last_arrival >= self._jitter_s + TURN_MS / 1000.0
            if not self._primed and n and (n >= TURN_SAMPLES + self._jitter or quiet or self._flush):
                self._primed = True
            if not self._primed:
                return np.zeros(TURN_SAMPLES, np.float32), False
            if n >= TURN_SAMPLES:
                chunk, self._buf = self._buf[:TURN_SAMPLES], self._buf[TURN_SAMPLES:]
                return chunk, False
            chunk = np.zeros(TURN_SAMPLES, np.float32)
            chunk[:n] = self._buf
            self._buf = self._buf[:0]
            underrun = not (quiet or self._flush)
            self._primed = self._flush = False
            self.underruns += underrun
            return chunk, underrun


JPEG_SOI = b"\xff\xd8"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC are not frames
JPEG_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # no length field
# real files have a handful of markers (APPn, DQT, ...) before the frame header; more is a crafted walk
MAX_JPEG_HEADER_MARKERS = 256


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame segment, walking the marker segments after SOI."""
    i = len(JPEG_SOI)
    for _ in range(MAX_JPEG_HEADER_MARKERS):
        if i + 4 > len(data) or data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in JPEG_STANDALONE_MARKERS:
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xD9, 0xDA) or length < 2:  # end of image or scan before any frame header
            return None
        if marker in JPEG_SOF_MARKERS:
            # segment: length u16, precision u8, height u16, width u16, ...
            if i + 9 > len(data):
                return None
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        i += 2 + length
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG or PNG read from its header alone; None for anything else."""
    if data.startswith(JPEG_SOI):
        return _jpeg_size(data)
    if data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def decode_jpeg(data: bytes) -> np.ndarray | None:
    """RGB uint8 (H, W, 3), or None when the bytes are not a decodable image."""
    if not data:
        return None
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _checked_decode(data: bytes, max_pixels: int, event_id: str | None) -> np.ndarray:
    size = image_size(data)
    if size is None or 0 in size:
        raise ProtocolError(ErrorCode.INVALID_IMAGE, "image is not a JPEG or PNG with a frame size", event_id)
    width, height = size
    if width * height > max_pixels:
        message = f"image is {width}x{height} pixels, over the limit of {max_pixels} (max_image_pixels)"
        raise ProtocolError(ErrorCode.INVALID_IMAGE, message, event_id)
    rgb = decode_jpeg(data)
    if rgb is None:
        raise ProtocolError(ErrorCode.INVALID_IMAGE, "image does not decode", event_id)
    return rgb


async def decode_image(data: bytes, event_id: str | None, max_pixels: int) -> np.ndarray:
    """A client's JPEG as RGB, decoded in a worker thread: a big image must not stall the event loop.

    The size comes from the header first: images over `max_pixels` are refused undecoded."""
    return await asyncio.to_thread(_checked_decode, data, max_pixels, event_id)
