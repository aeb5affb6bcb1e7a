"""Synthetic test signals and real encoded audio files, made with PyAV (no ffmpeg binary).

Used by the tests, the benchmarks and ``salmonn-pipeline demo``. Signals are float32 arrays of
shape (C, N) = (channels, samples) in [-1, 1]; :func:`write_audio` encodes them into any of the
formats in :data:`FORMATS` (audio-only files and video containers with a tiny video stream) and
returns what was actually written (:class:`Encoded`), because some codecs only take certain
sample rates or channel counts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

logger = logging.getLogger(__name__)

FRAME_SAMPLES = 4096  # samples per channel handed to the encoder at a time


@dataclass(frozen=True)
class FormatSpec:
    container: str            # FFmpeg muxer name
    audio_codec: str | None   # FFmpeg encoder name; None = video only
    video_codec: str | None = None
    bit_rate: int | None = None       # audio bit rate for lossy codecs
    max_channels: int | None = None   # what the encoder (or muxer) accepts
    channels: int | None = None       # the only channel count the encoder takes (input is
                                      # up/down-mixed to it)
    options: tuple[tuple[str, str], ...] = ()


FORMATS: dict[str, FormatSpec] = {
    "wav": FormatSpec("wav", "pcm_s16le"),
    "wav24": FormatSpec("wav", "pcm_s24le"),
    "wavf32": FormatSpec("wav", "pcm_f32le"),
    "flac": FormatSpec("flac", "flac", max_channels=8),
    "mp3": FormatSpec("mp3", "libmp3lame", bit_rate=64_000, max_channels=2),
    # FFmpeg's native Vorbis encoder is experimental and stereo-only (no libvorbis in the wheel).
    "ogg": FormatSpec("ogg", "vorbis", channels=2, options=(("strict", "experimental"),)),
    "opus": FormatSpec("ogg", "libopus", bit_rate=32_000, max_channels=8),
    "m4a": FormatSpec("ipod", "aac", bit_rate=64_000, max_channels=8),
    # Video containers: a tiny video stream plus one audio stream.
    "mp4": FormatSpec("mp4", "aac", "mpeg4", bit_rate=64_000, max_channels=8),
    "mkv": FormatSpec("matroska", "flac", "mpeg4", max_channels=8),
    "mov": FormatSpec("mov", "pcm_s16le", "mpeg4"),
    "webm": FormatSpec("webm", "libopus", "libvpx", bit_rate=32_000, max_channels=8),
}
AUDIO_FORMATS = ("wav", "wav24", "wavf32", "flac", "mp3", "ogg", "opus", "m4a")
VIDEO_FORMATS = ("mp4", "mkv", "mov", "webm")
SUFFIX = {"wav24": ".wav", "wavf32": ".wav", "opus": ".opus", "ogg": ".ogg"}

_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
_CODEC_FLAG_QSCALE = 0x0002   # AV_CODEC_FLAG_QSCALE: use a fixed quality (VBR)
_VIDEO_SIZE = 32   # pixels, square
_VIDEO_FPS = 2


@dataclass(frozen=True)
class Encoded:
    """What :func:`write_audio` wrote: may differ from the request where a codec needs it."""

    fmt: str
    container: str
    codec: str | None
    sample_rate: int | None
    channels: int | None
    duration_s: float       # of the signal handed in


def suffix(fmt: str) -> str:
    """File name suffix for a format key (``"wav24"`` -> ``".wav"``)."""
    return SUFFIX.get(fmt, "." + fmt)


def supported_rate(codec: str, rate: int) -> int:
    """``rate`` if the encoder takes it, else the nearest rate it does take (ties go up)."""
    rates = av.codec.Codec(codec, "w").audio_rates
    if not rates or rate in rates:
        return rate
    return min(rates, key=lambda r: (abs(r - rate), -r))


def write_audio(
    dst: str | os.PathLike | BinaryIO,
    samples: np.ndarray,
    sample_rate: int,
    fmt: str,
    *,
    codec: str | None = None,
    bit_rate: int | None = None,
    repeats: int = 1,
    vbr_quality: int | None = None,
    muxer_options: dict[str, str] | None = None,
) -> Encoded:
    """Encode ``samples`` (C, N) float32 at ``sample_rate`` into ``dst`` as ``fmt``.

    ``fmt`` is a key of :data:`FORMATS`; video formats get a tiny video stream too. The encoder
    resamples when the codec needs another rate (opus: 8/12/16/24/48 kHz, mp3: <= 48 kHz).
    ``repeats > 1`` encodes the signal once and muxes its packets ``repeats`` times with shifted
    timestamps: a cheap way to make a valid hour-long file (not for FLAC: its frame headers
    number the frames). ``vbr_quality`` (0 best .. 9) switches the encoder to constant-quality
    VBR (mp3); ``muxer_options`` go to the container, e.g. ``{"write_xing": "0"}`` for an mp3
    without a Xing header.
    """
    spec = FORMATS[fmt]
    samples = np.atleast_2d(np.asarray(samples, dtype=np.float32))
    if spec.channels is not None and samples.shape[0] != spec.channels:
        mono = samples.mean(axis=0, keepdims=True)
        samples = np.repeat(mono, spec.channels, axis=0)
    channels, n = samples.shape
    if spec.max_channels is not None and channels > spec.max_channels:
        raise ValueError(f"{fmt}: at most {spec.max_channels} channels, got {channels}")
    codec = codec or spec.audio_codec
    if repeats > 1 and codec == "flac":
        raise ValueError("repeats > 1 cannot make FLAC (frame numbers would repeat)")
    rate = supported_rate(codec, sample_rate)
    with av.open(dst, "w", format=spec.container, options=muxer_options or {}) as out:
        astream = out.add_stream(codec, rate=rate, layout=_LAYOUTS[channels])
        if vbr_quality is not None:
            astream.codec_context.qscale = vbr_quality
            astream.codec_context.flags |= _CODEC_FLAG_QSCALE
        elif bit_rate or spec.bit_rate:
            astream.bit_rate = (bit_rate or spec.bit_rate) * (1 if channels <= 2 else channels // 2)
        if spec.options:
            astream.codec_context.options = dict(spec.options)
        vstream = _add_video_stream(out, spec.video_codec) if spec.video_codec else None
        packets = list(_encode_audio(astream, samples, sample_rate))
        if repeats == 1:
            for packet in packets:
                out.mux(packet)
        else:
            _mux_repeated(out, astream, packets, repeats)
        if vstream is not None:
            _write_video_frames(out, vstream, n * repeats / sample_rate)
    return Encoded(fmt, spec.container, codec, rate, channels, n * repeats / sample_rate)


def write_video(dst: str | os.PathLike | BinaryIO, seconds: float, fmt: str = "mp4") -> Encoded:
    """A video file with no audio stream at all."""
    spec = FORMATS[fmt]
    with av.open(dst, "w", format=spec.container) as out:
        vstream = _add_video_stream(out, spec.video_codec or "mpeg4")
        _write_video_frames(out, vstream, seconds)
    return Encoded(fmt, spec.container, None, None, None, seconds)


def _encode_audio(stream, samples: np.ndarray, sample_rate: int):
    layout = _LAYOUTS[samples.shape[0]]
    for start in range(0, samples.shape[1], FRAME_SAMPLES):
        # Packed (interleaved) input: PyAV's planar from_ndarray mishandles 8 channels.
        chunk = np.ascontiguousarray(samples[:, start:start + FRAME_SAMPLES].T).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout=layout)
        frame.sample_rate = sample_rate
        frame.time_base = Fraction(1, sample_rate)
        frame.pts = start
        yield from stream.encode(frame)
    yield from stream.encode(None)


def _mux_repeated(out, stream, packets, repeats: int) -> None:
    """Mux the packets of one encode ``repeats`` times, shifting pts/dts by its duration."""
    payloads = [(bytes(p), p.pts, p.dts, p.duration, p.time_base, p.is_keyframe) for p in packets]
    first_pts = payloads[0][1] or 0
    last = payloads[-1]
    span = last[1] + last[3] - first_pts   # stream duration of one encode, in packet time base
    for r in range(repeats):
        for data, pts, dts, duration, time_base, key in payloads:
            packet = av.Packet(data)
            packet.time_base = time_base
            packet.pts = pts + r * span
            packet.dts = dts + r * span
            packet.duration = duration
            packet.is_keyframe = key
            packet.stream = stream
            out.mux(packet)


def _add_video_stream(out, codec: str):
    vstream = out.add_stream(codec, rate=_VIDEO_FPS)
    vstream.width = vstream.height = _VIDEO_SIZE
    vstream.pix_fmt = "yuv420p"
    if codec == "libvpx":
        vstream.bit_rate = 50_000
    return vstream


def _write_video_frames(out, stream, seconds: float) -> None:
    n_frames = max(1, int(np.ceil(seconds * _VIDEO_FPS)))
    for i in range(n_frames):
        image = np.full((_VIDEO_SIZE, _VIDEO_SIZE, 3), (i * 37) % 256, dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = i
        frame.time_base = Fraction(1, _VIDEO_FPS)
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)


def wav_bytes(data: bytes, sample_rate: int, channels: int, bits_per_sample: int = 16,
              format_tag: int = 1, data_size: int | None = None) -> bytes:
    """A hand-made RIFF/WAVE file around ``data``: a plain WAVEFORMAT header (no channel mask),
    any ``format_tag`` (1 = PCM; an unknown tag makes a codec nobody decodes) and a ``data``
    chunk size that may lie (``data_size``)."""
    import struct

    block_align = channels * bits_per_sample // 8
    fmt = struct.pack("<HHIIHH", format_tag, channels, sample_rate, sample_rate * block_align,
                      block_align, bits_per_sample)
    size = len(data) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", min(len(body), 2**32 - 1)) + body


def pcm16(samples: np.ndarray) -> bytes:
    """(C, N) float32 -> interleaved little-endian 16-bit PCM bytes."""
    x = np.clip(np.atleast_2d(samples).T, -1.0, 1.0)
    return (x * 32767.0).round().astype("<i2").tobytes()


# --- signals -------------------------------------------------------------------------------


def _time(seconds: float, sr: int) -> np.ndarray:
    return np.arange(int(round(seconds * sr)), dtype=np.float64) / sr


def tone(freq: float, seconds: float, sr: int, channels: int = 1, amplitude: float = 0.5) -> np.ndarray:
    """A sine at ``freq`` Hz, the same in every channel: (channels, seconds * sr) float32."""
    wave = (amplitude * np.sin(2 * np.pi * freq * _time(seconds, sr))).astype(np.float32)
    return np.repeat(wave[None, :], channels, axis=0)


def silence(seconds: float, sr: int, channels: int = 1) -> np.ndarray:
    return np.zeros((channels, int(round(seconds * sr))), dtype=np.float32)


def noise(seconds: float, sr: int, channels: int = 1, amplitude: float = 0.2,
          color: str = "white", seed: int = 0) -> np.ndarray:
    """White or pink (1/f power) Gaussian noise, peak-normalised to ``amplitude``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((channels, int(round(seconds * sr))))
    if color == "pink":
        spectrum = np.fft.rfft(x, axis=1)
        f = np.fft.rfftfreq(x.shape[1], 1 / sr)
        spectrum /= np.sqrt(np.maximum(f, 1.0))
        x = np.fft.irfft(spectrum, n=x.shape[1], axis=1)
    elif color != "white":
        raise ValueError(f"color must be 'white' or 'pink', not {color!r}")
    return (amplitude * x / np.abs(x).max()).astype(np.float32)


