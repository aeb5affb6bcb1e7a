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
* ``partial`` -- windows were produced, but not all of the audio is as it was: the stream broke
  or was cut off (the windows before are good and were yielded), damaged packets or bytes in the
  middle were replaced by silence (``decode_error``; the audio after the damage is kept, at its
  own time), or NaN/inf samples were replaced by silence (``non_finite_samples``); the message
  says how much and where (media time) it started;
* ``error``   -- no window at all (``error_type`` says why).

Times are media time: the first window starts where the audio starts on the container's
timeline, rebased to the container's start time as FFmpeg and players do (an audio track that
starts 5 s after the video starts at 5.0). Of several audio streams, the one FFmpeg picks
(``av_find_best_stream``: the default disposition first) is decoded; ``FileInfo.audio_stream``
says which. A local path is classified with ``stat`` before anything opens it (a FIFO or device
is never read).

``error_type`` values: the decode-stage entries of ``schemas.vocabulary.ERRORS`` (:data:`ERROR_TYPES`),
each with its meaning and whether the next run retries it.
"""

from __future__ import annotations

import errno
import io
import itertools
import logging
import math
import numbers
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from fsspec.core import url_to_fs
from mutagen.mp3 import skip_id3  # seeks past ID3v2 tags (several, as some taggers stack them)

from pipelines.sources import FileRef, candidate_paths, escape_uri, is_local_filesystem
from salmonn.config import SAMPLE_RATE  # 16 kHz: what Whisper and BEATs (and so SALMONN) take
from schemas import vocabulary
from schemas.vocabulary import STATUS_ERROR, STATUS_OK, STATUS_PARTIAL

logger = logging.getLogger(__name__)
# Summing float channels may overflow to inf on a hostile file; decode counts and replaces those
# samples (non_finite_samples), so numpy's warning about it adds nothing.
warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning,
                        module=r"pipelines\.decode")

MAX_WINDOW_S = 30.0                # Whisper's context
SNAP_SEARCH_S = 2.0                # a snapped cut moves back at most this far ...
SNAP_FRAME_S = 0.02                # ... to the centre of the quietest frame of this length
SILENCE_PEAK = 2.0 ** -15          # a window whose |peak| <= one 16-bit LSB is digital silence
TRUNCATION_TOLERANCE_S = 1.0       # decoded this much (and 2%) short of the declared duration ...
TRUNCATION_TOLERANCE_FRAC = 0.02   # ... -> status partial, error_type truncated
# Containers whose header states the real length (not an estimate from the bit rate), so a
# stream that ends well short of it was cut off. mp3 only counts with a Xing/Info/VBRI header:
# without one FFmpeg estimates from the first frame's bit rate, 3x off for a VBR file that
# starts quietly.
EXACT_DURATION_CONTAINERS = frozenset({
    "flac", "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "ogg", "wav", "w64", "aiff", "caf",
})
GAP_MIN_S = 0.05                   # a jump of the timestamps this long or longer is lost audio ...
GAP_MAX_S = 60.0                   # ... up to this long; longer jumps are timestamp resets
GAP_EPSILON_S = 0.001              # after a refused packet: a jump this long or longer is its time
MAX_DEMUX_RESYNCS = 100            # demuxer read errors resynced after, per stream
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
    audio_stream: int | None = None   # index of the decoded audio stream in its container


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


# --- decoding ------------------------------------------------------------------------------


class _Reject(Exception):
    """A per-file verdict reached by our own checks (file kind, size, streams, the cap)."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


