"""Streamed decode: one input file -> 16 kHz mono float32 windows (<= 30 s) + one FileInfo.

The file is opened through fsspec with an explicit read block size and decoded by PyAV straight
from that file object (no download, no temp file, no ffmpeg process). Decoded frames are
down-mixed and resampled to 16 kHz (soxr's streaming resampler on chunks of frames; libswresample
for surround down-mixes) and go into a :class:`Windower`, which owns one
preallocated window buffer and hands out each window as soon as it is full, so memory stays
O(window) whatever the file's length. The decoded-sample count is capped in the loop: headers are
never trusted for the length of the audio.

``decode_file`` never raises for bad input. It yields zero or more :class:`Window` and then
exactly one :class:`FileInfo`, whose ``status`` is

* ``ok``      -- decoded to the end;
* ``partial`` -- windows were produced, then the stream broke (``error_type`` says why; the
  windows before the damage are good and were yielded);
* ``error``   -- no window at all (``error_type`` says why).

``error_type`` values: the decode-stage entries of ``schemas.vocabulary.ERRORS`` (:data:`ERROR_TYPES`),
each with its meaning and whether the next run retries it.
"""

from __future__ import annotations

import io
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import av
import numpy as np
from fsspec.core import url_to_fs
from mutagen.mp3 import skip_id3  # seeks past ID3v2 tags (several, as some taggers stack them)

from pipelines.sources import FileRef, is_local_filesystem
from salmonn.config import SAMPLE_RATE  # 16 kHz: what Whisper and BEATs (and so SALMONN) take
from schemas import vocabulary
from schemas.vocabulary import STATUS_ERROR, STATUS_OK, STATUS_PARTIAL

logger = logging.getLogger(__name__)

MAX_WINDOW_S = 30.0                # Whisper's context
SNAP_SEARCH_S = 2.0                # a snapped cut moves back at most this far ...
SNAP_FRAME_S = 0.02                # ... to the centre of the quietest frame of this length
SILENCE_PEAK = 2.0 ** -15          # a window whose |peak| <= one 16-bit LSB is digital silence
DECLARED_TOO_LONG_FACTOR = 1.5     # reject before decoding when the header says > 1.5x the limit
TRUNCATION_TOLERANCE_S = 1.0       # decoded this much (and 2%) short of the declared duration ...
TRUNCATION_TOLERANCE_FRAC = 0.02   # ... -> status partial, error_type truncated
# Containers whose header states the real length (not an estimate from the bit rate), so a
# stream that ends well short of it was cut off. mp3 only counts with a Xing/Info/VBRI header:
# without one FFmpeg estimates from the first frame's bit rate, 3x off for a VBR file that
# starts quietly.
EXACT_DURATION_CONTAINERS = frozenset({
    "flac", "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "ogg", "wav", "w64", "aiff", "caf",
})
MAX_CONSECUTIVE_BAD_PACKETS = 8   # more undecodable packets in a row: the stream is broken
AVIO_BUFFER_BYTES = 64 * 2**10     # PyAV's read size from the Python file object
TAIL_BYTES = 128 * 2**10           # reads in the last TAIL_BYTES of a remote object: own request

ERROR_TYPES = vocabulary.error_types(vocabulary.DECODE)


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


# --- windowing -----------------------------------------------------------------------------


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
        self.n_windows = 0
        self.n_samples = 0    # samples pushed so far

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
        start = self._offset
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


# --- decoding ------------------------------------------------------------------------------


