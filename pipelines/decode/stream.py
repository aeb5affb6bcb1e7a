"""``decode_file``: one input -> windows and one FileInfo. The packet loop on the media timeline,
its repairs (refused packets, timestamp gaps, demuxer resyncs, chained Ogg links, the sample cap)
and the classification of what went wrong into the decode stage's error types."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from fsspec.core import url_to_fs

from pipelines.decode.common import DecodeOptions, FileInfo, Reject, Window
from pipelines.decode.mono import ToMono16k
from pipelines.decode.reading import (
    AVIO_BUFFER_BYTES,
    OffsetReader,
    check_size,
    has_mp3_length_header,
    is_dir,
    local_file,
    open_input,
    size_of,
)
from pipelines.decode.windowing import Windower
from pipelines.sources import FileRef, escape_uri, is_local_filesystem
from schemas import vocabulary
from schemas.vocabulary import STATUS_ERROR, STATUS_OK, STATUS_PARTIAL

logger = logging.getLogger("pipelines.decode")

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

ERROR_TYPES = vocabulary.error_types(vocabulary.DECODE)


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
    except Reject as e:
        error = (e.error_type, str(e))
    except Exception as e:  # noqa: BLE001 - per-file errors become rows, never crash the run
        error = _classify(e, probe)
        if error[0] == "not_found" and probe.fs is not None and is_dir(probe.fs, probe.path):
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
        raise Reject("not_found", f"no file system for this URI ({e})") from None
    except ImportError as e:    # a known protocol whose package this worker lacks (gs:// without gcsfs)
        raise Reject("read_error", f"this worker cannot read this URI: {e} (add the package to the "
                                   f"workers' image or runtime_env; the next run retries it)") from None
    if is_local_filesystem(fs):
        _, st = local_file(path)      # the file's kind, found without opening it
        size: int | None = st.st_size
    else:
        probe.fs, probe.path = fs, path
        size = ref.size_bytes
        if size is None:   # not stat'ed when listed (a manifest entry): ask the store now
            info = fs.info(path)
            if info.get("type") == "directory":
                raise Reject("not_a_file", "a directory (prefix), not an object")
            size = info.get("size")
    if size == 0:
        raise Reject("empty_file", "0 bytes")
    check_size(size, options)
    with open_input(ref.uri, options, storage_options, size) as f:
        size = size_of(f)
        if size == 0:
            raise Reject("empty_file", "0 bytes")
        check_size(size, options)
        probe.phase = "probe"
        has_vbr_header = has_mp3_length_header(f)
        decoder = _StreamDecoder(options, windower, probe)
        offset: int | None = 0
        while offset is not None:      # one pass per logical stream of a chained Ogg file
            source = f if offset == 0 else OffsetReader(f, offset)
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



def _audio_stream(container, probe: _Probe, *, first: bool = True):
    """The audio stream FFmpeg would pick (``av_find_best_stream``: the default disposition
    first, then the stream with the most decodable frames and the highest bit rate), or the
    first one with a decoder when the best has none."""
    if first:
        probe.container = container.format.name
    audio = list(container.streams.audio)
    if not audio:
        kinds = sorted({s.type for s in container.streams})
        raise Reject("no_audio_stream", f"streams: {', '.join(kinds) or 'none'}")
    try:
        stream = container.streams.best("audio") or audio[0]
    except (ValueError, av.error.FFmpegError):
        stream = audio[0]
    if stream.codec_context is None:
        stream = next((s for s in audio if s.codec_context is not None), stream)
    ctx = stream.codec_context
    if ctx is None:
        raise Reject("unsupported_codec", f"this FFmpeg build has no decoder for audio "
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
        self.to_mono = ToMono16k(options.sample_rate, options.channel_mode)
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
                raise Reject("too_long", f"decoded audio reached max_duration_s="
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