@dataclass
class _Probe:
    container: str | None = None
    codec: str | None = None
    sample_rate_in: int | None = None
    channels_in: int | None = None
    audio_stream: int | None = None   # index of the decoded stream in the container
    declared_end_s: float | None = None   # media time where the header says the audio ends
    exact_duration: bool = False  # declared_end_s comes from the header, not the bit rate
    phase: str = "open"           # open -> probe -> decode: says what an exception means
    decoding: bool = False
    origin_s: float = 0.0         # media time of the first decoded sample
    bad_packets: int = 0          # undecodable packets skipped
    gaps: int = 0                 # holes in the timestamps (data the demuxer skipped) ...
    silence_s: float = 0.0        # ... and the silence put in place of both
    first_damage_s: float | None = None   # media time of the first damage
    ffmpeg_error: str | None = None       # FFmpeg's own words about the first damage
    demux_errors: int = 0         # read errors the demuxer resynced after
    links: int = 1                # chained Ogg: logical streams decoded
    recovered: bool = False       # good audio was decoded after the first damage
    non_finite: int = 0           # NaN/inf samples replaced by silence ...
    first_non_finite_s: float | None = None   # ... the first at this media time
    fs: Any = None                # where the file is (to tell a missing object from a prefix)
    path: str | None = None

    def damage(self, media_s: float, error: Exception | None = None) -> None:
        if self.first_damage_s is None:
            self.first_damage_s = media_s
        if error is not None and self.ffmpeg_error is None:
            self.ffmpeg_error = _ffmpeg_words(error)


_ffmpeg_errors_recorded = False


def _record_ffmpeg_errors() -> None:
    """Make FFmpeg's own error lines ("[mp3float] Header missing") part of the exceptions PyAV
    raises, without printing or logging them: PyAV installs its log callback at any level other
    than None and keeps the last ERROR line for its exceptions; at PANIC nothing is emitted.
    Left alone when the process has chosen a level itself."""
    global _ffmpeg_errors_recorded
    if not _ffmpeg_errors_recorded:
        if av.logging.get_level() is None:
            av.logging.set_level(av.logging.PANIC)
        _ffmpeg_errors_recorded = True


def decode_file(ref: FileRef, options: DecodeOptions = DecodeOptions(),
                storage_options: dict | None = None, *,
                choose_cut: Callable[[np.ndarray, int], int | None] | None = None) -> Iterator[Window | FileInfo]:
    """Decode one file into windows, streaming; the last item is its :class:`FileInfo`.
    ``choose_cut``: the :class:`Windower`'s cut hook.

    Never raises for bad input (see the module docstring for statuses and error types).
    Closing the generator early closes the file.
    """
    _record_ffmpeg_errors()
    probe = _Probe()
    windower = Windower(options, ref.file_id, ref.uri, choose_cut=choose_cut)
    error: tuple[str, str] | None = None
    try:
        yield from _decode(ref, options, storage_options or {}, probe, windower)
    except _Reject as e:
        error = (e.error_type, str(e))
    except Exception as e:  # noqa: BLE001 - per-file errors become rows, never crash the run
        error = _classify(e, probe)
        if error[0] == "not_found" and probe.fs is not None and _is_dir(probe.fs, probe.path):
            error = ("not_a_file", f"{ref.uri} is a directory (prefix), not a file")
        if error[0] == "internal_error":
            logger.exception("decode %s: unexpected error", ref.uri)
        if probe.decoding:
            error = (error[0], f"{error[1]} at {_media_s(windower):.2f} s")
    yield from windower.flush()   # what was decoded before a failure is good audio
    if error is None and probe.decoding and windower.n_samples == 0:
        error = ("empty_audio", "the audio stream decoded to no samples")
    notes = _damage_notes(probe)
    if error is None and probe.decoding:
        error = _check_complete(_media_s(windower), probe, notes)
    elif error is not None and notes:
        error = (error[0], f"{error[1]}; {'; '.join(notes)}")
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
        error_message=escape_uri(error[1])[:500] if error else None,
        container=probe.container,
        codec=probe.codec,
        sample_rate_in=probe.sample_rate_in,
        channels_in=probe.channels_in,
        duration_s=windower.n_samples / options.sample_rate if probe.decoding else None,
        n_segments=windower.n_windows,
        audio_stream=probe.audio_stream,
    )


