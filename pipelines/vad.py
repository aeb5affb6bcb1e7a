"""Voice activity detection with silero-vad's packaged weights (offline: no hub, no download).

The ``silero-vad`` wheel ships the model as TorchScript (``silero_vad.jit``) and ONNX files. The
model looks at 512-sample frames of 16 kHz audio (32 ms), each with the 64 samples before it, and
carries an LSTM state from frame to frame; it returns one speech probability per frame.

Two runtimes, same weights, same probabilities (within ~1e-4):

* ``"onnx"`` (default): the wheel's *sequence* export (``silero_vad_16k_sequence.onnx``), which
  takes all the frames of a window in one onnxruntime call (the convolutional front-end runs on
  every frame at once, only the LSTM steps through them). Measured on one CPU thread: ~900x real
  time per CPU-second, as fast as the per-frame ONNX model batched over 8 windows and 1.5x the
  TorchScript model batched over 8 windows (~600x); 5x the TorchScript model fed one frame at a
  time (~170x). It needs no batch of windows to be fast, so a decode actor runs it on each window
  as the window is cut (``benchmarks/speech_gate.py`` has the figures).
* ``"jit"``: the TorchScript model, batched over windows (one call per frame for the whole batch),
  on any torch device; the reference the ONNX path is checked against.

A window's *speech ratio* is the fraction of its duration inside speech segments, found from the
frame probabilities the way silero's ``get_speech_timestamps`` finds them: speech starts at a
frame with probability >= ``threshold``, ends after ``MIN_SILENCE_S`` below ``threshold - 0.15``;
segments shorter than ``MIN_SPEECH_S`` are dropped and the rest padded by one frame each side.

Importing the ``silero_vad`` package sets torch's thread count to 1 for the whole process, so
this module finds the weight files without importing it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Sequence

import numpy as np

from salmonn.config import SAMPLE_RATE  # 16 kHz: the VAD model's 16 kHz branch, and the windows' rate

log = logging.getLogger(__name__)

FRAME = 512                         # samples per VAD frame (32 ms at 16 kHz)
CONTEXT = 64                        # samples of the previous frame each frame is given
FRAME_S = FRAME / SAMPLE_RATE
SPEECH_PROB = 0.5                   # a frame at or above this probability starts speech ...
HYSTERESIS = 0.15                   # ... which ends below SPEECH_PROB - HYSTERESIS (silero's default)
MIN_SILENCE_S = 0.1                 # speech ends after this long below the lower threshold
MIN_SPEECH_S = 0.25                 # shorter speech segments are dropped
MIN_SILENCE_FRAMES = int(np.ceil(MIN_SILENCE_S / FRAME_S))   # 4
MIN_SPEECH_FRAMES = int(np.ceil(MIN_SPEECH_S / FRAME_S))     # 8
PAD_FRAMES = 1                      # each kept segment grows by one frame (32 ms) on both sides
MAX_FRAMES_PER_CALL = 2048          # ~65 s of audio per onnxruntime call; the LSTM state carries over
STATE = 128                         # LSTM width

# The speech gate's default: a window is "speech" when at least 2% of it (0.6 s of 30 s) lies in
# speech segments. Measured (benchmarks/speech_gate.py --calibrate): tones, white/pink noise,
# music-like signals and silence give 0.000 (no frame reaches 0.35); one 1.3-1.5 s spoken
# announcement in 30 s gives 0.039-0.048 (ALSA's recorded 1.4 s voice gave 0.035-0.044); windows
# with >= 20% espeak speech give >= 0.15.
DEFAULT_SPEECH_THRESHOLD = 0.02

# What the config hash records about the detector: a change here changes which windows are gated.
VAD_ID = f"silero-vad v6 16k, p>={SPEECH_PROB}, min speech {MIN_SPEECH_S}s, min silence {MIN_SILENCE_S}s"

RUNTIMES = ("onnx", "jit")
WEIGHT_FILES = {"onnx": "silero_vad_16k_sequence.onnx", "jit": "silero_vad.jit"}

# --cut-at-pauses: a window's cut moves to the centre of the longest pause in its last
# PAUSE_SEARCH_S (at most hop / 2); the VAD for it starts PAUSE_WARMUP_S earlier so its LSTM state
# has seen some audio first.
PAUSE_SEARCH_S = 5.0
PAUSE_WARMUP_S = 2.0
MIN_PAUSE_FRAMES = 2                # a pause shorter than this (64 ms) is not a place to cut


def weights_path(runtime: str = "onnx") -> str:
    """Path of the packaged weight file for ``runtime`` (inside the installed ``silero_vad``)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    spec = importlib.util.find_spec("silero_vad")   # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the speech gate needs the silero-vad package: pip install silero-vad")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", WEIGHT_FILES[runtime])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"silero-vad weights not found at {path} (reinstall silero-vad)")
    return path


