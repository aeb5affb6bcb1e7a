"""Decoded PyAV frames -> 16 kHz mono float32: down-mix (or channel 0), resampling (soxr's
streaming resampler; libswresample for surround down-mixes), NaN/inf samples counted and
replaced by silence."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Iterator

import av
import numpy as np

# Summing float channels may overflow to inf on a hostile file; decode counts and replaces those
# samples (non_finite_samples), so numpy's warning about it adds nothing.
warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning,
                        module=r"pipelines\.decode\.mono")

# Normalise the down-mix matrix so its gains sum to 1 (the default leaves float output
# unnormalised: stereo -> 0.707 * (L + R), 5.1 -> up to 3.4x the input level).
_MIX_OPTIONS = {"rematrix_maxval": "1.0"}


# Sample formats the numpy fast path reads: FFmpeg name (packed form) -> (dtype, scale to
# [-1, 1], offset of the zero level).
_SAMPLE_FORMATS = {
    "flt": (np.float32, 1.0, 0.0), "dbl": (np.float64, 1.0, 0.0), "s16": (np.int16, 1 / 32768, 0.0),
    "s32": (np.int32, 1 / 2**31, 0.0), "u8": (np.uint8, 1 / 128, 128.0), "s64": (np.int64, 1 / 2**63, 0.0),
}
RESAMPLE_CHUNK = 16384   # input samples gathered before one soxr call (~0.4 s at 44.1 kHz)
MAX_RESAMPLED = 2**20    # output samples one soxr call may make (4 MiB of float32)
_NOTHING = ()


class ToMono16k:
    """Decoded frames -> 16 kHz mono float32 arrays.

    Fast path (mono, stereo and layouts without channel positions in "mix" mode; any layout in
    "first" mode): each frame's planes are read as numpy views and summed (or channel 0 copied)
    straight into a gather buffer; once it holds ``RESAMPLE_CHUNK`` samples, the chunk is scaled
    to [-1, 1] and averaged over the channels in one vectorised step and resampled by soxr's
    streaming HQ resampler. Per frame that is a couple of C calls and no temporary arrays, where a
    libswresample filter-graph round trip per 1024-sample frame cost more than the decoding.

    Surround layouts in "mix" mode go through libswresample instead, whose standard down-mix
    matrix (normalised so the gains sum to 1; LFE left out) is the right mix for them. A frame
    whose format/layout/rate differs from the previous one (streams may change mid-way) flushes
    the current resampler and starts a new one.
    """

    def __init__(self, rate: int, mode: str):
        self.rate, self.mode = rate, mode
        self._key = None
        self._resampler = None      # libswresample (surround down-mix)
        self._soxr = None           # soxr stream, or _Passthrough at the output rate (fast path)
        self._gather = None         # _Gather: frame -> samples in the buffer (fast path)
        self._buf = np.empty(2 * RESAMPLE_CHUNK, dtype=np.float32)
        self._fill = 0
        self.non_finite = 0                   # NaN/inf samples replaced by silence so far ...
        self.first_non_finite_offset_s = 0.0  # ... the first this far into the chunk it was in

    def feed(self, frame) -> Iterable[np.ndarray]:
        """Take one frame; return the 16 kHz chunks that are ready (usually none; a list, or an
        iterator that resamples as it is consumed when the output is big)."""
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        ready = _NOTHING
        if key != self._key:
            ready = self.flush()
            self._key = key
            self._start(frame)
        if self._soxr is None:
            return _join(ready, [self._finite(np.frombuffer(out.planes[0], dtype=np.float32, count=out.samples),
                                              self.rate)
                                 for out in self._resampler.resample(frame)])
        n = frame.samples
        end = self._fill + n
        if end > self._buf.size:
            grown = np.empty(max(2 * self._buf.size, end), dtype=np.float32)
            grown[:self._fill] = self._buf[:self._fill]
            self._buf = grown
        self._gather(frame, self._buf[self._fill:end], n)
        self._fill = end
        if end >= RESAMPLE_CHUNK:
            return _join(ready, self._resample(last=False))
        return ready

    def drain(self) -> Iterable[np.ndarray]:
        """Resample what is gathered so far (the stream goes on)."""
        return self._resample(last=False) if self._soxr is not None else []

    def flush(self) -> Iterable[np.ndarray]:
        """End of the stream (or of one format): everything still held, resampled."""
        out: Iterable[np.ndarray] = []
        if self._soxr is not None:
            out = self._resample(last=True)
            self._soxr = None
        if self._resampler is not None:
            out = [self._finite(np.frombuffer(o.planes[0], dtype=np.float32, count=o.samples), self.rate)
                   for o in self._resampler.resample(None)]
            self._resampler = None
        self._key = None
        return out

    def _start(self, frame) -> None:
        import soxr

        fmt = frame.format
        packed = fmt.packed.name if fmt.is_planar else fmt.name
        channels = len(frame.layout.channels)
        positionless = frame.layout.name.endswith("channels")
        fast = packed in _SAMPLE_FORMATS and (self.mode == "first" or channels <= 2 or positionless)
        if fast:
            self._gather = _Gather(packed, fmt.is_planar, channels, first=self.mode == "first")
            if frame.sample_rate == self.rate:
                self._soxr = _Passthrough()
            else:
                self._soxr = soxr.ResampleStream(frame.sample_rate, self.rate, 1, dtype="float32", quality="HQ")
        else:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self.rate,
                                                options=_MIX_OPTIONS)

    def _resample(self, last: bool) -> Iterable[np.ndarray]:
        chunk = self._buf[:self._fill]
        self._gather.to_unit(chunk)
        if self._gather.floating:     # integer samples are always finite
            self._finite(chunk, self._key[2])
        self._fill = 0
        rate = self._key[2]
        step = max(1, MAX_RESAMPLED * rate // self.rate)    # input samples per bounded output
        if chunk.size > step:
            # A very low input rate (a header claiming 1 Hz) would make one call's output huge:
            # hand it out a bounded piece at a time, as the caller consumes it.
            return _resample_pieces(self._soxr, chunk.copy(), step, last)
        out = self._soxr.resample_chunk(chunk, last=last)   # a new array: the buffer is reused
        return [out] if out.size else []


    def _finite(self, x: np.ndarray, rate: int) -> np.ndarray:
        """``x`` with NaN and +-inf replaced by 0 (silence; in place where ``x`` is writable),
        counted: a float file may hold them, and a sum of channels may overflow to them."""
        if math.isfinite(float(np.dot(x, x))):   # NaN or inf anywhere makes it non-finite
            return x
        bad = ~np.isfinite(x)
        n = int(np.count_nonzero(bad))
        if n:
            if not x.flags.writeable:
                x = x.copy()
            if not self.non_finite:
                self.first_non_finite_offset_s = int(np.argmax(bad)) / rate
            self.non_finite += n
            x[bad] = 0.0
        return x


def _resample_pieces(stream, chunk: np.ndarray, step: int, last: bool) -> Iterator[np.ndarray]:
    for i in range(0, chunk.size, step):
        out = stream.resample_chunk(chunk[i:i + step], last=last and i + step >= chunk.size)
        if out.size:
            yield out


def _join(a: Iterable[np.ndarray], b: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    if isinstance(a, (list, tuple)) and isinstance(b, list):
        return [*a, *b]
    return itertools.chain(a, b)


class _Passthrough:
    """Stands in for the resampler when the input is already at the output rate."""

    @staticmethod
    def resample_chunk(x: np.ndarray, last: bool = False) -> np.ndarray:
        return x.copy()


class _Gather:
    """Reads frames of one sample format and layout into a float32 buffer as the sum of the
    channels (or channel 0 alone, in "first" mode or for mono), without temporaries;
    :meth:`to_unit` then turns a gathered chunk into mono in [-1, 1] in place:
    (sum - channels * offset) * scale / channels."""

    def __init__(self, packed: str, planar: bool, channels: int, *, first: bool):
        self.dtype, scale, offset = _SAMPLE_FORMATS[packed]
        self.planar, self.channels = planar, channels
        self.floating = np.issubdtype(self.dtype, np.floating)
        self.summed = 1 if first else channels       # channels added into each sample
        self.gain = np.float32(scale / self.summed)
        self.bias = np.float32(-offset * self.summed)

    def __call__(self, frame, out: np.ndarray, n: int) -> None:
        dtype, summed = self.dtype, self.summed
        if self.planar:
            planes = frame.planes
            if summed == 2 and self.floating:     # (integers would overflow before the cast)
                np.add(np.frombuffer(planes[0], dtype=dtype, count=n),
                       np.frombuffer(planes[1], dtype=dtype, count=n), out=out)
                return
            out[:] = np.frombuffer(planes[0], dtype=dtype, count=n)
            for p in planes[1:summed]:
                out += np.frombuffer(p, dtype=dtype, count=n)
            return
        x = np.frombuffer(frame.planes[0], dtype=dtype, count=n * self.channels).reshape(n, self.channels)
        out[:] = x[:, 0]
        for c in range(1, summed):       # column by column: an axis-1 sum with a cast is slow
            out += x[:, c]

    def to_unit(self, chunk: np.ndarray) -> None:
        if self.bias:
            chunk += self.bias
        if self.gain != 1:
            chunk *= self.gain