def _media_s(windower: Windower) -> float:
    """Media time of the end of the audio decoded so far."""
    return (windower.origin + windower.n_samples) / windower.sample_rate


def _decode(ref: FileRef, options: DecodeOptions, storage_options: dict, probe: _Probe,
            windower: Windower) -> Iterator[Window]:
    try:
        fs, path = url_to_fs(ref.uri, **storage_options)
    except ValueError as e:     # e.g. a manifest entry with a protocol fsspec does not know
        raise _Reject("not_found", f"no file system for this URI ({e})") from None
    if is_local_filesystem(fs):
        _, st = _local_file(path)      # the file's kind, found without opening it
        size: int | None = st.st_size
    else:
        probe.fs, probe.path = fs, path
        size = ref.size_bytes
        if size is None:   # not stat'ed when listed (a manifest entry): ask the store now
            info = fs.info(path)
            if info.get("type") == "directory":
                raise _Reject("not_a_file", "a directory (prefix), not an object")
            size = info.get("size")
    if size == 0:
        raise _Reject("empty_file", "0 bytes")
    _check_size(size, options)
    with _open_input(ref.uri, options, storage_options, size) as f:
        size = _size_of(f)
        if size == 0:
            raise _Reject("empty_file", "0 bytes")
        _check_size(size, options)
        probe.phase = "probe"
        has_vbr_header = _has_mp3_length_header(f)
        decoder = _StreamDecoder(options, windower, probe)
        offset: int | None = 0
        while offset is not None:      # one pass per logical stream of a chained Ogg file
            source = f if offset == 0 else _OffsetReader(f, offset)
            with av.open(source, "r", metadata_errors="ignore", buffer_size=AVIO_BUFFER_BYTES) as container:
                stream = _audio_stream(container, probe, first=offset == 0)
                if offset == 0:
                    probe.exact_duration = (probe.container in EXACT_DURATION_CONTAINERS
                                            or (probe.container == "mp3" and has_vbr_header))
                probe.phase = "decode"
                probe.decoding = True
                offset = yield from decoder.run(container, stream, f, offset)
            if offset is not None:
                probe.links += 1


def _local_file(path: str) -> tuple[str, os.stat_result]:
    """``(path to open, its stat)`` for a local regular file, found by ``stat`` alone (following
    symlinks; a FIFO or device is never opened). Anything else is a :class:`_Reject`:
    a dangling symlink (not_found), a symlink loop, a directory (not_a_file), a FIFO, socket or
    device (not_a_regular_file). A name that was percent-encoded in the listing is unescaped."""
    candidates = candidate_paths(path)
    for i, p in enumerate(candidates):
        try:
            st = os.stat(p)
        except ValueError:      # a NUL byte: no POSIX path holds one
            raise _Reject("not_found", "the path contains a NUL byte") from None
        except FileNotFoundError:
            if os.path.islink(p):
                raise _Reject("not_found", f"dangling symlink: it points to {os.readlink(p)!r}, "
                                           f"which does not exist") from None
            if i + 1 < len(candidates):
                continue
            raise
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _Reject("symlink_loop", "too many levels of symbolic links (a symlink loop)") from None
            raise
        if stat.S_ISDIR(st.st_mode):
            raise _Reject("not_a_file", "a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise _Reject("not_a_regular_file", f"a {_kind_of(st.st_mode)}, not a regular file: not read "
                                                f"(reading it could block or never end)")
        return p, st
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _is_dir(fs, path: str | None) -> bool:
    try:
        return bool(path) and fs.isdir(path)
    except Exception:  # noqa: BLE001 - only a better label is at stake
        return False