def frame_count(n_samples: int) -> int:
    """Frames covering ``n_samples`` (the last one zero-padded)."""
    return -(-n_samples // FRAME)


def model_input(samples: np.ndarray) -> np.ndarray:
    """(N,) float32 -> (F, CONTEXT + FRAME): each frame with the CONTEXT samples before it
    (zeros before the first), the last frame zero-padded: what the sequence model takes."""
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    n_frames = frame_count(samples.size)
    frames = np.zeros((n_frames, FRAME), dtype=np.float32)     # (F, FRAME)
    frames.reshape(-1)[:samples.size] = samples                 # (a view: frames is contiguous)
    out = np.zeros((n_frames, CONTEXT + FRAME), dtype=np.float32)
    out[:, CONTEXT:] = frames
    out[1:, :CONTEXT] = frames[:-1, FRAME - CONTEXT:]
    return out


class SpeechDetector:
    """silero-vad on 16 kHz mono float32 windows: per-frame probabilities, speech masks, ratios.

    ``runtime``: "onnx" (default; one onnxruntime call per window, one CPU thread) or "jit"
    (TorchScript, batched over the windows of a call, on ``device``). Not thread-safe (the JIT
    model keeps its state between frames); one per actor.
    """

    def __init__(self, runtime: str = "onnx", *, device: str = "cpu", threshold: float = SPEECH_PROB):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.runtime = runtime
        self.device = device
        self.threshold = threshold
        path = weights_path(runtime)
        if runtime == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1     # a decode actor is one CPU
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        else:
            import torch

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)   # torch.jit.load's deprecation notice
                self._jit = torch.jit.load(path, map_location=device)
            self._jit.eval()
        self.seconds_seen = 0.0   # audio run through the model (for cost figures)

    # -- probabilities --------------------------------------------------------------------------
    def probabilities(self, samples: np.ndarray) -> np.ndarray:
        """(N,) 16 kHz float32 -> (F,) float32 speech probabilities, F = ceil(N / FRAME)."""
        return self.probabilities_batch([samples])[0]

    def probabilities_batch(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per-window probabilities; each window starts from a fresh model state."""
        self.seconds_seen += sum(np.asarray(w).size for w in windows) / SAMPLE_RATE
        if self.runtime == "onnx":
            return [self._onnx(np.asarray(w, dtype=np.float32).reshape(-1)) for w in windows]
        return self._jit_batch(windows)

    def _onnx(self, samples: np.ndarray) -> np.ndarray:
        if samples.size == 0:
            return np.zeros(0, dtype=np.float32)
        blocks = model_input(samples)                                    # (F, 576)
        h = np.zeros((1, 1, STATE), dtype=np.float32)
        c = np.zeros((1, 1, STATE), dtype=np.float32)
        out = []
        for first in range(0, len(blocks), MAX_FRAMES_PER_CALL):
            probs, h, c = self._session.run(["speech_probs", "hn", "cn"],
                                            {"input": blocks[first:first + MAX_FRAMES_PER_CALL], "h": h, "c": c})
            out.append(probs.reshape(-1))
        return np.concatenate(out).astype(np.float32, copy=False)

    def _jit_batch(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch

        counts = [frame_count(np.asarray(w).size) for w in windows]
        if not windows or max(counts) == 0:
            return [np.zeros(n, dtype=np.float32) for n in counts]
        x = np.zeros((len(windows), max(counts) * FRAME), dtype=np.float32)   # (W, F * FRAME)
        for i, w in enumerate(windows):
            w = np.asarray(w, dtype=np.float32).reshape(-1)
            x[i, :w.size] = w
        xt = torch.from_numpy(x).to(self.device)
        probs = []
        with torch.inference_mode():
            self._jit.reset_states()
            for f in range(max(counts)):
                probs.append(self._jit(xt[:, f * FRAME:(f + 1) * FRAME], SAMPLE_RATE))   # (W, 1)
        p = torch.cat(probs, dim=1).float().cpu().numpy()                               # (W, F)
        return [p[i, :n].copy() for i, n in enumerate(counts)]

    # -- decisions ------------------------------------------------------------------------------
    def speech_mask(self, samples: np.ndarray) -> np.ndarray:
        """(F,) bool: the frames inside speech segments."""
        return speech_frames(self.probabilities(samples), self.threshold)

    def speech_ratio(self, samples: np.ndarray) -> float:
        """Fraction of the window's duration inside speech segments, in [0, 1]."""
        return self.speech_ratios([samples])[0]

    def measure(self, samples: np.ndarray) -> tuple[float, list[tuple[float, float]]]:
        """(speech ratio, speech spans in seconds from the window's start) of one window."""
        mask = self.speech_mask(samples)
        n = np.asarray(samples).size
        return ratio_of(mask, n), speech_spans(mask, n)

    def speech_ratios(self, windows: Sequence[np.ndarray]) -> list[float]:
        return [ratio_of(speech_frames(p, self.threshold), np.asarray(w).size)
                for p, w in zip(self.probabilities_batch(windows), windows, strict=True)]


def speech_frames(probs: np.ndarray, threshold: float = SPEECH_PROB) -> np.ndarray:
    """(F,) probabilities -> (F,) bool mask of speech segments (hysteresis, minimum silence and
    speech lengths, one frame of padding: the rules of silero's ``get_speech_timestamps``)."""
    probs = np.asarray(probs, dtype=np.float32).reshape(-1)
    n = probs.size
    mask = np.zeros(n, dtype=bool)
    low = threshold - HYSTERESIS
    segments: list[tuple[int, int]] = []
    start = -1            # first frame of the current segment; -1: not in speech
    quiet_from = -1       # first frame of the current run below `low` inside a segment
    for i in np.flatnonzero((probs >= threshold) | (probs < low)):   # the frames that change anything
        p = probs[i]
        if p >= threshold:
            quiet_from = -1
            if start < 0:
                start = i
        elif start >= 0:
            if quiet_from < 0:
                quiet_from = i
            if i - quiet_from + 1 >= MIN_SILENCE_FRAMES:
                segments.append((start, quiet_from))
                start = quiet_from = -1
    if start >= 0:
        segments.append((start, n))        # speech runs to the end (a short quiet tail included)
    for s, e in segments:
        if e - s >= MIN_SPEECH_FRAMES:
            mask[max(0, s - PAD_FRAMES):min(n, e + PAD_FRAMES)] = True
    return mask


def speech_spans(mask: np.ndarray, n_samples: int) -> list[tuple[float, float]]:
    """(start_s, end_s) of each speech segment of ``mask``, in seconds from the window's start (the
    last frame cut to ``n_samples``): where words may be (``salmonn.timing.place_words``)."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], np.asarray(mask, bool), [False])).astype(np.int8)))
    end = n_samples / SAMPLE_RATE
    return [(min(end, a * FRAME / SAMPLE_RATE), min(end, b * FRAME / SAMPLE_RATE))
            for a, b in zip(edges[::2], edges[1::2])]


def ratio_of(mask: np.ndarray, n_samples: int) -> float:
    """Fraction of ``n_samples`` covered by the speech frames of ``mask`` (the last frame may be
    partial)."""
    if n_samples <= 0:
        return 0.0
    return float(min(1.0, int(np.count_nonzero(mask)) * FRAME / n_samples))


def longest_pause(mask: np.ndarray, first: int = 0, min_frames: int = MIN_PAUSE_FRAMES) -> tuple[int, int] | None:
    """The longest run of non-speech frames that starts at or after frame ``first`` (ties: the
    latest), as (start, end) frame indices; None when there is none of ``min_frames``."""
    quiet = ~np.asarray(mask, dtype=bool)
    quiet[:max(0, first)] = False
    if not quiet.any():
        return None
    edges = np.diff(np.concatenate(([0], quiet.view(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    lengths = ends - starts
    best = int(np.flatnonzero(lengths == lengths.max())[-1])
    if lengths[best] < min_frames:
        return None
    return int(starts[best]), int(ends[best])


class PauseCutter:
    """A Windower cut hook: the centre of the longest speech pause in the last ``search_s`` of a
    full window buffer (never before ``earliest``); None (keep the default cut) when there is no
    pause there, e.g. continuous speech or continuous music."""

    def __init__(self, detector: SpeechDetector, search_s: float = PAUSE_SEARCH_S,
                 warmup_s: float = PAUSE_WARMUP_S):
        self.detector = detector
        self.search = round(search_s * SAMPLE_RATE)
        self.warmup = round(warmup_s * SAMPLE_RATE)
        self.cuts = 0        # windows cut at a pause
        self.kept = 0        # windows whose cut stayed where it was (no pause found)

    def __call__(self, buf: np.ndarray, earliest: int) -> int | None:
        n = buf.size
        lo = max(earliest, n - self.search)                 # first sample a cut may fall on
        origin = max(0, lo - self.warmup)                   # where the VAD starts
        mask = self.detector.speech_mask(buf[origin:])
        first = -(-(lo - origin) // FRAME)                  # first frame wholly after lo
        pause = longest_pause(mask, first) if mask[first:].any() else None   # no speech: nothing to protect
        if pause is None:
            self.kept += 1
            return None
        centre = origin + (pause[0] + pause[1]) * FRAME // 2
        self.cuts += 1
        return int(min(max(centre, lo), n))