class _Reject(Exception):
    """A per-file verdict reached by our own checks (size, duration, streams)."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


@dataclass
class _Probe:
    container: str | None = None
    codec: str | None = None
    sample_rate_in: int | None = None
    channels_in: int | None = None
    declared_s: float | None = None
    exact_duration: bool = False  # declared_s comes from the header, not the bit rate
    phase: str = "open"           # open -> probe -> decode: says what an exception means
    decoding: bool = False
    bad_packets: int = 0          # undecodable packets skipped
    skipped_s: float = 0.0        # ... and the silence put in their place


def decode_file(ref: FileRef, options: DecodeOptions = DecodeOptions(),
                storage_options: dict | None = None, *,
                choose_cut: Callable[[np.ndarray, int], int | None] | None = None) -> Iterator[Window | FileInfo]:
    """Decode one file into windows, streaming; the last item is its :class:`FileInfo`.
    ``choose_cut``: the :class:`Windower`'s cut hook.

    Never raises for bad input (see the module docstring for statuses and error types).
    Closing the generator early closes the file.
    """
    probe = _Probe()
    windower = Windower(options, ref.file_id, ref.uri, choose_cut=choose_cut)
    error: tuple[str, str] | None = None
    try:
        yield from _decode(ref, options, storage_options or {}, probe, windower)
    except _Reject as e:
        error = (e.error_type, str(e))
    except Exception as e:  # noqa: BLE001 - per-file errors become rows, never crash the run
        error = _classify(e, probe)
        if probe.bad_packets:
            error = (error[0], f"{error[1]} (after {probe.bad_packets} undecodable packet(s))")
        if error[0] == "internal_error":
            logger.exception("decode %s: unexpected error", ref.uri)
    yield from windower.flush()   # what was decoded before a failure is good audio
    if error is None and probe.decoding and windower.n_samples == 0:
        error = ("empty_audio", "the audio stream decoded to no samples")
    if error is None and probe.decoding:
        error = _check_complete(windower.n_samples / options.sample_rate, probe)
    if error is None:
        status = STATUS_OK
    else:
        status = STATUS_PARTIAL if windower.n_windows else STATUS_ERROR
        log = logger.warning if status == STATUS_ERROR else logger.info
        log("decode %s: %s %s: %s", ref.uri, status, *error)
    yield FileInfo(
        file_id=ref.file_id,
        uri=ref.uri,
        status=status,
        error_type=error[0] if error else None,
        error_message=error[1][:500] if error else None,
        container=probe.container,
        codec=probe.codec,
        sample_rate_in=probe.sample_rate_in,
        channels_in=probe.channels_in,
        duration_s=windower.n_samples / options.sample_rate if probe.decoding else None,
        n_segments=windower.n_windows,
    )


def _decode(ref: FileRef, options: DecodeOptions, storage_options: dict, probe: _Probe,
            windower: Windower) -> Iterator[Window]:
    if ref.size_bytes == 0:
        raise _Reject("empty_file", "0 bytes")
    _check_size(ref.size_bytes, options)
    with _open_input(ref.uri, options, storage_options, ref.size_bytes) as f:
        size = _size_of(f)
        if size == 0:
            raise _Reject("empty_file", "0 bytes")
        _check_size(size, options)
        probe.phase = "probe"
        has_vbr_header = _has_mp3_length_header(f)
        with av.open(f, "r", metadata_errors="ignore", buffer_size=AVIO_BUFFER_BYTES) as container:
            stream = _audio_stream(container, probe)
            probe.exact_duration = (probe.container in EXACT_DURATION_CONTAINERS
                                    or (probe.container == "mp3" and has_vbr_header))
            _check_declared_duration(probe, options)
            probe.phase = "decode"
            probe.decoding = True
            yield from _decode_stream(container, stream, options, windower, probe)


def _open_input(uri: str, options: DecodeOptions, storage_options: dict, size: int | None = None):
    """Open ``uri`` for PyAV: a seekable binary file object (a context manager).

    On object storage the size from the listing is handed to the file, which saves the HEAD
    request an open would make (a missing object then shows on the first read, as not_found).
    """
    fs, path = url_to_fs(uri, **storage_options)
    if size and not is_local_filesystem(fs):
        try:
            f = fs.open(path, "rb", block_size=options.block_size, size=size)
        except TypeError:   # a filesystem whose files take no size
            f = fs.open(path, "rb", block_size=options.block_size)
    else:
        f = fs.open(path, "rb", block_size=options.block_size)
    size = getattr(f, "size", None)
    if hasattr(f, "_fetch_range") and size and size > options.block_size + 2 * TAIL_BYTES:
        return _TailCachedReader(f, size)
    return f


def _size_of(f) -> int | None:
    """The object's size in bytes, or None where the store cannot say (e.g. some HTTP servers)."""
    size = getattr(f, "size", None)
    if size is None:
        try:
            size = f.seek(0, io.SEEK_END)
            f.seek(0)
        except (OSError, ValueError):
            return None
    return size