def _open_input(uri: str, options: DecodeOptions, storage_options: dict, size: int | None = None):
    """Open ``uri`` for PyAV: a seekable binary file object (a context manager).

    Local files are opened non-blocking and checked to be regular files on the open descriptor,
    so a file replaced by a FIFO after the check cannot hang the read. On object storage the
    size from the listing is handed to the file, which saves the HEAD request an open would make
    (a missing object then shows on the first read, as not_found).
    """
    fs, path = url_to_fs(uri, **storage_options)
    if is_local_filesystem(fs):
        return _open_local(_local_file(path)[0])
    if size:
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


def _open_local(path: str) -> io.FileIO:
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Reject("not_a_regular_file", f"a {_kind_of(st.st_mode)}, not a regular file: not read")
        return _LocalFile(fd, st.st_size)
    except BaseException:
        os.close(fd)
        raise


class _LocalFile(io.FileIO):
    """An open local file that knows its size (PyAV reads it in AVIO_BUFFER_BYTES blocks, so it
    needs no buffer of its own)."""

    def __init__(self, fd: int, size: int):
        super().__init__(fd, "rb", closefd=True)
        self.size = size


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


def _audio_stream(container, probe: _Probe, *, first: bool = True):
    """The audio stream FFmpeg would pick (``av_find_best_stream``: the default disposition
    first, then the stream with the most decodable frames and the highest bit rate), or the
    first one with a decoder when the best has none."""
    if first:
        probe.container = container.format.name
    audio = list(container.streams.audio)
    if not audio:
        kinds = sorted({s.type for s in container.streams})
        raise _Reject("no_audio_stream", f"streams: {', '.join(kinds) or 'none'}")
    try:
        stream = container.streams.best("audio") or audio[0]
    except (ValueError, av.error.FFmpegError):
        stream = audio[0]
    if stream.codec_context is None:
        stream = next((s for s in audio if s.codec_context is not None), stream)
    ctx = stream.codec_context
    if ctx is None:
        raise _Reject("unsupported_codec", f"this FFmpeg build has no decoder for audio "
                                           f"stream #{stream.index}")
    if not first:
        return stream
    probe.audio_stream = stream.index
    probe.codec = ctx.codec.canonical_name
    probe.sample_rate_in = ctx.sample_rate or None
    probe.channels_in = ctx.channels or None
    c_start = container.start_time / av.time_base if container.start_time is not None else 0.0
    if stream.duration and stream.time_base:
        tb = float(stream.time_base)
        s_start = stream.start_time * tb if stream.start_time is not None else c_start
        probe.declared_end_s = max(0.0, s_start - c_start) + stream.duration * tb
    elif container.duration:
        # The container's duration counts from 0 in some demuxers (Matroska's segment duration)
        # and from its start time in others: the smaller reading, so a late start is not
        # mistaken for a cut-off end.
        d = container.duration / av.time_base
        probe.declared_end_s = d - c_start if 0 < c_start < d else d
    return stream


