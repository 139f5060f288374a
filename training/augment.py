"""What makes a synthetic user voice sound like a person in a room on a cheap microphone.

Contract: an `Augmentation` (part of a `Curriculum`, training/curricula.py) says which augmentations
apply to the user's side of a training conversation and at what rates. `voice_draw(aug, rng)` draws
one utterance's (pitch, tempo, warp, speaker) from a grid, so that augmented renders can be cached like plain
ones, and `apply_voice` makes them; `Channel.draw(aug, rng, rooms)` draws one conversation's room,
microphone band and gain, and `Channel.apply(speech, noise)` mixes the user's track through them.
Every draw comes from the caller's generator, a fixed number of draws per call whatever the rates,
so a run is reproducible from its seed and turning one augmentation on does not move the others.

- pitch: Rubber Band pitch shift (pedalboard), formants moving with it (formant preservation costs
  ~25x the CPU; the synthesisers' own pitch settings already move pitch alone);
- tempo: Rubber Band time stretch, pitch kept;
- vtlp: vocal-tract-length perturbation. No well-kept library offers it (nlpaug's VtlpAug was last
  released in 2022), so it is done by resampling, the speed perturbation of Ko et al. (2015): the
  waveform is read at `warp` times its rate, which scales formants, pitch and tempo together;
- speaker: another speaker made of the voice, by Praat's Change Gender (parselmouth): PSOLA moves
  the formants by a ratio (a shorter or longer vocal tract) while the pitch median moves by its own
  ratio and the intonation range by its own factor, and the tempo stays. Where vtlp scales all three
  together, this makes speakers whose pitch and vocal tract do not go together, as people's don't;
  its draws are made only by curricula that use it, so the others' draws are as they were. Praat's
  PSOLA draws random numbers of its own, so Praat's generator is seeded before each conversion: the
  same utterance and ratios give the same samples, in every run and every data worker;
- room: reverberation by a shoebox room's impulse response (pyroomacoustics image-source method, a
  bank of `rooms` rooms drawn once per generator), aligned at its direct path;
- band: a cheap laptop microphone (band-pass 150-300 Hz to 5-7 kHz plus a presence peak), a phone
  line (300-3400 Hz and the GSM full-rate codec) or wideband VoIP / a headset (100 Hz to 7 kHz);
- gain: the microphone's gain, then clipping at full scale as a hot input does;
- level and noise: every curriculum's per-utterance peak level and drift and the white / brown /
  mains-hum noise under the conversation (training/data.py draws these; their ranges live here).
This module does not know about conversations, tokens or training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import parselmouth
import pedalboard
import pyroomacoustics as pra
from parselmouth.praat import call, run
from scipy.signal import butter, fftconvolve, sosfilt

from ..model.resample import resample

BANDS = ("laptop", "phone", "wideband")
MAX_IMAGE_ORDER = 60  # image-source order cap: long rooms' full order costs seconds per impulse response
PITCH_FLOOR_HZ, PITCH_CEILING_HZ = 60.0, 500.0  # Change Gender's pitch analysis range (men to children)
PRAAT_SEED = 0  # Praat's own generator, reseeded before each Change Gender so a conversion is a pure function
ROOM_SIZE_M = ((3.0, 9.0), (2.5, 7.0), (2.4, 3.6))  # shoebox length, width, height ranges
WALL_MARGIN_M = 0.5  # talker and microphone keep this far from every wall


@dataclass(frozen=True)
class Augmentation:
    """Which augmentations the user's side gets, at what rates (0 = never). The defaults are the first
    stage's: level and noise only, as every curriculum has had."""

    peak_dbfs: tuple[float, float] = (-22.0, -1.0)  # peak level range of one user utterance
    level_ramp_db: float = 6.0  # within-utterance level drift, +/- dB
    noise_dbfs: tuple[float, float] = (-80.0, -40.0)  # RMS range of the noise (white, brown or hum)
    pitch_rate: float = 0.0  # utterances pitch-shifted
    pitch_semitones: tuple[float, ...] = (-2.0, -1.0, 1.0, 2.0)  # the shifts drawn from
    tempo_rate: float = 0.0  # utterances time-stretched
    tempo_factors: tuple[float, ...] = (0.85, 0.92, 1.08, 1.18)  # speed-ups drawn from (> 1 is faster)
    vtlp_rate: float = 0.0  # utterances warped (formants, pitch, tempo by one factor)
    vtlp_warps: tuple[float, ...] = (0.9, 0.95, 1.05, 1.1)  # the warps drawn from
    speaker_rate: float = 0.0  # utterances spoken as another speaker (Change Gender)
    # formant shift ratios drawn from: about the span of adult vocal tracts around one speaker's
    speaker_formants: tuple[float, ...] = (0.85, 0.89, 0.93, 0.97, 1.03, 1.07, 1.11, 1.16)
    speaker_pitch: tuple[float, ...] = (0.7, 0.8, 0.9, 1.12, 1.25, 1.45)  # pitch median ratios drawn from
    speaker_range: tuple[float, ...] = (0.6, 0.8, 1.0, 1.3, 1.6)  # intonation range factors drawn from
    room_rate: float = 0.0  # conversations in a reverberant room
    room_rt60_s: tuple[float, float] = (0.15, 0.8)  # reverberation time range of the room bank
    rooms: int = 12  # rooms in the bank (each costs up to ~0.25 s to compute, once per generator)
    band_rate: float = 0.0  # conversations through a band-limited microphone or line
    bands: tuple[str, ...] = BANDS  # the kinds drawn from
    gain_rate: float = 0.0  # conversations with a microphone gain change
    gain_db: tuple[float, float] = (-12.0, 12.0)  # its range; above 0 dB loud speech clips

    def __post_init__(self) -> None:
        unknown = set(self.bands) - set(BANDS)
        if unknown:
            raise ValueError(f"unknown bands {sorted(unknown)}; known: {BANDS}")

    @property
    def voice(self) -> bool:
        return bool(self.pitch_rate or self.tempo_rate or self.vtlp_rate or self.speaker_rate)

    @property
    def channel(self) -> bool:
        return bool(self.room_rate or self.band_rate or self.gain_rate)


