"""16 kHz mono chunks -> windows with sample-accurate media times (and optional cuts at a quiet
frame or, through a hook, at a speech pause)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from pipelines.decode.common import DecodeOptions, Window

SNAP_SEARCH_S = 2.0                # a snapped cut moves back at most this far ...
SNAP_FRAME_S = 0.02                # ... to the centre of the quietest frame of this length
SILENCE_PEAK = 2.0 ** -15          # a window whose |peak| <= one 16-bit LSB is digital silence


class Windower:
    """Cuts a stream of 16 kHz mono chunks into windows, with sample-accurate times.

    Owns one preallocated buffer of ``window`` samples; :meth:`push` copies each chunk in and
    yields a :class:`Window` (a copy) whenever the buffer is full; :meth:`flush` yields the last,
    shorter window. Window k starts at sample ``offset_k`` and ``start_s = offset_k / sr``, so with
    hop == window the windows tile the stream exactly (``end_s`` of one == ``start_s`` of the
    next). With ``snap_to_silence`` each cut moves back to the centre of the quietest 20 ms frame
    within the last min(2 s, hop / 2) of the window; the next window starts there (minus the
    overlap, if hop < window).

    ``choose_cut(buffer, earliest)``, when given, is asked first where a full window ends: it
    returns a cut in [earliest, window] (earliest = window - hop / 2) or None for the default cut
    (``pipelines.vad.PauseCutter`` cuts at a speech pause).
    """

    def __init__(self, options: DecodeOptions = DecodeOptions(), file_id: str = "", uri: str = "",
                 choose_cut: Callable[[np.ndarray, int], int | None] | None = None):
        self.file_id, self.uri = file_id, uri
        self.choose_cut = choose_cut
        self.earliest_cut = options.window_samples - options.hop_samples // 2
        self.sample_rate = options.sample_rate
        self.window = options.window_samples
        self.overlap = self.window - options.hop_samples
        self.frame = max(1, round(SNAP_FRAME_S * self.sample_rate))
        search = min(round(SNAP_SEARCH_S * self.sample_rate), options.hop_samples // 2)
        self.snap_frames = search // self.frame if options.snap_to_silence else 0
        self._buf = np.empty(self.window, dtype=np.float32)
        self._fill = 0        # valid samples in _buf
        self._covered = 0     # leading samples of _buf already part of an emitted window
        self._offset = 0      # stream sample index of _buf[0]
        self.origin = 0       # media time of the first sample, in samples (set_origin)
        self.n_windows = 0
        self.n_samples = 0    # samples pushed so far

    def set_origin(self, samples: int) -> None:
        """Place the first sample at media time ``samples / sample_rate`` (a track that starts
        after its container does); only before the first push."""
        if self.n_samples:
            raise ValueError("set_origin after samples were pushed")
        self.origin = int(samples)

    def push(self, chunk: np.ndarray) -> Iterator[Window]:
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        self.n_samples += chunk.size
        pos = 0
        while pos < chunk.size:
            take = min(self.window - self._fill, chunk.size - pos)
            self._buf[self._fill:self._fill + take] = chunk[pos:pos + take]
            self._fill += take
            pos += take
            if self._fill == self.window:
                yield self._emit_full()

    def flush(self) -> Iterator[Window]:
        if self._fill > self._covered:
            yield self._make(self._fill)
            self._offset += self._fill
            self._fill = self._covered = 0

    def _emit_full(self) -> Window:
        cut = self.choose_cut(self._buf, self.earliest_cut) if self.choose_cut is not None else None
        if cut is None:
            cut = self._snap_cut() if self.snap_frames else self.window
        elif not self.earliest_cut <= cut <= self.window:
            raise ValueError(f"choose_cut returned {cut}, outside [{self.earliest_cut}, {self.window}]")
        window = self._make(cut)
        next_start = cut - self.overlap        # >= 1: the snap search stays within hop / 2
        keep = self._fill - next_start
        self._buf[:keep] = self._buf[next_start:self._fill]   # numpy handles the overlap
        self._offset += next_start
        self._fill = keep
        self._covered = cut - next_start
        return window

    def _snap_cut(self) -> int:
        n, f = self.snap_frames, self.frame
        region = self._buf[self.window - n * f:self.window].reshape(n, f)   # (frames, frame)
        energy = np.einsum("ij,ij->i", region, region)
        quiet = energy <= energy.min() * (1 + 1e-6) + 1e-12
        # The latest run of (equally) quietest frames; cut at its centre.
        run_end = int(np.flatnonzero(quiet)[-1])
        run_start = run_end
        while run_start > 0 and quiet[run_start - 1]:
            run_start -= 1
        centre = (run_start * f + (run_end + 1) * f) // 2
        return self.window - n * f + centre

    def _make(self, length: int) -> Window:
        samples = self._buf[:length].copy()
        start = self.origin + self._offset
        window = Window(
            file_id=self.file_id,
            uri=self.uri,
            segment_index=self.n_windows,
            start_s=start / self.sample_rate,
            end_s=(start + length) / self.sample_rate,
            samples=samples,
            is_silent=bool(length == 0 or np.abs(samples).max() <= SILENCE_PEAK),
        )
        self.n_windows += 1
        return window


def iter_windows(chunks: Iterable[np.ndarray], options: DecodeOptions = DecodeOptions(),
                 file_id: str = "", uri: str = "") -> Iterator[Window]:
    """Window an iterable of 16 kHz mono chunks (a pure function of the samples; for tests and
    for audio that is already decoded)."""
    windower = Windower(options, file_id, uri)
    for chunk in chunks:
        yield from windower.push(chunk)
    yield from windower.flush()