class _StreamDecoder:
    """Decodes the packets of one audio stream into the windower, on the media timeline.

    * Timeline: the first sample sits at its media time (the frame's timestamp minus the
      container's start time, as FFmpeg and players show it), so a track that starts after the
      container does gets windows stamped from there. A later jump in the timestamps of at least
      ``GAP_MIN_S`` (and at most ``GAP_MAX_S``: beyond that it is a timestamp reset, not lost
      audio) is data the demuxer skipped over: it becomes silence, so what follows keeps its time.
    * Damage: a packet the decoder refuses (any FFmpeg error) is skipped, as ffmpeg does, however
      many there are; its time becomes silence once good audio follows (silence never ends a
      file). A read error of the demuxer is followed by another read, which resyncs (FFmpeg's
      demuxers look for the next valid frame), up to ``MAX_DEMUX_RESYNCS`` times a stream.
    * Chained Ogg: a logical stream that follows another (a radio dump) with other parameters
      stops FFmpeg's demuxer; the next link's first page is found and decoded as a stream of its
      own, appended to the timeline.
    * Samples: NaN and +-inf (a float file, or a down-mix that overflows) become silence and are
      counted; decoded samples are capped at ``max_duration_s``.
    """

    def __init__(self, options: DecodeOptions, windower: Windower, probe: _Probe):
        self.options, self.windower, self.probe = options, windower, probe
        self.to_mono = _ToMono16k(options.sample_rate, options.channel_mode)
        self.cap = options.max_samples
        self.rate = options.sample_rate

    def push(self, chunks: Iterable[np.ndarray]) -> Iterator[Window]:
        windower, probe, to_mono = self.windower, self.probe, self.to_mono
        if to_mono.non_finite != probe.non_finite:
            if probe.first_non_finite_s is None:
                probe.first_non_finite_s = _media_s(windower) + to_mono.first_non_finite_offset_s
            probe.non_finite = to_mono.non_finite
        for chunk in chunks:
            room = self.cap - windower.n_samples
            if chunk.size > room:
                yield from windower.push(chunk[:room])
                raise _Reject("too_long", f"decoded audio reached max_duration_s="
                                          f"{self.options.max_duration_s:g}; the rest is skipped")
            yield from windower.push(chunk)

    def silence(self, seconds: float) -> Iterator[Window]:
        """``seconds`` of silence after the audio decoded so far, pushed a window at a time."""
        yield from self.push(self.to_mono.drain())    # the audio before the gap goes first
        n = round(seconds * self.rate)
        self.probe.silence_s += n / self.rate
        zeros = np.zeros(min(n, self.windower.window), dtype=np.float32)
        while n > 0:
            yield from self.push([zeros[:n]])
            n -= zeros.size

    def run(self, container, stream, f, base: int) -> Iterator[Window]:
        """Decode ``stream`` to its end; returns the byte offset of a following chained-Ogg link
        (``base``: where this container starts in ``f``), or None."""
        probe, windower = self.probe, self.windower
        feed = self.to_mono.feed
        c_start = container.start_time / av.time_base if container.start_time is not None else 0.0
        is_ogg = container.format.name == "ogg"
        next_t: float | None = None     # stream time (s) where the next frame should start
        tb: float | None = None
        started = False
        damaged = False                 # damage seen and no good frame decoded since
        pending = 0.0                   # seconds of refused packets since the last good frame
        last_pos = 0
        resyncs = 0
        first_link = probe.links == 1
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.EOFError:
                break
            except av.error.FFmpegError as e:
                if isinstance(e, av.error.PyAVCallbackError):
                    raise
                if is_ogg:   # FFmpeg stops at a chained link with other parameters: decode it apart
                    link = _next_ogg_link(f, base + last_pos + 1)
                    if link is not None:
                        yield from self.push(self.to_mono.flush())
                        return link
                probe.demux_errors += 1
                probe.damage(_media_s(windower), e)
                damaged = True
                if resyncs >= MAX_DEMUX_RESYNCS:
                    raise
                resyncs += 1
                packets = container.demux(stream)
                continue
            pos = packet.pos
            if pos is not None and pos > last_pos:
                last_pos = pos
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                if isinstance(e, (av.error.PyAVCallbackError, av.error.DecoderNotFoundError)):
                    raise
                # One damaged packet: skip it like ffmpeg does; its time becomes silence when
                # good audio follows.
                probe.bad_packets += 1
                probe.damage(_media_s(windower), e)
                damaged = True
                pending += _packet_s(packet)
                continue
            for frame in frames:
                pts = frame.pts
                if tb is None:
                    tb = float(frame.time_base) if frame.time_base else 0.0
                t = pts * tb if pts is not None and tb else None
                if damaged:
                    probe.recovered, damaged = True, False
                if pending or next_t is None or t is None or t - next_t >= GAP_MIN_S:
                    # Not simply the frame after the last one: the first frame, a jump in the
                    # timestamps, refused packets before it, or no timestamps at all.
                    if not started:
                        started = True
                        if first_link and windower.n_samples == 0 and t is not None and t > c_start:
                            windower.set_origin(round((t - c_start) * self.rate))
                            probe.origin_s = windower.origin / self.rate
                        pending = 0.0   # damage before the first good frame: the origin places it
                    elif t is not None and next_t is not None:
                        gap = t - next_t
                        fill = 0.0
                        if pending:      # refused packets: the timestamps say how long they were
                            fill = gap if GAP_EPSILON_S <= gap <= GAP_MAX_S else (pending if gap > GAP_MAX_S else 0.0)
                        elif gap <= GAP_MAX_S:    # bytes the demuxer skipped over
                            probe.gaps += 1
                            probe.damage(_media_s(windower))
                            probe.recovered = True
                            fill = gap
                        if fill:
                            yield from self.silence(fill)
                        pending = 0.0
                    elif pending:
                        yield from self.silence(pending)
                        pending = 0.0
                duration = frame.samples / frame.sample_rate
                if t is not None:
                    next_t = t + duration
                elif next_t is not None:
                    next_t += duration
                out = feed(frame)
                if out:
                    yield from self.push(out)
        yield from self.push(self.to_mono.flush())
        return None