def _has_mp3_length_header(f) -> bool:
    """Whether the file starts (after any ID3v2 tag) with an MPEG audio frame carrying a
    Xing/Info/VBRI header, i.e. a frame count. Reads a few KB and rewinds."""
    f.seek(0)
    skip_id3(f)
    data = f.read(4096)
    f.seek(0)
    for i in range(len(data) - 1):
        if data[i] == 0xFF and data[i + 1] & 0xE0 == 0xE0:   # the first frame sync
            frame = data[i:i + 200]
            return any(tag in frame for tag in (b"Xing", b"Info", b"VBRI"))
    return False


def _check_size(size: int | None, options: DecodeOptions) -> None:
    if size is not None and options.max_bytes is not None and size > options.max_bytes:
        raise _Reject("too_large", f"{size} bytes > max_bytes={options.max_bytes}")


def _audio_stream(container, probe: _Probe):
    probe.container = container.format.name
    if not container.streams.audio:
        kinds = sorted({s.type for s in container.streams})
        raise _Reject("no_audio_stream", f"streams: {', '.join(kinds) or 'none'}")
    stream = container.streams.audio[0]
    ctx = stream.codec_context
    if ctx is None:
        raise _Reject("unsupported_codec", f"this FFmpeg build has no decoder for audio "
                                           f"stream #{stream.index}")
    probe.codec = ctx.codec.canonical_name
    probe.sample_rate_in = ctx.sample_rate or None
    probe.channels_in = ctx.channels or None
    if stream.duration and stream.time_base:
        probe.declared_s = float(stream.duration * stream.time_base)
    elif container.duration:
        probe.declared_s = container.duration / av.time_base
    return stream


def _check_declared_duration(probe: _Probe, options: DecodeOptions) -> None:
    if probe.declared_s and probe.declared_s > DECLARED_TOO_LONG_FACTOR * options.max_duration_s:
        raise _Reject("too_long", f"declared duration {probe.declared_s:.0f} s > "
                                  f"{DECLARED_TOO_LONG_FACTOR} x max_duration_s={options.max_duration_s:g}")


def _decode_stream(container, stream, options: DecodeOptions, windower: Windower,
                   probe: _Probe) -> Iterator[Window]:
    to_mono = _ToMono16k(options.sample_rate, options.channel_mode)
    cap = options.max_samples

    def push(chunks: Iterable[np.ndarray]) -> Iterator[Window]:
        for chunk in chunks:
            room = cap - windower.n_samples
            if chunk.size > room:
                yield from windower.push(chunk[:room])
                raise _Reject("too_long", f"decoded audio reached max_duration_s="
                                          f"{options.max_duration_s:g}; the rest is skipped")
            yield from windower.push(chunk)

    # The per-frame path stays free of generators and temporaries: most frames only land in
    # to_mono's gather buffer, and feed() returns the shared empty tuple.
    feed = to_mono.feed
    consecutive_bad = 0
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            # One damaged packet: skip it like ffmpeg does, keep the timeline with silence of its
            # duration, and give up when the damage goes on.
            probe.bad_packets += 1
            consecutive_bad += 1
            if consecutive_bad > MAX_CONSECUTIVE_BAD_PACKETS:
                raise
            gap = _packet_samples(packet, options.sample_rate)
            probe.skipped_s += gap / options.sample_rate
            yield from push(to_mono.drain())    # the audio before the gap goes first
            yield from push([np.zeros(gap, dtype=np.float32)])
            continue
        consecutive_bad = 0
        for frame in frames:
            out = feed(frame)
            if out:
                yield from push(out)
    yield from push(to_mono.flush())


def _packet_samples(packet, rate: int) -> int:
    if packet.duration and packet.time_base:
        return round(float(packet.duration * packet.time_base) * rate)
    return 0


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
_NOTHING = ()


