"""Speech synthesis with the system `festival` binary and Debian's festvox voices.

Contract: `Festival().speak(text, voice, stretch, semitones, rate)` returns mono float32 samples in
[-1, 1] at `rate` Hz of `voice` (one of FESTIVAL_VOICES or ACCENTED_VOICES) saying `text`, `stretch`
times as long as the voice's own pace and `semitones` above its own pitch. An accented voice (a Czech,
Finnish or Italian speaker) reads the English text respelled in its own language (training/accents.py).
Nothing is cached on disk; callers cache renders (training/data.py does, per generator, as for espeak-ng).

One persistent `festival --pipe` process per `Festival`, started on first use: a fresh process costs
about 0.25 s of start-up, a render in a warm one about 10 ms (diphone voices) to 60 ms (HTS). It writes
each render to a WAV file in its own temporary folder and then creates a marker file, which is how this
side knows the render is done (its stdout is block-buffered in a pipe, so a printed sentinel would not
arrive). Renders are serialised by a lock.

Speed is festival's Duration_Stretch (for the HTS voice, which ignores it, hts_engine's speech
rate). Pitch: the English diphone voices take it from their intonation targets (int_lr_params: mean and
range of F0 scaled together, formants kept). The HTS voice predicts F0 itself and festival's HTS
module ignores hts_engine's half-tone option, so its pitch moves by playback rate: rendered
`2**(semitones/12)` times slower, then resampled, which moves its formants with the pitch; the
accented voices' intonation models differ per language, so their pitch moves the same way.
This module knows nothing about dMel, conversations or training; it needs `festival` on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import soundfile as sf

from ..model.resample import resample
from .accents import respell

FESTIVAL_BINARY = "festival"
# kal: American male diphones (festvox-kallpc16k); ked: American male diphones (festvox-kdlpc16k), a
# second speaker with its own duration model; slt: American female HTS (festvox-us-slt-hts)
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
HTS_VOICES = ("cmu_us_slt_arctic_hts",)
# other people saying English with their language's accent: voice -> (language, text encoding that
# voice's front end reads). Czech: adult women and men and a boy; Finnish and Italian: a woman and a man
ACCENTED_VOICES = {
    "czech_dita": ("czech", "iso-8859-2"), "czech_machac": ("czech", "iso-8859-2"),
    "czech_krb": ("czech", "iso-8859-2"), "czech_ph": ("czech", "iso-8859-2"),
    "suo_fi_lj_diphone": ("finnish", "latin-1"), "hy_fi_mv_diphone": ("finnish", "latin-1"),
    "lp_diphone": ("italian", "latin-1"), "pc_diphone": ("italian", "latin-1"),
}
# voices whose pitch moves by playback rate (they do not take the English diphones' intonation targets)
PLAYBACK_PITCH_VOICES = (*HTS_VOICES, *ACCENTED_VOICES)
# the diphone voices' own intonation targets (F0 mean, F0 std in Hz), from their festvox .scm files
DIPHONE_F0 = {"kal_diphone": (105.0, 14.0), "ked_diphone": (105.0, 15.0)}
RENDER_TIMEOUT_S = 30.0  # generous: a sentence renders in well under a second even on a loaded CPU
POLL_S = 0.002  # how often the marker file is looked for


class FestivalMissingError(RuntimeError):
    """Raised when the festival executable (or one of its voices) cannot be found."""


def _close(proc: subprocess.Popen, folder: tempfile.TemporaryDirectory) -> None:
    if proc.poll() is None:
        proc.stdin.close()  # EOF ends festival's read loop
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
    folder.cleanup()


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Festival:
    """A warm festival process rendering one utterance at a time."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._folder: tempfile.TemporaryDirectory | None = None
        self._lock = threading.Lock()
        self._count = 0

    def _start(self) -> subprocess.Popen:
        binary = shutil.which(FESTIVAL_BINARY)
        if binary is None:
            raise FestivalMissingError(
                f"{FESTIVAL_BINARY} not found on PATH; install it (Debian/Ubuntu: apt-get install festival "
                "festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts, and for the accented voices "
                "festvox-czech-dita festvox-czech-machac festvox-czech-krb festvox-czech-ph "
                "festvox-suopuhe-lj festvox-suopuhe-mv festvox-italp16k festvox-itapc16k)")
        self._folder = tempfile.TemporaryDirectory(prefix="microturn-festival-")
        # latin-1 passes each byte through: a Czech text is encoded to ISO-8859-2 before it is written
        self._proc = subprocess.Popen([binary, "--pipe"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, bufsize=1, encoding="latin-1",
                                      errors="replace")
        weakref.finalize(self, _close, self._proc, self._folder)
        return self._proc

    def _commands(self, text: str, voice: str, stretch: float, semitones: float, wav: Path,
                  done: Path) -> str:
        setup = f"(voice_{voice})(Parameter.set 'Duration_Stretch {stretch:.4f})"
        if voice in HTS_VOICES:
            # HTS ignores Duration_Stretch; hts_engine's speech rate divides the duration instead
            speed = 1 / (stretch * 2 ** (semitones / 12))
            setup = (f"(voice_{voice})(set! hts_engine_params (append hts_engine_params "
                     f"(list (list \"-r\" {speed:.4f}))))")
        elif voice in ACCENTED_VOICES:
            language, encoding = ACCENTED_VOICES[voice]
            text = respell(text, language).encode(encoding, errors="replace").decode("latin-1")
            if language == "italian":  # the Italian voices' question intonation fails in Scheme ("get_c_val")
                text = text.replace("?", ".")
            setup = f"(voice_{voice})(Parameter.set 'Duration_Stretch {stretch * 2 ** (semitones / 12):.4f})"
        else:
            mean, std = DIPHONE_F0[voice]
            k = 2 ** (semitones / 12)
            setup += (f"(set! int_lr_params '((target_f0_mean {mean * k:.2f}) (target_f0_std {std * k:.2f}) "
                      "(model_f0_mean 170) (model_f0_std 34)))")
        return (f"{setup}(utt.save.wave (SynthText {_scheme_string(text)}) \"{wav}\" 'riff)"
                f"(fclose (fopen \"{done}\" \"w\"))\n")

    def speak(self, text: str, voice: str = "kal_diphone", stretch: float = 1.0, semitones: float = 0.0,
              rate: int = 16_000) -> np.ndarray:
        if voice not in FESTIVAL_VOICES and voice not in ACCENTED_VOICES:
            known = FESTIVAL_VOICES + tuple(ACCENTED_VOICES)
            raise ValueError(f"unknown festival voice {voice!r}; one of {known}")
        with self._lock:
            proc = self._proc if self._proc is not None and self._proc.poll() is None else self._start()
            self._count += 1
            wav = Path(self._folder.name) / f"{self._count}.wav"
            done = wav.with_suffix(".done")
            proc.stdin.write(self._commands(text, voice, stretch, semitones, wav, done))
            proc.stdin.flush()
            deadline = time.monotonic() + RENDER_TIMEOUT_S
            while not done.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    err = proc.stderr.read() if proc.poll() is not None else ""
                    self._proc = None
                    raise RuntimeError(f"festival failed rendering {text!r} with {voice}: {err[-500:]}")
                time.sleep(POLL_S)
            if not wav.exists():  # festival reported a Scheme error for that line and went on
                done.unlink()
                raise RuntimeError(f"festival wrote no audio for {text!r} with {voice}")
            wave, sr = sf.read(wav, dtype="float32", always_2d=True)
            wav.unlink()
            done.unlink()
        wave = wave.mean(axis=1)
        if voice in PLAYBACK_PITCH_VOICES and semitones:
            # played back 2**(s/12) times faster: the slower render comes back to its pace, pitch raised
            return resample(wave, sr * 2 ** (semitones / 12), rate)
        return resample(wave, sr, rate)