def _packet_s(packet) -> float:
    if packet.duration and packet.time_base:
        return float(packet.duration * packet.time_base)
    return 0.0


_OGG_PAGE = b"OggS"


def _next_ogg_link(f, start: int, limit: int = 64 * 2**20) -> int | None:
    """Byte offset of the next Ogg page that begins a logical stream (BOS flag, sequence 0) at
    or after ``start``, reading at most ``limit`` bytes; None if there is none. ``f``'s position
    is restored."""
    here = f.tell()
    try:
        f.seek(start)
        carry = b""
        pos = start
        read = 0
        while read < limit:
            block = f.read(256 * 2**10)
            if not block:
                return None
            read += len(block)
            data = carry + block
            base = pos - len(carry)
            i = data.find(_OGG_PAGE)
            while i != -1 and i + 27 <= len(data):
                version, flags = data[i + 4], data[i + 5]
                sequence = int.from_bytes(data[i + 18:i + 22], "little")
                if version == 0 and flags & 0x02 and sequence == 0:
                    return base + i
                i = data.find(_OGG_PAGE, i + 1)
            carry = data[-26:]
            pos += len(block)
        return None
    finally:
        f.seek(here)


class _OffsetReader(io.RawIOBase):
    """The bytes of ``f`` from ``offset`` on, as a file of their own (a chained Ogg link)."""

    def __init__(self, f, offset: int):
        super().__init__()
        self._f, self.offset = f, offset
        self._f.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._f.tell() - self.offset

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            return self._f.seek(self.offset + max(0, pos)) - self.offset
        return self._f.seek(pos, whence) - self.offset

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def readinto(self, b) -> int:
        data = self._f.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:   # the underlying file belongs to the caller
        super().close()


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


def _damage_notes(probe: _Probe) -> list[str]:
    """What was repaired on the way, for the file row's message."""
    notes = []
    if probe.bad_packets or probe.gaps or probe.demux_errors:
        parts = [f"{n} {what}" for n, what in ((probe.bad_packets, "undecodable packet(s)"),
                                               (probe.gaps, "gap(s) in the timestamps"),
                                               (probe.demux_errors, "read error(s) the demuxer resynced after"))
                 if n]
        first = f", the first at {probe.first_damage_s:.2f} s" if probe.first_damage_s is not None else ""
        why = f" ({probe.ffmpeg_error})" if probe.ffmpeg_error else ""
        notes.append(f"damaged stream: {', '.join(parts)}; {probe.silence_s:.2f} s replaced by silence"
                     f"{first}{why}")
    if probe.non_finite:
        notes.append(f"{probe.non_finite} non-finite sample(s) (NaN/inf) replaced by silence, the first at "
                     f"{probe.first_non_finite_s or 0.0:.2f} s")
    return notes


