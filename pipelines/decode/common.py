"""The decode stage's options, what it yields (windows and one FileInfo per file) and its
per-file verdict, shared by the parts of :mod:`pipelines.decode`."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from salmonn.config import SAMPLE_RATE  # 16 kHz: what Whisper and BEATs (and so SALMONN) take

MAX_WINDOW_S = 30.0                # Whisper's context


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class DecodeOptions:
    window_s: float = 30.0            # never above 30 (Whisper's context)
    hop_s: float | None = None        # None = window_s (no overlap); 0 < hop <= window
    snap_to_silence: bool = False     # move each cut to the quietest 20 ms in the 2 s before it
    channel_mode: str = "mix"         # "mix": down-mix to mono | "first": channel 0 only
    max_duration_s: float = 12 * 3600
    max_bytes: int | None = 20 * 2**30
    block_size: int = 4 * 2**20       # fsspec read block (s3fs' 50 MiB default fetches files whole)
    sample_rate: int = SAMPLE_RATE    # output rate

    def __post_init__(self):
        # Messages start with the field's name: the CLI turns it into the flag (--window-s ...).
        if not (_is_number(self.window_s) and 0 < self.window_s <= MAX_WINDOW_S):
            raise ValueError(f"window_s: must be in (0, {MAX_WINDOW_S:g}] seconds (the model's context), "
                             f"got {self.window_s!r}")
        if self.hop_s is not None and not (_is_number(self.hop_s) and 0 < self.hop_s <= self.window_s):
            raise ValueError(f"hop_s: must be in (0, window_s={self.window_s:g}] seconds, got {self.hop_s!r}")
        if self.channel_mode not in ("mix", "first"):
            raise ValueError(f"channel_mode: must be 'mix' or 'first', got {self.channel_mode!r}")
        if not (_is_number(self.max_duration_s) and self.max_duration_s > 0):
            raise ValueError(f"max_duration_s: must be a finite number of seconds > 0, got {self.max_duration_s!r}")
        if self.max_bytes is not None and not (_is_int(self.max_bytes) and self.max_bytes > 0):
            raise ValueError(f"max_bytes: must be an integer > 0 (or None), got {self.max_bytes!r}")
        if not (_is_int(self.block_size) and self.block_size > 0):
            raise ValueError(f"block_size: must be an integer > 0, got {self.block_size!r}")
        if not (_is_int(self.sample_rate) and self.sample_rate > 0):
            raise ValueError(f"sample_rate: must be an integer > 0, got {self.sample_rate!r}")
        if round(self.window_s * self.sample_rate) < 1:
            raise ValueError(f"window_s: shorter than one sample, got {self.window_s!r}")
        if self.hop_s is not None and round(self.hop_s * self.sample_rate) < 1:
            raise ValueError(f"hop_s: shorter than one sample, got {self.hop_s!r}")
        if math.floor(self.max_duration_s * self.sample_rate) < 1:
            raise ValueError(f"max_duration_s: shorter than one sample, got {self.max_duration_s!r}")

    @property
    def window_samples(self) -> int:
        return round(self.window_s * self.sample_rate)

    @property
    def hop_samples(self) -> int:
        return round((self.hop_s if self.hop_s is not None else self.window_s) * self.sample_rate)

    @property
    def max_samples(self) -> int:
        return math.floor(self.max_duration_s * self.sample_rate)


@dataclass(frozen=True, eq=False)
class Window:
    """One window of a file: samples[(start_s * sr):(end_s * sr)] of its 16 kHz mono audio."""

    file_id: str
    uri: str
    segment_index: int
    start_s: float
    end_s: float
    samples: np.ndarray   # (N,) float32, 16 kHz mono, N <= window
    is_silent: bool       # digital silence: no sample above one 16-bit LSB


@dataclass(frozen=True)
class FileInfo:
    """The last item decode_file yields for a file: how it went and what it was."""

    file_id: str
    uri: str
    status: str                 # "ok" | "partial" | "error"
    error_type: str | None
    error_message: str | None
    container: str | None       # FFmpeg demuxer name, e.g. "mp3", "mov,mp4,m4a,3gp,3g2,mj2"
    codec: str | None           # e.g. "mp3", "aac", "opus", "pcm_s16le"
    sample_rate_in: int | None
    channels_in: int | None
    duration_s: float | None    # decoded (output) duration; None when nothing was decoded
    n_segments: int             # windows yielded
    audio_stream: int | None = None   # index of the decoded audio stream in its container


class Reject(Exception):
    """A per-file verdict reached by our own checks (file kind, size, streams, the cap)."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
