"""pipelines.vad: silero-vad's packaged weights on real speech (espeak-ng voices and speaker-test
style announcements, committed as fixtures: ``pipelines.voices``) and real non-speech (tones,
noise, music-like signals, silence).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipelines import synth, voices
from pipelines import vad as V

SR = V.SAMPLE_RATE
WINDOW = 30 * SR
THRESHOLD = V.DEFAULT_SPEECH_THRESHOLD


@pytest.fixture(scope="module")
def detector() -> V.SpeechDetector:
    return V.SpeechDetector()


def _fit(x: np.ndarray, n: int = WINDOW) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    x = x.mean(axis=0) if x.ndim == 2 else x
    return np.resize(x, n) if x.size < n else x[:n]


def non_speech_windows() -> dict[str, np.ndarray]:
    """30 s of each kind of real non-speech the gate must turn away."""
    out = {f"tone {f} Hz": synth.tone(f, 30, SR)[0] for f in (60, 220, 1000, 3000)}
    out["tone bursts"] = synth.tone_bursts(440, 30, SR)[0]
    for color in ("white", "pink"):
        for amp in (0.01, 0.3):
            out[f"{color} noise {amp}"] = synth.noise(30, SR, 1, amp, color, seed=3)[0]
    for seed, bpm in ((0, 70), (1, 120), (2, 170), (3, 96)):
        out[f"music {bpm} bpm"] = _fit(synth.music_like(30, SR, 1, bpm=bpm, seed=seed))
    out["music + noise"] = _fit(synth.music_like(30, SR, 1, seed=4)) + synth.noise(30, SR, 1, 0.05, "pink")[0]
    out["digital silence"] = np.zeros(WINDOW, dtype=np.float32)
    out["dither"] = (np.random.default_rng(0).standard_normal(WINDOW) * 1e-4).astype(np.float32)
    out["pink noise (Voss-McCartney)"] = voices.pink_noise(30, seed=0)
    return out


# --- the model and its framing ----------------------------------------------------------------

def test_weights_are_the_packaged_files_and_load_offline():
    for runtime in V.RUNTIMES:
        path = V.weights_path(runtime)
        assert os.path.isfile(path) and os.sep + "silero_vad" + os.sep in path
    with pytest.raises(ValueError):
        V.weights_path("tflite")


def test_model_input_frames_carry_the_previous_context():
    x = np.arange(1, 2 * V.FRAME + 101, dtype=np.float32)      # 2 full frames + 100 samples
    blocks = V.model_input(x)                                   # (3, 576)
    assert blocks.shape == (3, V.CONTEXT + V.FRAME)
    assert not blocks[0, :V.CONTEXT].any()                      # nothing before the first frame
    np.testing.assert_array_equal(blocks[1, :V.CONTEXT], x[V.FRAME - V.CONTEXT:V.FRAME])
    np.testing.assert_array_equal(blocks[1, V.CONTEXT:], x[V.FRAME:2 * V.FRAME])
    np.testing.assert_array_equal(blocks[2, V.CONTEXT:V.CONTEXT + 100], x[2 * V.FRAME:])
    assert not blocks[2, V.CONTEXT + 100:].any()                # the last frame is zero-padded


def test_onnx_sequence_model_matches_the_torchscript_model():
    """The default runtime (one onnxruntime call per window) and the reference TorchScript model
    (batched over windows, one call per frame) give the same probabilities, windows of any length."""
    speech, _ = voices.talk(12, seed=5)
    music = _fit(synth.music_like(7.3, SR, 1), int(7.3 * SR))
    windows = [speech, music, speech[:1234], np.zeros(0, dtype=np.float32)]
    onnx = V.SpeechDetector("onnx").probabilities_batch(windows)
    jit = V.SpeechDetector("jit").probabilities_batch(windows)
    for w, a, b in zip(windows, onnx, jit, strict=True):
        assert a.shape == b.shape == (V.frame_count(w.size),)
        np.testing.assert_allclose(a, b, atol=1e-3)
    assert onnx[0].max() > 0.9 and onnx[1].max() < 0.5      # it is a real VAD, not zeros


# --- the segment rules ------------------------------------------------------------------------

def test_speech_frames_follow_silero_segment_rules():
    p = np.zeros(60, dtype=np.float32)
    p[5:8] = 0.9                       # 3 frames of speech: shorter than MIN_SPEECH_FRAMES, dropped
    p[20:40] = 0.9                     # a segment ...
    p[28:30] = 0.1                     # ... with a 2-frame dip: too short to end it
    p[40:43] = 0.4                     # between the thresholds: speech goes on (hysteresis)
    m = V.speech_frames(p)
    assert not m[:19].any()
    assert m[19:44].all()              # 20..42, padded by one frame each side
    assert not m[44:].any()
    p2 = p.copy()
    p2[28:34] = 0.1                    # a 6-frame pause does end it: two segments of 8 and 9 frames
    m2 = V.speech_frames(p2)
    assert m2[20:28].all() and not m2[29:33].any() and m2[34:43].all()
    assert V.ratio_of(m, 60 * V.FRAME) == pytest.approx(25 / 60)
    assert V.ratio_of(np.ones(3, bool), 1000) == 1.0           # the last frame is partial
    assert V.ratio_of(np.zeros(0, bool), 0) == 0.0


def test_longest_pause_prefers_the_longest_then_the_latest():
    m = np.ones(40, dtype=bool)
    m[5:15] = False                    # 10 frames, but before `first`
    m[22:25] = False                   # 3
    m[30:33] = False                   # 3, later: the tie goes to it
    assert V.longest_pause(m, first=20) == (30, 33)
    m[26:28] = False
    m[35:36] = False
    assert V.longest_pause(m, first=20) == (30, 33)
    assert V.longest_pause(np.ones(10, bool)) is None
    assert V.longest_pause(m, first=20, min_frames=4) is None


# --- real speech and real non-speech ----------------------------------------------------------

@pytest.mark.parametrize("voice", voices.VOICES)
def test_espeak_voices_at_every_rate_are_speech(detector, voice):
    """Each voice's sentences at each rate, one after the other (espeak-ng's silences between)."""
    for wpm in voices.RATES:
        sentences = [s for s, _, _ in voices.clips(voice=voice, rate=wpm)]
        assert len(sentences) >= 2, (voice, wpm)
        x = np.concatenate([voices.clip(s, voice) for s in sentences])
        ratio = detector.speech_ratio(x)
        assert ratio >= 0.6, (voice, wpm, ratio)


def test_announcements_are_speech(detector):
    assert len(voices.announcements()) == 8
    for name in voices.announcements():
        a = voices.announcement(name)
        one = np.zeros(WINDOW, dtype=np.float32)
        one[3 * SR:3 * SR + a.size] = a              # one 1.2-1.6 s announcement in 30 s of silence
        seconds = detector.speech_ratio(one) * 30
        assert seconds >= 0.7, (name, seconds)
        assert detector.speech_ratio(one) >= THRESHOLD, name


def test_non_speech_has_no_speech(detector):
    ratios = {name: detector.speech_ratio(x) for name, x in non_speech_windows().items()}
    assert all(r < THRESHOLD for r in ratios.values()), ratios
    assert max(ratios.values()) == 0.0, ratios


def test_recall_on_windows_with_at_least_20_percent_speech(detector):
    """Acceptance: windows whose voiced share is >= 20% keep their speech tasks (ratio >=
    the default threshold) in >= 98% of cases, over music beds, noise and silence."""
    rng = np.random.default_rng(7)
    backgrounds = [np.zeros(WINDOW, np.float32),
                   0.3 * _fit(synth.music_like(30, SR, 1, seed=1)),
                   0.6 * _fit(synth.music_like(30, SR, 1, bpm=150, seed=2)),
                   synth.noise(30, SR, 1, 0.05, "pink", seed=1)[0],
                   synth.noise(30, SR, 1, 0.1, "white", seed=2)[0]]
    kept, truth = [], []
    for i in range(60):
        frac = rng.uniform(0.2, 1.0)
        speech, voiced = voices.talk(30 * frac + 1.0, seed=1000 + i)
        n = min(speech.size, WINDOW)
        start = int(rng.integers(0, WINDOW - n + 1))
        x = backgrounds[i % len(backgrounds)].copy()
        x[start:start + n] += speech[:n] * rng.uniform(0.1, 1.0)
        share = voiced[:n].sum() / WINDOW
        if share < 0.2:
            continue
        truth.append(share)
        kept.append(detector.speech_ratio(x) >= THRESHOLD)
    assert len(kept) >= 45
    recall = sum(kept) / len(kept)
    assert recall >= 0.98, (recall, len(kept))


def test_pause_cutter_cuts_inside_a_pause(detector):
    """A window cut by PauseCutter ends in silence between sentences, never inside one; talk
    without pauses (or music) keeps the default cut."""
    cutter = V.PauseCutter(detector)
    cuts = 0
    for seed in range(6):
        x, voiced = voices.talk(30, seed=50 + seed, pause_s=(0.4, 1.0))
        earliest = WINDOW - 15 * SR
        cut = cutter(x, earliest)
        if cut is None:
            continue
        cuts += 1
        assert WINDOW - V.PAUSE_SEARCH_S * SR <= cut <= WINDOW
        assert not voiced[max(0, cut - 800):cut + 800].any(), (seed, cut / SR)   # 50 ms either side
    assert cuts >= 5
    assert cutter.cuts == cuts
    # No speech in the last seconds (music, silence): nothing to protect, the cut stays.
    assert cutter(_fit(synth.music_like(30, SR, 1)), WINDOW - 15 * SR) is None
    assert cutter(np.zeros(WINDOW, np.float32), WINDOW - 15 * SR) is None


def test_detector_cost_is_recorded(detector):
    before = detector.seconds_seen
    detector.speech_ratios([np.zeros(SR, np.float32), np.zeros(2 * SR, np.float32)])
    assert detector.seconds_seen - before == pytest.approx(3.0)