def _check_complete(media_end_s: float, probe: _Probe, notes: list[str]) -> tuple[str, str] | None:
    """After a clean end of stream: was anything missing or repaired?"""
    suffix = "".join(f"; {n}" for n in notes)
    declared = probe.declared_end_s if probe.exact_duration and probe.links == 1 else None
    short = ""
    if declared:
        tolerance = max(TRUNCATION_TOLERANCE_S, TRUNCATION_TOLERANCE_FRAC * declared)
        if media_end_s < declared - tolerance:
            short = f"stream ended at {media_end_s:.1f} s of a declared {declared:.1f} s"
            if not probe.recovered:    # the end is missing, not a part in the middle
                return ("truncated", short + suffix)
    if probe.bad_packets or probe.gaps or probe.demux_errors:
        # Damage in the middle with good audio after it; a stream without timestamps (raw MPEG
        # audio) cannot say how much the demuxer skipped, only that it ends short.
        return ("decode_error", "; ".join(notes) + (f"; {short}" if short else ""))
    if probe.non_finite:
        return ("non_finite_samples", "; ".join(notes))
    return None


# FFmpeg's AAC and AC-3 header parsers return codes of their own, which av_strerror does not know
# ("Error number -50531338 occurred").
_FFMPEG_CODES = {
    0x1030C0A: "no sync word in an AAC/AC-3 frame header",
    0x2030C0A: "invalid bitstream id in an AAC/AC-3 frame header",
    0x3030C0A: "invalid sample rate in an AAC/AC-3 frame header",
    0x4030C0A: "invalid frame size in an AAC/AC-3 frame header",
    0x5030C0A: "invalid frame type in an AAC/AC-3 frame header",
    0x6030C0A: "CRC mismatch in an AAC/AC-3 frame",
    0x7030C0A: "invalid channel configuration in an AAC/AC-3 frame header",
}


def _ffmpeg_words(e: Exception) -> str:
    """A readable one-line description of an exception: FFmpeg's error text (its own codes
    named), plus FFmpeg's last error line when it logged one."""
    if not isinstance(e, av.error.FFmpegError):
        return " ".join(f"{type(e).__name__}: {e}".split())
    code = e.errno if isinstance(e.errno, int) else None
    text = e.strerror or ""
    if code is not None and code in _FFMPEG_CODES:
        text = _FFMPEG_CODES[code]
    elif isinstance(e, av.error.UndefinedError) or not text or text.startswith("Error number"):
        tag = code.to_bytes(4, "little", signed=False) if code is not None and 0 < code < 2**32 else b""
        named = f" ({tag.decode('ascii')!r})" if tag and all(32 <= b < 127 for b in tag) else ""
        text = f"FFmpeg error code {-code if code is not None else '?'}{named}"
    log = e.log
    if log and len(log) >= 3 and log[2] and log[2].strip() not in text:
        source = f"{log[1].strip()}: " if log[1] else ""
        text = f"{text} ({source}{log[2].strip()})"
    return " ".join(text.split())


def _classify(e: Exception, probe: _Probe) -> tuple[str, str]:
    """Map an exception to (error_type, message); ``probe.phase`` says where it happened."""
    message = _ffmpeg_words(e)
    if isinstance(e, (FileNotFoundError, NotADirectoryError)):
        return "not_found", message
    if isinstance(e, PermissionError):
        return "permission_denied", message
    if isinstance(e, IsADirectoryError):
        return "not_a_file", message
    if isinstance(e, OSError) and e.errno == errno.ELOOP:
        return "symlink_loop", message
    if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
        return "not_found", message
    if isinstance(e, av.error.DecoderNotFoundError):
        return "unsupported_codec", message
    if isinstance(e, av.error.FFmpegError) and not isinstance(e, av.error.PyAVCallbackError):
        if probe.phase == "probe":
            return ("unsupported_codec" if isinstance(e, av.error.PatchWelcomeError) else "invalid_data"), message
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
