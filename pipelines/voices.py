"""Real speech for tests and benchmarks: espeak-ng synthesis and the ALSA test voice.

``pipelines.synth`` makes speech-*like* signals (harmonic syllables); a voice activity detector
trained on real speech is right to call most of them non-speech. The speech gate is checked on
real voices instead: espeak-ng (Debian package ``espeak-ng``; several voices and speaking rates)
and the recorded voice of ALSA's speaker test (``alsa-utils``: ``/usr/share/sounds/alsa/*.wav``,
"Front Center", "Rear Left", ...). Both are arrays of 16 kHz mono float32.
"""

from __future__ import annotations

import functools
import glob
import io
import os
import shutil
import subprocess

import av
import numpy as np

from salmonn.config import SAMPLE_RATE

ALSA_SOUNDS = "/usr/share/sounds/alsa"
# ALSA's recordings of a voice naming each speaker; Noise.wav in the same folder is pink noise.
ALSA_VOICES = ("Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Rear_Left", "Rear_Right",
               "Side_Left", "Side_Right")

# Sentences for synthetic talk (public-domain style prose, varied length and rhythm).
SENTENCES = (
    "Welcome back to the show. Today we talk about how old radio archives are kept alive.",
    "The first thing you notice is how quiet the room is before anyone starts to speak.",
    "She said the recordings were made on tape in the spring of nineteen seventy two.",
    "If you listen closely, you can hear the train passing in the background.",
    "Our next guest has spent twenty years restoring damaged sound recordings.",
    "That is a great question, and honestly I do not think anybody knows the answer yet.",
    "Please remember to check the weather report before you leave for the airport.",
    "The committee will meet again on Thursday to discuss the new budget proposal.",
    "A small boat drifted slowly across the lake while the sun went down behind the hills.",
    "Numbers matter here: three hundred and forty seven files were missing from the index.",
    "Thank you all for listening, and we will see you again next week.",
    "He opened the door, looked around the empty kitchen, and called out her name twice.",
)
# espeak-ng voices (language[+variant]) and speaking rates (words per minute) to vary the talk.
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en-gb-x-rp+m3", "en-029+f2")
RATES = (120, 160, 210, 260)


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def have_alsa_voice() -> bool:
    return os.path.isfile(os.path.join(ALSA_SOUNDS, "Front_Center.wav"))


def read_wav(data: bytes | str) -> np.ndarray:
    """A WAV file (path or bytes) -> 16 kHz mono float32 (channels averaged, soxr resampling)."""
    import soxr

    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with av.open(src) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        chunks = [f.to_ndarray() for f in container.decode(stream)]
    fmt = stream.codec_context.format.name
    x = np.concatenate(chunks, axis=-1)
    if fmt.startswith("s16"):
        x = x.astype(np.float32) / 32768.0
    x = x.astype(np.float32)
    if x.ndim == 2 and x.shape[0] > 1 and not stream.codec_context.format.is_planar:
        x = x.reshape(-1, stream.codec_context.channels).T     # packed: (1, N * C) -> (C, N)
    x = x.reshape(-1, x.shape[-1]).mean(axis=0)
    if rate != SAMPLE_RATE:
        x = soxr.resample(x, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(x, dtype=np.float32)


@functools.lru_cache(maxsize=256)
def _espeak_cached(text: str, voice: str, wpm: int, amplitude: int) -> bytes:
    if not have_espeak():
        raise FileNotFoundError("espeak-ng is not installed (apt-get install espeak-ng)")
    out = subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-a", str(amplitude), "--stdout", text],
                         check=True, capture_output=True, timeout=120)
    return out.stdout


def espeak(text: str, voice: str = "en-us", wpm: int = 160, amplitude: int = 100) -> np.ndarray:
    """``text`` spoken by espeak-ng: (N,) float32, 16 kHz mono. Its leading and trailing silence
    are kept (a few tens of ms)."""
    return read_wav(_espeak_cached(text, voice, wpm, amplitude))


def alsa_voice(name: str = "Front_Center") -> np.ndarray:
    """One of ALSA's recorded speaker-test announcements (~1.3-1.5 s of a voice)."""
    return read_wav(os.path.join(ALSA_SOUNDS, f"{name}.wav"))


def alsa_voices() -> list[str]:
    return sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(ALSA_SOUNDS, "*.wav"))
                  if os.path.basename(p)[:-4] in ALSA_VOICES)


def talk(seconds: float, seed: int = 0, *, pause_s: tuple[float, float] = (0.3, 1.2),
         voices: tuple[str, ...] = VOICES, rates: tuple[int, ...] = RATES) -> tuple[np.ndarray, np.ndarray]:
    """About ``seconds`` of espeak sentences (voice and rate varying) separated by pauses.

    Returns (samples (N,), voiced (N,) bool): ``voiced`` marks the spans of the sentences (from
    the first to the last sample above -50 dBFS of each), the ground truth for speech coverage.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SAMPLE_RATE))
    out = np.zeros(n, dtype=np.float32)
    voiced = np.zeros(n, dtype=bool)
    pos = int(rng.uniform(0.0, pause_s[1]) * SAMPLE_RATE)
    while pos < n:
        s = espeak(SENTENCES[rng.integers(len(SENTENCES))], voices[rng.integers(len(voices))],
                   int(rates[rng.integers(len(rates))]))
        loud = np.flatnonzero(np.abs(s) > 10 ** (-50 / 20))
        if loud.size == 0:
            continue
        s = s[loud[0]:loud[-1] + 1]
        take = min(s.size, n - pos)
        out[pos:pos + take] = s[:take]
        voiced[pos:pos + take] = True
        pos += take + int(rng.uniform(*pause_s) * SAMPLE_RATE)
    return out, voiced