def _pick(rng: np.random.Generator, rate: float, grid: tuple[float, ...], neutral: float) -> float:
    hit, index = rng.random(), int(rng.integers(len(grid)))  # both drawn always: fixed draws per call
    return float(grid[index]) if hit < rate else neutral


Shift = tuple[float, float, float, float, float, float]  # (semitones, tempo, warp, formants, pitch, range)
NO_SHIFT: Shift = (0.0, 1.0, 1.0, 1.0, 1.0, 1.0)


def voice_draw(aug: Augmentation, rng: np.random.Generator) -> Shift:
    """One utterance's shift; NO_SHIFT is none. The speaker draws are made only when the curriculum
    has that augmentation, so curricula from before it draw exactly what they drew."""
    shift = (_pick(rng, aug.pitch_rate, aug.pitch_semitones, 0.0),
             _pick(rng, aug.tempo_rate, aug.tempo_factors, 1.0),
             _pick(rng, aug.vtlp_rate, aug.vtlp_warps, 1.0))
    if not aug.speaker_rate:
        return (*shift, *NO_SHIFT[3:])
    hit = rng.random() < aug.speaker_rate
    picks = tuple(float(grid[int(rng.integers(len(grid)))])
                  for grid in (aug.speaker_formants, aug.speaker_pitch, aug.speaker_range))
    return (*shift, *(picks if hit else NO_SHIFT[3:]))


def change_speaker(wave: np.ndarray, formants: float, pitch: float, pitch_range: float,
                   rate: int) -> np.ndarray:
    """The utterance as said by a speaker whose formants are `formants` times, pitch median `pitch`
    times and intonation range `pitch_range` times the voice's (Praat's Change Gender). An utterance
    Praat cannot convert (no voiced frame: a whisper, a lone "s") comes back unchanged: one missed
    augmentation must not end a training run."""
    sound = parselmouth.Sound(wave.astype(np.float64), rate)
    try:
        median = call(sound.to_pitch(pitch_floor=PITCH_FLOOR_HZ, pitch_ceiling=PITCH_CEILING_HZ),
                      "Get quantile", 0, 0, 0.5, "Hertz")
        if not np.isfinite(median):
            return wave.astype(np.float32)
        run(f"random_initializeWithSeedUnsafelyButPredictably ({PRAAT_SEED})")
        out = call(sound, "Change gender", PITCH_FLOOR_HZ, PITCH_CEILING_HZ, formants, median * pitch,
                   pitch_range, 1.0)
    except parselmouth.PraatError:  # too short to analyse, or no pitch to move
        return wave.astype(np.float32)
    return np.asarray(out.values[0], np.float32)