def tone_bursts(freq: float, seconds: float, sr: int, burst_s: float = 1.5, gap_s: float = 0.5,
                channels: int = 1, amplitude: float = 0.5) -> np.ndarray:
    """Bursts of a sine separated by digital silence: burst k spans
    [k * (burst_s + gap_s), k * (burst_s + gap_s) + burst_s), the gaps are exact zeros."""
    t = _time(seconds, sr)
    on = np.mod(t, burst_s + gap_s) < burst_s
    wave = np.where(on, amplitude * np.sin(2 * np.pi * freq * t), 0.0).astype(np.float32)
    return np.repeat(wave[None, :], channels, axis=0)


def speech_like(seconds: float, sr: int = 16000, seed: int = 0, amplitude: float = 0.5) -> np.ndarray:
    """Voice-like mono signal: harmonic "syllables" (f0 100-220 Hz, formant-shaped harmonics,
    ~4 per second) grouped into phrases separated by pauses, over a faint noise floor."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    out = np.zeros(n, dtype=np.float64)
    pos = 0
    while pos < n:
        for _ in range(rng.integers(3, 9)):          # syllables in a phrase
            length = int(rng.uniform(0.12, 0.3) * sr)
            if pos + length > n:
                break
            t = np.arange(length) / sr
            f0 = rng.uniform(100, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
            phase = 2 * np.pi * np.cumsum(f0) / sr
            formants = rng.uniform([300, 900, 2200], [800, 1800, 3000])
            syllable = np.zeros(length)
            for k in range(1, 30):
                fk = k * f0.mean()
                if fk > sr / 2 - 500:
                    break
                gain = sum(np.exp(-((fk - fm) / 150.0) ** 2) for fm in formants) + 0.05
                syllable += gain / k * np.sin(k * phase)
            syllable *= np.hanning(length)
            out[pos:pos + length] += syllable
            pos += length + int(rng.uniform(0.02, 0.08) * sr)
        pos += int(rng.uniform(0.3, 0.8) * sr)              # pause between phrases
    out += 0.003 * rng.standard_normal(n)
    return (amplitude * out / max(np.abs(out).max(), 1e-9)).astype(np.float32)[None, :]


def music_like(seconds: float, sr: int = 44100, channels: int = 2, bpm: float = 120.0,
               seed: int = 0, amplitude: float = 0.5) -> np.ndarray:
    """Music-like signal: a chord progression of decaying harmonic notes plus a kick on every
    beat; channels get slightly different mixes (stereo width)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    beat = 60.0 / bpm
    chords = [(220.0, 277.18, 329.63), (196.0, 246.94, 293.66), (174.61, 220.0, 261.63), (196.0, 246.94, 329.63)]
    left = np.zeros(n)
    right = np.zeros(n)
    bar = 4 * beat
    for b in range(int(np.ceil(seconds / bar))):
        start = int(b * bar * sr)
        stop = min(n, int((b + 1) * bar * sr))
        tt = t[start:stop] - b * bar
        env = np.exp(-tt / 1.5)
        for i, f in enumerate(chords[b % len(chords)]):
            note = sum(np.sin(2 * np.pi * k * f * tt) / k ** 1.5 for k in range(1, 5)) * env
            left[start:stop] += note * (1.0 - 0.3 * i)
            right[start:stop] += note * (0.4 + 0.3 * i)
    kick_len = int(0.15 * sr)
    kt = np.arange(kick_len) / sr
    kick = np.sin(2 * np.pi * (50 + 80 * np.exp(-kt * 30)) * kt) * np.exp(-kt * 20)
    for k in range(int(seconds / beat)):
        s = int(k * beat * sr)
        e = min(n, s + kick_len)
        left[s:e] += 1.5 * kick[:e - s]
        right[s:e] += 1.5 * kick[:e - s]
    mix = np.stack([left, right])
    mix += 0.002 * rng.standard_normal(mix.shape)
    mix = amplitude * mix / np.abs(mix).max()
    if channels == 1:
        mix = mix.mean(axis=0, keepdims=True)
    elif channels > 2:
        mix = np.concatenate([mix, np.repeat(mix.mean(axis=0, keepdims=True), channels - 2, axis=0)])
    return mix.astype(np.float32)


