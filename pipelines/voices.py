"""Real speech for tests and benchmarks: espeak-ng voices committed as fixtures.

``pipelines.synth`` makes speech-*like* signals (harmonic syllables); a voice activity detector
trained on real speech is right to call most of them non-speech. The speech gate is checked on
real voices instead: clips spoken by espeak-ng (several voices and speaking rates) and short
speaker-test style announcements ("Front Center", "Rear Left", ...), committed as small Ogg/Opus
files in ``tests/fixtures/voices/`` with a ``manifest.json`` saying how each was made. Nothing
needs espeak-ng (or any other system package) at test time; ``scripts/make_voice_fixtures.py``
regenerates the clips where espeak-ng is installed. A missing fixture is an error.

Only the tests (``tests/test_vad.py``, ``tests/test_speech_gate.py``) and
``benchmarks/speech_gate.py`` use this module: it finds the fixtures relative to the repository
checkout, so it does not work from an installed wheel. Every signal is an array of 16 kHz mono
float32.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import av
import numpy as np

from salmonn.config import SAMPLE_RATE

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "voices"
REGENERATE = "scripts/make_voice_fixtures.py regenerates them (needs espeak-ng)"

# Sentences of the talk (public-domain style prose, varied length and rhythm).
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
# espeak-ng voices (language[+variant]) and speaking rates (words per minute) of the clips: each
# sentence is spoken by every voice, at one rate, so that every voice speaks at every rate.
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en-gb-x-rp+m3", "en-029+f2")
RATES = (120, 160, 210, 260)
# The announcements, each ~1.2-1.6 s of one voice (as in ALSA's speaker test).
ANNOUNCEMENTS = ("Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Rear_Left", "Rear_Right",
                 "Side_Left", "Side_Right")


def read_audio(data: bytes | str) -> np.ndarray:
    """An audio file (path or bytes) -> 16 kHz mono float32 (channels averaged, soxr resampling)."""
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


@functools.lru_cache(maxsize=1)
def manifest() -> dict:
    """``tests/fixtures/voices/manifest.json``: every clip's file, text, voice, rate, amplitude
    and espeak-ng command line, and the encoder settings."""
    path = FIXTURES / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the voice fixtures are part of the repository; {REGENERATE}")
    return json.loads(path.read_text())


@functools.lru_cache(maxsize=1)
def _index() -> tuple[dict[tuple[int, str], dict], dict[str, dict]]:
    sentences: dict[tuple[int, str], dict] = {}
    announced: dict[str, dict] = {}
    for c in manifest()["clips"]:
        if c["kind"] == "sentence":
            sentences[(c["sentence"], c["voice"])] = c
        elif c["kind"] == "announcement":
            announced[c["name"]] = c
    missing = [f"sentence {s} / {v}" for s in range(len(SENTENCES)) for v in VOICES if (s, v) not in sentences]
    missing += [name for name in ANNOUNCEMENTS if name not in announced]
    wrong = [f"sentence {s}" for (s, _), c in sentences.items() if s >= len(SENTENCES) or c["text"] != SENTENCES[s]]
    if missing or wrong:
        raise FileNotFoundError(f"voice fixtures out of date (missing: {missing}, other text: {wrong}); {REGENERATE}")
    return sentences, announced


@functools.lru_cache(maxsize=128)
def _decoded(file: str) -> np.ndarray:
    path = FIXTURES / file
    if not path.is_file():
        raise FileNotFoundError(f"voice fixture {path} is missing; {REGENERATE}")
    x = read_audio(str(path))
    x.setflags(write=False)
    return x


def clips(voice: str | None = None, rate: int | None = None) -> list[tuple[int, str, int]]:
    """The spoken sentences, as (sentence index, voice, rate in wpm), optionally of one voice
    and/or one rate: every voice speaks every sentence, each at one of :data:`RATES`."""
    found = _index()[0]
    return [(s, v, found[(s, v)]["rate"]) for s in range(len(SENTENCES)) for v in VOICES
            if (voice is None or v == voice) and (rate is None or found[(s, v)]["rate"] == rate)]


def clip_rate(sentence: int, voice: str = "en-us") -> int:
    """The speaking rate (words per minute) of ``SENTENCES[sentence]`` in ``voice``."""
    return int(_index()[0][(sentence, voice)]["rate"])


def clip(sentence: int, voice: str = "en-us") -> np.ndarray:
    """``SENTENCES[sentence]`` spoken by espeak-ng in ``voice`` (at :func:`clip_rate`): (N,)
    float32, 16 kHz mono, with espeak-ng's silence before (tens of ms) and after (~0.4 s)."""
    return _decoded(_index()[0][(sentence, voice)]["file"]).copy()


def announcement(name: str = "Front_Center") -> np.ndarray:
    """One of the speaker-test style announcements (``ANNOUNCEMENTS``, 1.2-1.6 s of a voice)."""
    return _decoded(_index()[1][name]["file"]).copy()


def announcements() -> list[str]:
    """The names of the announcements, all of which :func:`announcement` gives."""
    _index()
    return list(ANNOUNCEMENTS)


def pink_noise(seconds: float, seed: int = 0, amplitude: float = 0.5) -> np.ndarray:
    """Pink (1/f) noise as a speaker test plays it, by the Voss-McCartney algorithm (16 rows of
    held uniform values, the row k changing every 2**k samples, plus a white row), peak
    ``amplitude``; deterministic for a ``seed``."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SAMPLE_RATE))
    x = rng.uniform(-1.0, 1.0, n)
    for k in range(16):
        x += np.repeat(rng.uniform(-1.0, 1.0, n // 2 ** k + 1), 2 ** k)[:n]
    x -= x.mean()
    return (amplitude * x / max(np.abs(x).max(), 1e-12)).astype(np.float32)


def talk(seconds: float, seed: int = 0, *, pause_s: tuple[float, float] = (0.3, 1.2),
         voices: tuple[str, ...] = VOICES, rates: tuple[int, ...] = RATES) -> tuple[np.ndarray, np.ndarray]:
    """About ``seconds`` of sentences (clips of ``voices`` at ``rates``, drawn at random)
    separated by pauses.

    Returns (samples (N,), voiced (N,) bool): ``voiced`` marks the spans of the sentences (from
    the first to the last sample above -50 dBFS of each), the ground truth for speech coverage.
    """
    pool = [(s, v) for s, v, r in clips() if v in voices and r in rates]
    if not pool:
        raise ValueError(f"no clip of voices {voices} at rates {rates}")
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SAMPLE_RATE))
    out = np.zeros(n, dtype=np.float32)
    voiced = np.zeros(n, dtype=bool)
    pos = int(rng.uniform(0.0, pause_s[1]) * SAMPLE_RATE)
    while pos < n:
        s = _decoded(_index()[0][pool[int(rng.integers(len(pool)))]]["file"])
        loud = np.flatnonzero(np.abs(s) > 10 ** (-50 / 20))
        if loud.size == 0:
            continue
        s = s[loud[0]:loud[-1] + 1]
        take = min(s.size, n - pos)
        out[pos:pos + take] = s[:take]
        voiced[pos:pos + take] = True
        pos += take + int(rng.uniform(*pause_s) * SAMPLE_RATE)
    return out, voiced