class _ToMono16k:
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

    def feed(self, frame) -> tuple[np.ndarray, ...] | list[np.ndarray]:
        """Take one frame; return the 16 kHz chunks that are ready (usually none)."""
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        ready = _NOTHING
        if key != self._key:
            ready = self.flush()
            self._key = key
            self._start(frame)
        if self._soxr is None:
            return [*ready, *(np.frombuffer(out.planes[0], dtype=np.float32, count=out.samples)
                              for out in self._resampler.resample(frame))]
        n = frame.samples
        end = self._fill + n
        if end > self._buf.size:
            grown = np.empty(max(2 * self._buf.size, end), dtype=np.float32)
            grown[:self._fill] = self._buf[:self._fill]
            self._buf = grown
        self._gather(frame, self._buf[self._fill:end], n)
        self._fill = end
        if end >= RESAMPLE_CHUNK:
            return [*ready, *self._resample(last=False)]
        return ready

    def drain(self) -> list[np.ndarray]:
        """Resample what is gathered so far (the stream goes on)."""
        return self._resample(last=False) if self._soxr is not None else []

    def flush(self) -> list[np.ndarray]:
        """End of the stream (or of one format): everything still held, resampled."""
        out = []
        if self._soxr is not None:
            out = self._resample(last=True)
            self._soxr = None
        if self._resampler is not None:
            out = [np.frombuffer(o.planes[0], dtype=np.float32, count=o.samples)
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

    def _resample(self, last: bool) -> list[np.ndarray]:
        chunk = self._buf[:self._fill]
        self._gather.to_unit(chunk)
        out = self._soxr.resample_chunk(chunk, last=last)   # a new array: the buffer is reused
        self._fill = 0
        return [out] if out.size else []


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


def _check_complete(decoded_s: float, probe: _Probe) -> tuple[str, str] | None:
    """After a clean end of stream: was anything missing?"""
    skipped = (f"; {probe.bad_packets} undecodable packet(s) replaced by "
               f"{probe.skipped_s:.2f} s of silence" if probe.bad_packets else "")
    declared = probe.declared_s if probe.exact_duration else None
    if declared:
        tolerance = max(TRUNCATION_TOLERANCE_S, TRUNCATION_TOLERANCE_FRAC * declared)
        if decoded_s < declared - tolerance:
            return ("truncated", f"stream ended at {decoded_s:.1f} s of a declared {declared:.1f} s"
                    + skipped)
    if probe.bad_packets:
        return ("decode_error", skipped[2:])
    return None


def _classify(e: Exception, probe: _Probe) -> tuple[str, str]:
    """Map an exception to (error_type, message); ``probe.phase`` says where it happened."""
    message = f"{type(e).__name__}: {e}"
    if isinstance(e, FileNotFoundError):
        return "not_found", message
    if isinstance(e, PermissionError):
        return "permission_denied", message
    if isinstance(e, IsADirectoryError):
        return "not_a_file", message
    if isinstance(e, (av.error.DecoderNotFoundError, av.error.PatchWelcomeError)):
        return "unsupported_codec", message
    if isinstance(e, av.error.FFmpegError) and not isinstance(e, av.error.PyAVCallbackError):
        if probe.phase == "probe":
            return "invalid_data", message
        if isinstance(e, av.error.EOFError):
            return "truncated", message
        return "decode_error", message
    if isinstance(e, (OSError, EOFError, TimeoutError, ConnectionError)):
        return "read_error", message
    if type(e).__module__.startswith(("botocore", "aiobotocore", "aiohttp", "requests", "urllib3")):
        return "read_error", message
    return "internal_error", message


class _TailCachedReader(io.RawIOBase):
    """A remote fsspec file, for PyAV: reads that fall in the last TAIL_BYTES of the object come
    from one ranged request made on first use, so a demuxer's look at the end (mp3's ID3v1/APE
    tags, mp4's trailing atoms) does not evict the read-ahead block it is streaming from, which
    would otherwise be fetched again."""

    def __init__(self, f, size: int):
        super().__init__()
        self._f = f
        self.size = size
        self._pos = 0
        self._tail_start = size - TAIL_BYTES
        self._tail: bytes | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self._pos
        if self._pos >= self._tail_start:
            if self._tail is None:
                self._tail = self._f._fetch_range(self._tail_start, self.size)
            i = self._pos - self._tail_start
            data = self._tail[i:i + n]
        else:
            if self._f.tell() != self._pos:
                self._f.seek(self._pos)
            data = self._f.read(min(n, self._tail_start - self._pos))
        self._pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()
