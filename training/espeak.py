"""Speech synthesis with the system `espeak-ng` binary, for test fixtures and demos.

`speak` runs espeak-ng as a subprocess, reads the WAV it writes to stdout and resamples
it to the requested rate. Nothing is cached on disk. This module does not know about
dMel, vocoders or sessions; it only needs the `espeak-ng` executable on PATH.
"""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import soundfile as sf

from ..model.resample import resample

ESPEAK_BINARY = "espeak-ng"
ESPEAK_TIMEOUT_S = 60.0  # generous: long texts synthesise faster than real time on any CPU


class EspeakMissingError(RuntimeError):
    """Raised when the espeak-ng executable cannot be found."""


def speak(text: str, voice: str = "en", speed: int = 160, pitch: int = 50, rate: int = 16_000) -> np.ndarray:
    """Synthesise `text`; returns mono float32 samples in [-1, 1] at `rate` Hz.

    speed is in words per minute, pitch 0..99 (espeak-ng's -s and -p options).
    """
    binary = shutil.which(ESPEAK_BINARY)
    if binary is None:
        raise EspeakMissingError(
            f"{ESPEAK_BINARY} not found on PATH; install it (Debian/Ubuntu: apt-get install espeak-ng)"
        )
    proc = subprocess.run(
        [binary, "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), text],
        capture_output=True,
        timeout=ESPEAK_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0 or not proc.stdout:
        err = proc.stderr.decode(errors="replace")
        raise RuntimeError(f"{ESPEAK_BINARY} failed ({proc.returncode}): {err}")
    wave, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    return resample(wave.mean(axis=1), sr, rate)