def apply_voice(wave: np.ndarray, shift: Shift, rate: int) -> np.ndarray:
    semitones, tempo, warp, formants, pitch, pitch_range = shift
    if shift[3:] != NO_SHIFT[3:]:
        wave = change_speaker(wave, formants, pitch, pitch_range, rate)
    if warp != 1.0:
        wave = resample(wave, rate * warp, rate)
    if semitones or tempo != 1.0:
        wave = pedalboard.time_stretch(wave.astype(np.float32), rate, stretch_factor=tempo,
                                       pitch_shift_in_semitones=semitones, high_quality=False,
                                       preserve_formants=False)[0]
    return wave.astype(np.float32)


def room_bank(aug: Augmentation, rng: np.random.Generator, rate: int) -> list[np.ndarray]:
    """`aug.rooms` impulse responses of random shoebox rooms, talker and microphone placed at random."""
    bank = []
    for _ in range(aug.rooms):
        size = [rng.uniform(lo, hi) for lo, hi in ROOM_SIZE_M]
        rt60 = rng.uniform(*aug.room_rt60_s)
        talker, mic = ([rng.uniform(WALL_MARGIN_M, s - WALL_MARGIN_M) for s in size] for _ in range(2))
        try:
            absorption, order = pra.inverse_sabine(rt60, size)
        except ValueError:  # a room too small to ring that long: as dead as its walls allow
            absorption, order = 1.0, 1
        room = pra.ShoeBox(size, fs=rate, materials=pra.Material(absorption),
                           max_order=min(order, MAX_IMAGE_ORDER))
        room.add_source(talker)
        room.add_microphone(mic)
        room.compute_rir()
        rir = np.asarray(room.rir[0][0], np.float64)
        rir = rir[int(np.argmax(np.abs(rir))):]  # direct path at lag 0: speech boundaries stay put
        bank.append((rir / np.abs(rir[0])).astype(np.float32))
    return bank


def _band_pass(x: np.ndarray, low: float, high: float, rate: int) -> np.ndarray:
    return sosfilt(butter(4, [low, high], btype="band", fs=rate, output="sos"), x).astype(np.float32)


@dataclass
class Channel:
    """One conversation's room, microphone band and gain (None / "" / 0 dB: not applied)."""

    rir: np.ndarray | None  # room impulse response, direct path first
    band: str  # one of BANDS, or ""
    band_edges: tuple[float, float]  # the band's pass edges in Hz
    presence: tuple[float, float]  # laptop: presence peak (Hz, dB)
    gain_db: float

    @classmethod
    def draw(cls, aug: Augmentation, rng: np.random.Generator, rooms: list[np.ndarray]) -> Channel:
        room_hit, room = rng.random(), int(rng.integers(max(1, len(rooms))))
        band_hit, band = rng.random(), aug.bands[int(rng.integers(len(aug.bands)))]
        low, high = rng.uniform(150.0, 300.0), rng.uniform(5000.0, 7000.0)
        presence = (rng.uniform(2000.0, 4000.0), rng.uniform(3.0, 8.0))
        gain_hit, gain = rng.random(), rng.uniform(*aug.gain_db)
        if band == "phone":
            low, high = 300.0, 3400.0
        elif band == "wideband":
            low, high = 100.0, 7000.0
        return cls(rir=rooms[room] if rooms and room_hit < aug.room_rate else None,
                   band=band if band_hit < aug.band_rate else "", band_edges=(low, high), presence=presence,
                   gain_db=gain if gain_hit < aug.gain_rate else 0.0)

    def apply(self, speech: np.ndarray, noise: np.ndarray, rate: int) -> np.ndarray:
        """The microphone signal: speech in the room, plus the noise, through the band, at the gain."""
        if self.rir is not None:
            peak = np.abs(speech).max()
            speech = fftconvolve(speech, self.rir)[: len(speech)].astype(np.float32)
            speech *= peak / max(np.abs(speech).max(), 1e-9)  # the utterances keep their drawn peak level
        mix = speech + noise
        if self.band:
            mix = _band_pass(mix, *self.band_edges, rate)
        if self.band == "laptop":
            mix = pedalboard.PeakFilter(cutoff_frequency_hz=self.presence[0], gain_db=self.presence[1],
                                        q=1.0)(mix, rate)
        elif self.band == "phone":
            mix = pedalboard.GSMFullRateCompressor()(mix, rate)
        if self.gain_db:
            mix = mix * 10 ** (self.gain_db / 20)
        return np.clip(mix, -1.0, 1.0).astype(np.float32)