# --- demo ----------------------------------------------------------------------------------


def make_demo_clips(directory: str | os.PathLike, seconds: float = 12.0) -> list[Path]:
    """Write a handful of short clips for the product demo; returns their paths (sorted).

    speech-like (mp3, 16 kHz mono), music-like (m4a, 44.1 kHz stereo, 2.5x ``seconds`` so it
    spans several 30 s windows at the default ``seconds``), pink noise (flac), silence (opus),
    a tone in a video container (mp4), and one broken file (``broken.mp3``, not audio at all).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    clips = {
        "speech_like.mp3": (speech_like(seconds, 16000), 16000, "mp3"),
        "music_like.m4a": (music_like(2.5 * seconds, 44100), 44100, "m4a"),
        "pink_noise.flac": (noise(seconds, 22050, color="pink"), 22050, "flac"),
        "silence.opus": (silence(seconds, 48000), 48000, "opus"),
        "tone_440hz.mp4": (tone(440.0, seconds, 44100, channels=2), 44100, "mp4"),
    }
    paths = []
    for name, (signal, sr, fmt) in clips.items():
        write_audio(d / name, signal, sr, fmt)
        paths.append(d / name)
    broken = d / "broken.mp3"
    broken.write_bytes(b"this is not an mp3 file\n" * 64)
    paths.append(broken)
    return sorted(paths)
