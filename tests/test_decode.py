"""Decode stage: real encoded files (made here with PyAV) -> 16 kHz mono windows + FileInfo.

Physical invariants only: duration, dominant frequency, level, timestamps, bytes read, memory.
"""

from __future__ import annotations

import gc
import io
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from pipelines import synth as S
from pipelines.decode import (
    ERROR_TYPES,
    SAMPLE_RATE,
    DecodeOptions,
    FileInfo,
    Window,
    Windower,
    decode_file,
    iter_windows,
    mono,
    reading,
    stream,
)
from pipelines.sources import FileRef, file_id_for, list_inputs

SR = SAMPLE_RATE


# --- helpers -------------------------------------------------------------------------------


def ref_for(path) -> FileRef:
    (ref,) = list_inputs(str(path))
    return ref


def missing_ref(uri: str) -> FileRef:
    return FileRef(uri=uri, size_bytes=None, etag=None, mtime=None, file_id=file_id_for(uri))


def run(ref: FileRef, options: DecodeOptions = DecodeOptions(), storage_options=None):
    """decode_file -> (windows, info), checking the stream's shape on the way."""
    items = list(decode_file(ref, options, storage_options))
    *windows, info = items
    assert isinstance(info, FileInfo)
    assert all(isinstance(w, Window) for w in windows)
    assert info.n_segments == len(windows)
    assert [w.segment_index for w in windows] == list(range(len(windows)))
    for w in windows:
        assert w.samples.dtype == np.float32 and w.samples.ndim == 1
        assert len(w.samples) == round((w.end_s - w.start_s) * SR)
        assert len(w.samples) <= options.window_samples
        assert (w.file_id, w.uri) == (ref.file_id, ref.uri)
    if info.status in ("ok", "partial"):
        assert windows, info
    if info.status != "ok":
        assert info.error_type in ERROR_TYPES, info
    return windows, info


def joined(windows) -> np.ndarray:
    return np.concatenate([w.samples for w in windows]) if windows else np.zeros(0, np.float32)


def dominant_hz(x: np.ndarray, sr: int = SR) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * sr / len(x))


def band_level(x: np.ndarray, hz: float, sr: int = SR) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(round(hz * len(x) / sr))
    return float(spectrum[max(0, k - 3):k + 4].max())


# --- windowing (pure) ----------------------------------------------------------------------


def test_options_are_validated():
    with pytest.raises(ValueError):
        DecodeOptions(window_s=30.5)
    with pytest.raises(ValueError):
        DecodeOptions(window_s=10, hop_s=11)
    with pytest.raises(ValueError):
        DecodeOptions(hop_s=0)
    with pytest.raises(ValueError):
        DecodeOptions(channel_mode="left")
    with pytest.raises(ValueError):
        DecodeOptions(max_bytes=0)
    assert DecodeOptions().window_samples == 30 * SR
    assert DecodeOptions(window_s=10, hop_s=4).hop_samples == 4 * SR


def test_windows_tile_the_stream_and_the_last_is_shorter():
    x = np.random.default_rng(0).standard_normal(int(100.5 * SR)).astype(np.float32)
    windows = list(iter_windows([x], DecodeOptions(), "f", "u"))
    assert [(w.start_s, w.end_s) for w in windows] == [(0, 30), (30, 60), (60, 90), (90, 100.5)]
    for a, b in zip(windows, windows[1:]):
        assert a.end_s == b.start_s
    np.testing.assert_array_equal(joined(windows), x)
    assert not any(w.is_silent for w in windows)


def test_chunking_does_not_change_windows():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(int(65.3 * SR)).astype(np.float32)
    cuts = np.sort(rng.integers(0, len(x), 200))
    chunks = np.split(x, cuts)
    options = DecodeOptions(window_s=7.5)
    whole = list(iter_windows([x], options))
    pieces = list(iter_windows(chunks, options))
    assert [(w.start_s, w.end_s) for w in pieces] == [(w.start_s, w.end_s) for w in whole]
    for a, b in zip(whole, pieces):
        np.testing.assert_array_equal(a.samples, b.samples)


def test_overlapping_windows_cover_everything():
    x = np.arange(25 * SR, dtype=np.float32)
    windows = list(iter_windows([x], DecodeOptions(window_s=10, hop_s=4)))
    assert [(w.start_s, w.end_s) for w in windows] == [(0, 10), (4, 14), (8, 18), (12, 22), (16, 25)]
    for w in windows:
        np.testing.assert_array_equal(w.samples, x[round(w.start_s * SR):round(w.end_s * SR)])


def test_exact_multiple_has_no_empty_tail():
    windows = list(iter_windows([np.ones(60 * SR, np.float32)]))
    assert [(w.start_s, w.end_s) for w in windows] == [(0, 30), (30, 60)]
    assert list(iter_windows([np.zeros(0, np.float32)])) == []


def test_digital_silence_is_marked_and_kept():
    x = np.concatenate([np.zeros(45 * SR), S.tone(440, 10, SR)[0]]).astype(np.float32)
    windows = list(iter_windows([x]))
    assert [w.is_silent for w in windows] == [True, False]
    # 1 LSB of dither is still digital silence; 2 LSB is not.
    assert list(iter_windows([np.full(SR, 2.0 ** -15, np.float32)]))[0].is_silent
    assert not list(iter_windows([np.full(SR, 2.0 ** -14, np.float32)]))[0].is_silent


def _in_gap(t: float, burst_s: float = 1.5, gap_s: float = 0.5) -> bool:
    return burst_s <= t % (burst_s + gap_s) <= burst_s + gap_s


def test_snapped_cuts_land_in_gaps_within_the_last_two_seconds():
    # Bursts of 1.5 s with 0.5 s gaps: an unsnapped cut at 30 s, 60 s... falls mid-burst.
    x = S.tone_bursts(440, 100.0, SR, burst_s=1.5, gap_s=0.5)[0]
    assert not _in_gap(30.0 + 0.7)
    windows = list(iter_windows([x], DecodeOptions(snap_to_silence=True)))
    assert len(windows) == 4
    for w in windows[:-1]:
        assert 28.0 <= w.end_s - w.start_s <= 30.0
        assert _in_gap(w.end_s), w.end_s
    for a, b in zip(windows, windows[1:]):
        assert a.end_s == b.start_s
    np.testing.assert_array_equal(joined(windows), x)
    assert windows[-1].end_s == 100.0


def test_snapping_finds_a_real_pause_in_noisy_audio():
    rng = np.random.default_rng(2)
    x = (0.3 * rng.standard_normal(40 * SR)).astype(np.float32)
    x[int(28.6 * SR):int(28.9 * SR)] *= 0.01          # a quiet 300 ms, 1.1-1.4 s before the cut
    (first, second) = list(iter_windows([x], DecodeOptions(snap_to_silence=True)))
    assert 28.6 <= first.end_s <= 28.9
    assert second.start_s == first.end_s


def test_windower_is_usable_directly():
    w = Windower(DecodeOptions(window_s=1.0), file_id="abc", uri="mem://x")
    out = list(w.push(np.ones(SR + 10, np.float32))) + list(w.flush())
    assert [(o.start_s, o.end_s, o.file_id, o.uri) for o in out] == [
        (0.0, 1.0, "abc", "mem://x"), (1.0, (SR + 10) / SR, "abc", "mem://x")]
    assert w.n_windows == 2 and w.n_samples == SR + 10


# --- acceptance 1: formats, rates, channels ------------------------------------------------

TONE_HZ = 440.0
SECONDS = 2.5

_PCM_CASES = [(r, c) for r in (8000, 16000, 22050, 44100, 48000, 96000) for c in (1, 2)] + [(48000, 6), (44100, 8)]
FORMAT_CASES = (
    [("wav", r, c) for r, c in _PCM_CASES]
    + [("wav24", r, c) for r, c in _PCM_CASES]
    + [("wavf32", r, c) for r, c in _PCM_CASES]
    + [("flac", r, c) for r, c in _PCM_CASES + [(96000, 8)]]
    + [("mp3", r, c) for r in (8000, 22050, 44100, 48000) for c in (1, 2)]
    + [("ogg", r, 2) for r in (8000, 22050, 44100, 48000, 96000)]   # FFmpeg's vorbis: stereo only
    + [("opus", r, c) for r in (8000, 16000, 24000, 48000) for c in (1, 2)] + [("opus", 48000, 6)]
    + [("m4a", r, c) for r in (8000, 22050, 44100, 48000, 96000) for c in (1, 2)] + [("m4a", 48000, 6)]
    + [("mp4", 44100, 2), ("mp4", 22050, 1), ("mp4", 48000, 6)]
    + [("mkv", 48000, 2), ("mkv", 8000, 1), ("mkv", 96000, 8)]
    + [("mov", 48000, 2), ("mov", 44100, 1)]
    + [("webm", 48000, 2), ("webm", 16000, 1)]
)
AAC_FRAME = 1024  # samples per AAC frame: FFmpeg's mov demuxer keeps the last frame's padding


@pytest.mark.parametrize("fmt,rate,channels", FORMAT_CASES,
                         ids=[f"{f}-{r}-{c}ch" for f, r, c in FORMAT_CASES])
def test_tone_decodes_to_right_duration_and_pitch(tmp_path, fmt, rate, channels):
    path = tmp_path / f"tone{S.suffix(fmt)}"
    enc = S.write_audio(path, S.tone(TONE_HZ, SECONDS, rate, channels), rate, fmt)
    assert enc.sample_rate == rate
    windows, info = run(ref_for(path))
    assert info.status == "ok", info
    assert info.channels_in == enc.channels
    assert info.sample_rate_in == (48000 if enc.codec == "libopus" else rate)
    tolerance = 0.030 + (AAC_FRAME / rate if enc.codec == "aac" else 0.0)
    assert abs(info.duration_s - SECONDS) <= tolerance, info.duration_s
    x = joined(windows)
    assert len(x) == round(info.duration_s * SR)
    assert abs(dominant_hz(x) - TONE_HZ) < 2.0
    # The down-mix is a normalised mean: a 0.5-amplitude tone in every channel stays at ~0.5.
    middle = x[SR // 2:-SR // 2]
    rms = float(np.sqrt(np.mean(middle ** 2)))
    assert 0.5 / np.sqrt(2) * 0.8 < rms < 0.5 / np.sqrt(2) * 1.2, rms


def test_file_info_describes_the_input(tmp_path):
    path = tmp_path / "a.m4a"
    S.write_audio(path, S.tone(440, 1.0, 44100, 2), 44100, "m4a")
    _, info = run(ref_for(path))
    assert (info.container, info.codec, info.sample_rate_in, info.channels_in) == (
        "mov,mp4,m4a,3gp,3g2,mj2", "aac", 44100, 2)
    assert (info.error_type, info.error_message) == (None, None)


def _two_tone(rate: int, channels: int, seconds: float = 2.0) -> np.ndarray:
    x = S.tone(1000.0, seconds, rate, channels)
    x[0] = S.tone(TONE_HZ, seconds, rate)[0]
    return x


@pytest.mark.parametrize("fmt,channels", [("wav", 2), ("flac", 6), ("m4a", 2)])
def test_channel_mode_first_takes_channel_zero(tmp_path, fmt, channels):
    path = tmp_path / f"two{S.suffix(fmt)}"
    S.write_audio(path, _two_tone(48000, channels), 48000, fmt)
    mixed = joined(run(ref_for(path))[0])
    first = joined(run(ref_for(path), DecodeOptions(channel_mode="first"))[0])
    assert band_level(mixed, 1000.0) > 0.3 * band_level(mixed, TONE_HZ)
    assert dominant_hz(first) == pytest.approx(TONE_HZ, abs=2)
    assert band_level(first, 1000.0) < 0.01 * band_level(first, TONE_HZ)
    rms = float(np.sqrt(np.mean(first[SR // 4:-SR // 4] ** 2)))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.1)   # channel 0 as it was, not mixed


def test_stereo_mix_is_the_mean_of_the_channels(tmp_path):
    rate = 16000
    left, right = S.tone(300, 2.0, rate)[0], S.noise(2.0, rate, seed=3)[0]
    path = tmp_path / "lr.wav"
    S.write_audio(path, np.stack([left, right]), rate, "wavf32")
    x = joined(run(ref_for(path))[0])   # 16 kHz in: no resampling, only the down-mix
    np.testing.assert_allclose(x, (left + right) / 2, atol=1e-5)


def test_layout_without_channel_positions_is_averaged(tmp_path):
    # A plain WAVEFORMAT header with 3 channels has no layout; swresample cannot down-mix it.
    path = tmp_path / "three.wav"
    path.write_bytes(S.wav_bytes(S.pcm16(S.tone(440, 2.0, 16000, channels=3)), 16000, 3))
    windows, info = run(ref_for(path))
    assert info.status == "ok" and info.channels_in == 3
    assert np.abs(joined(windows)).max() == pytest.approx(0.5, abs=0.01)


# Every sample format FFmpeg decoders hand out that the numpy fast path reads, packed and planar.
_INT_FORMATS = {"u8": (np.uint8, 128.0, 128.0), "s16": (np.int16, 0.0, 32768.0), "s32": (np.int32, 0.0, 2.0**31)}
_FLOAT_FORMATS = {"flt": np.float32, "dbl": np.float64}


def _frame_of(unit: np.ndarray, fmt: str, layout: str):
    """A real av.AudioFrame holding unit-scale samples (C, N) in the sample format fmt."""
    import av

    base = fmt.rstrip("p")
    if base in _INT_FORMATS:
        dtype, offset, scale = _INT_FORMATS[base]
        ints = np.clip(np.round(unit * scale + offset), np.iinfo(dtype).min, np.iinfo(dtype).max)
        data = ints.astype(dtype)
    else:
        data = unit.astype(_FLOAT_FORMATS[base])
    data = data if fmt.endswith("p") else data.T.reshape(1, -1)    # packed: interleaved
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
    frame.sample_rate = SR
    return frame, data


@pytest.mark.parametrize("fmt", ["u8", "s16", "s32", "flt", "dbl", "u8p", "s16p", "s32p", "fltp", "dblp"])
@pytest.mark.parametrize("layout,mode", [("mono", "mix"), ("stereo", "mix"), ("stereo", "first"),
                                         ("3 channels", "mix"), ("5.1", "first")])
def test_every_sample_format_becomes_the_channel_mean(fmt, layout, mode):
    """Frames of each sample format -> the mean of the channels (or channel 0) in [-1, 1]."""
    channels = {"mono": 1, "stereo": 2, "3 channels": 3, "5.1": 6}[layout]
    rng = np.random.default_rng(channels)
    unit = rng.uniform(-0.9, 0.9, (channels, 3000)).astype(np.float64)
    to_mono = mono.ToMono16k(SR, mode)     # 16 kHz in: no resampling, only the reading
    chunks = []
    for start in range(0, 3000, 1000):
        frame, _ = _frame_of(unit[:, start:start + 1000], fmt, layout)
        chunks += to_mono.feed(frame)
    chunks += to_mono.flush()
    got = np.concatenate(chunks)
    expected = unit[0] if mode == "first" or channels == 1 else unit.mean(axis=0)
    step = {"u8": 1 / 128, "s16": 1 / 32768}.get(fmt.rstrip("p"), 1e-6)   # quantisation
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=step)


def test_a_format_change_mid_stream_keeps_every_sample():
    """Streams may switch rate/layout/format part-way (e.g. concatenated files): the resampler
    is flushed and restarted, nothing is dropped or doubled."""
    to_mono = mono.ToMono16k(SR, "mix")
    parts = [("s16", "stereo", 44100, 1.5), ("fltp", "mono", 48000, 1.0), ("flt", "stereo", 16000, 0.5),
             ("fltp", "5.1", 48000, 0.5)]     # the last goes through libswresample's down-mix
    out, expected = [], 0
    for fmt, layout, rate, seconds in parts:
        channels = {"mono": 1, "stereo": 2, "5.1": 6}[layout]
        unit = np.tile(S.tone(440.0, seconds, rate)[:1], (channels, 1)).astype(np.float64)
        for start in range(0, unit.shape[1], 1152):
            frame, _ = _frame_of(unit[:, start:start + 1152], fmt, layout)
            frame.sample_rate = rate
            out += to_mono.feed(frame)
        expected += round(seconds * SR)
    out += to_mono.flush()
    x = np.concatenate(out)
    assert abs(x.size - expected) <= 4 * 16, (x.size, expected)    # resampler edges only
    assert abs(dominant_hz(x) - 440.0) < 2.0
    rms = float(np.sqrt(np.mean(x[SR // 4:-SR // 4] ** 2)))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


def test_pure_digital_silence_file_is_kept_and_marked(tmp_path):
    path = tmp_path / "quiet.flac"
    S.write_audio(path, S.silence(40.0, 44100, 2), 44100, "flac")
    windows, info = run(ref_for(path))
    assert info.status == "ok" and len(windows) == 2
    assert all(w.is_silent for w in windows)


def test_snap_to_silence_on_a_decoded_file(tmp_path):
    path = tmp_path / "bursts.flac"
    S.write_audio(path, S.tone_bursts(440, 65.0, 44100), 44100, "flac")
    windows, info = run(ref_for(path), DecodeOptions(snap_to_silence=True))
    assert info.status == "ok" and len(windows) == 3
    for w in windows[:-1]:
        assert 28.0 <= w.end_s - w.start_s <= 30.0
        assert _in_gap(w.end_s), w.end_s


# --- acceptance 2: from a real S3 endpoint -------------------------------------------------

S3_FORMATS = ["wav", "wav24", "flac", "mp3", "ogg", "opus", "m4a", "mp4", "mkv", "mov", "webm"]


def test_s3_objects_decode_identically_to_local_files(tmp_path, s3fs_client, s3_storage_options):
    s3fs_client.mkdir("audio")
    signal = S.music_like(4.0, 44100, channels=2)
    for fmt in S3_FORMATS:
        path = tmp_path / f"clip_{fmt}{S.suffix(fmt)}"
        S.write_audio(path, signal, 44100, fmt)
        s3fs_client.put(str(path), f"audio/in/{path.name}")
    remote = list_inputs("s3://audio/in/", s3_storage_options)
    local = list_inputs(str(tmp_path))
    assert [r.uri.rsplit("/", 1)[1] for r in remote] == [r.uri.rsplit("/", 1)[1] for r in local]
    options = DecodeOptions(window_s=1.5)
    for r, loc in zip(remote, local):
        assert r.uri.startswith("s3://audio/in/") and r.etag and r.size_bytes == loc.size_bytes
        rw, ri = run(r, options, s3_storage_options)
        lw, li = run(loc, options)
        assert ri.status == li.status == "ok", (ri, li)
        assert (ri.container, ri.codec, ri.sample_rate_in, ri.channels_in, ri.duration_s) == (
            li.container, li.codec, li.sample_rate_in, li.channels_in, li.duration_s)
        assert [(w.start_s, w.end_s) for w in rw] == [(w.start_s, w.end_s) for w in lw]
        np.testing.assert_array_equal(joined(rw), joined(lw))


@pytest.fixture
def count_s3_reads(monkeypatch):
    """Counts the bytes s3fs fetches from the server (all ranged GETs of open files)."""
    import s3fs.core

    counter = {"bytes": 0, "requests": 0}
    original = s3fs.core.S3File._fetch_range

    def counting(self, start, end):
        data = original(self, start, end)
        counter["bytes"] += len(data)
        counter["requests"] += 1
        return data

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting)
    return counter


@pytest.mark.parametrize("fmt,rate,channels,bit_rate,block_size", [
    ("mp3", 44100, 2, 128_000, None),          # 57.6 MB, the default 4 MiB block
    ("opus", 16000, 1, 24_000, 512 * 2**10),   # 10.8 MB, a 512 KiB block
])
def test_first_window_of_an_hour_reads_a_small_part(s3fs_client, s3_storage_options, count_s3_reads,
                                                     fmt, rate, channels, bit_rate, block_size):
    chunk = S.tone(440.0, 10.0, rate, channels)
    data = io.BytesIO()
    S.write_audio(data, chunk, rate, fmt, bit_rate=bit_rate, repeats=360)   # 1 h, muxed not encoded
    size = len(data.getbuffer())
    s3fs_client.mkdir("long")
    s3fs_client.pipe(f"long/hour{S.suffix(fmt)}", data.getvalue())
    (ref,) = list_inputs("s3://long/", s3_storage_options)
    assert ref.size_bytes == size
    options = DecodeOptions() if block_size is None else DecodeOptions(block_size=block_size)
    items = decode_file(ref, options, s3_storage_options)
    first = next(items)
    assert isinstance(first, Window) and first.end_s == 30.0
    read = count_s3_reads["bytes"]
    assert read < 0.10 * size, f"{read} of {size} bytes for the first window"
    assert read <= options.block_size + 2 * reading.TAIL_BYTES + 2 * reading.AVIO_BUFFER_BYTES
    items.close()


def test_listing_a_bucket_returns_etags(s3_server, s3fs_client, s3_storage_options):
    s3fs_client.mkdir("tags")
    client = s3_server.boto3_client()
    for name in ("a.mp3", "b/c.wav", "b/d.txt"):
        client.put_object(Bucket="tags", Key=name, Body=name.encode() * 100)
    refs = list_inputs("s3://tags", s3_storage_options)
    assert [r.uri for r in refs] == ["s3://tags/a.mp3", "s3://tags/b/c.wav"]
    for r in refs:
        head = client.head_object(Bucket="tags", Key=r.uri.removeprefix("s3://tags/"))
        assert r.etag == head["ETag"].strip('"')
        assert r.version == r.etag
        assert r.size_bytes == head["ContentLength"]
        assert r.mtime == head["LastModified"]


def test_object_deleted_after_listing_is_not_found(tmp_path, s3fs_client, s3_storage_options):
    s3fs_client.mkdir("gone")
    S.write_audio(tmp_path / "x.flac", S.tone(440, 1.0, 16000), 16000, "flac")
    s3fs_client.put(str(tmp_path / "x.flac"), "gone/x.flac")
    (ref,) = list_inputs("s3://gone/", s3_storage_options)
    s3fs_client.rm("gone/x.flac")
    windows, info = run(ref, DecodeOptions(), s3_storage_options)
    assert (info.status, info.error_type, windows) == ("error", "not_found", [])


# --- acceptance 3: a 3-hour file streams in bounded memory ---------------------------------


class _CountingReader(io.RawIOBase):
    """Wraps a file object; counts the bytes read through it."""

    def __init__(self, f):
        self._f = f
        self.bytes_read = 0
        self.size = getattr(f, "size", None)

    def readable(self):
        return True

    def seekable(self):
        return True

    def read(self, n=-1):
        data = self._f.read(n)
        self.bytes_read += len(data)
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def seek(self, offset, whence=io.SEEK_SET):
        return self._f.seek(offset, whence)

    def tell(self):
        return self._f.tell()

    def close(self):
        self._f.close()
        super().close()


def test_three_hour_file_streams_in_bounded_memory(tmp_path, monkeypatch):
    path = tmp_path / "three_hours.mp3"
    S.write_audio(path, S.speech_like(60.0, 8000), 8000, "mp3", bit_rate=8000, repeats=180)
    ref = ref_for(path)
    readers = []
    original_open = stream.open_input

    def counting_open(*args, **kwargs):
        readers.append(_CountingReader(original_open(*args, **kwargs)))
        return readers[-1]

    monkeypatch.setattr(stream, "open_input", counting_open)
    gc.collect()
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample_rss():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    read_at_first_window = None
    n_windows = 0
    try:
        for item in decode_file(ref):
            if isinstance(item, Window):
                n_windows += 1
                if read_at_first_window is None:
                    read_at_first_window = readers[0].bytes_read
            else:
                info = item
    finally:
        done.set()
        sampler.join()
    assert info.status == "ok" and info.duration_s > 3 * 3600
    assert n_windows == info.n_segments == int(np.ceil(info.duration_s / 30))
    assert read_at_first_window < 0.05 * ref.size_bytes
    assert readers[0].bytes_read >= ref.size_bytes * 0.99
    growth_mb = (peak - baseline) / 2**20
    assert growth_mb < 100, f"RSS grew by {growth_mb:.0f} MB"   # the decoded audio is 660 MB


# --- acceptance 4: bad input never raises --------------------------------------------------


def _truncate(src, dst, fraction: float) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * fraction)])


@pytest.fixture(scope="module")
def speech_files(tmp_path_factory):
    """70 s of speech-like audio in a few formats, shared by the damage tests."""
    d = tmp_path_factory.mktemp("speech")
    signal = S.speech_like(70.0, 16000)
    return {fmt: (d / f"speech{S.suffix(fmt)}", S.write_audio(d / f"speech{S.suffix(fmt)}", signal, 16000, fmt))[0]
            for fmt in ("mp3", "flac", "m4a", "wav")}


def _bad_file(kind: str, d, speech_files):
    if kind == "zero_bytes":
        p = d / "empty.mp3"
        p.write_bytes(b"")
    elif kind == "text_named_mp3":
        p = d / "notes.mp3"
        p.write_text("not audio at all\n" * 200)
    elif kind == "random_bytes":
        p = d / "noise.wav"
        p.write_bytes(np.random.default_rng(5).integers(0, 256, 30000, dtype=np.uint8).tobytes())
    elif kind == "html_named_m4a":
        p = d / "page.m4a"
        p.write_text("<html><body>403 Forbidden</body></html>")
    elif kind == "video_without_audio_mp4":
        p = d / "silent_film.mp4"
        S.write_video(p, 3.0, "mp4")
    elif kind == "video_without_audio_webm":
        p = d / "silent_film.webm"
        S.write_video(p, 3.0, "webm")
    elif kind == "unknown_codec":
        p = d / "odd.wav"
        p.write_bytes(S.wav_bytes(S.pcm16(S.tone(440, 2, 16000)), 16000, 1, format_tag=0x1234))
    elif kind == "truncated_m4a_without_moov":
        p = d / "cut.m4a"
        _truncate(speech_files["m4a"], p, 0.6)
    else:
        raise KeyError(kind)
    return p


BAD_CASES = {
    "zero_bytes": "empty_file",
    "text_named_mp3": "invalid_data",
    "random_bytes": "invalid_data",
    "html_named_m4a": "invalid_data",
    "video_without_audio_mp4": "no_audio_stream",
    "video_without_audio_webm": "no_audio_stream",
    "unknown_codec": "unsupported_codec",
    "truncated_m4a_without_moov": "invalid_data",
}


@pytest.mark.parametrize("kind", list(BAD_CASES))
def test_bad_file_gives_one_error_row(tmp_path, speech_files, kind):
    windows, info = run(ref_for(_bad_file(kind, tmp_path, speech_files)))
    assert (info.status, info.error_type, windows) == ("error", BAD_CASES[kind], []), info
    assert info.error_message


@pytest.mark.parametrize("fmt", ["mp3", "flac"])
def test_truncated_stream_keeps_earlier_windows(tmp_path, speech_files, fmt):
    full_windows, full = run(ref_for(speech_files[fmt]))
    cut = tmp_path / f"cut{S.suffix(fmt)}"
    _truncate(speech_files[fmt], cut, 0.6)
    windows, info = run(ref_for(cut))
    assert (info.status, info.error_type) == ("partial", "truncated"), info
    assert 40 < info.duration_s < 44 and len(windows) == 2
    np.testing.assert_allclose(windows[0].samples, full_windows[0].samples, atol=1e-6)


def test_vbr_mp3_without_length_header_is_not_called_truncated(tmp_path):
    # No Xing header and a quiet start: FFmpeg estimates the length from the first frame's
    # bit rate (here ~3x too long); that estimate must not make a complete file "truncated".
    signal = np.concatenate([S.silence(20.0, 22050), S.music_like(40.0, 22050, channels=1)], axis=1)
    path = tmp_path / "vbr.mp3"
    S.write_audio(path, signal, 22050, "mp3", vbr_quality=4, muxer_options={"write_xing": "0"})
    _, info = run(ref_for(path))
    assert (info.status, info.error_type) == ("ok", None), info
    assert abs(info.duration_s - 60.0) < 0.1


def test_damaged_packets_are_skipped_and_reported(tmp_path, speech_files):
    data = bytearray(speech_files["mp3"].read_bytes())
    mid = len(data) // 2
    data[mid:mid + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    path = tmp_path / "damaged.mp3"
    path.write_bytes(bytes(data))
    windows, info = run(ref_for(path))
    assert (info.status, info.error_type) == ("partial", "decode_error"), info
    assert "undecodable" in info.error_message
    assert info.duration_s > 69 and len(windows) == 3   # the timeline is kept


def test_a_skipped_packet_becomes_silence_where_it_was(tmp_path):
    """The silence for an undecodable packet sits at the packet's own time: the audio decoded
    before it (still gathered for the resampler) comes first and is sample for sample the
    undamaged file's decode. (After the damage the resampler's phase differs: the demuxer drops
    the garbage bytes, so no sample-exact comparison there.)"""
    clean = tmp_path / "clean.mp3"
    S.write_audio(clean, S.music_like(20.0, 44100, 2), 44100, "mp3", bit_rate=128_000)
    data = bytearray(clean.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged.mp3"
    damaged.write_bytes(bytes(data))
    x, y = (joined(run(ref_for(p))[0]) for p in (clean, damaged))
    lost = x.size - y.size      # the demuxer resyncs past garbage bytes: a few frames are gone
    assert 0 <= lost < 0.2 * SR
    zero = np.flatnonzero(y[:-1] == 0)
    gap = zero[np.flatnonzero(np.diff(zero) == 1)]     # runs of exact zeros: the inserted silence
    assert gap.size > 0.02 * SR
    t_damage = mid / len(data) * 20.0                  # CBR: bytes are proportional to time
    assert abs(gap[0] / SR - t_damage) < 0.15 and abs(gap[-1] / SR - t_damage) < 0.3
    before = int((t_damage - 0.15) * SR)
    np.testing.assert_allclose(y[:before], x[:before], atol=1e-6)


def test_missing_file_and_directory(tmp_path):
    _, info = run(missing_ref(str(tmp_path / "nope.mp3")))
    assert (info.status, info.error_type) == ("error", "not_found")
    (tmp_path / "dir.mp3").mkdir()
    _, info = run(missing_ref(str(tmp_path / "dir.mp3")))
    assert (info.status, info.error_type) == ("error", "not_a_file")


def test_permission_denied_local(tmp_path):
    path = tmp_path / "locked.flac"
    S.write_audio(path, S.tone(440, 1.0, 16000), 16000, "flac")
    ref = ref_for(path)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: file permissions are not enforced")
        _, info = run(ref)
    finally:
        path.chmod(0o644)
    assert (info.status, info.error_type) == ("error", "permission_denied")


def test_permission_denied_from_the_store(tmp_path):
    """A filesystem that refuses to open (as S3 does with 403 AccessDenied -> PermissionError)."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    class DeniedFileSystem(LocalFileSystem):
        protocol = ("denied",)

        def _open(self, path, *args, **kwargs):
            raise PermissionError(13, "Access Denied", path)

    fsspec.register_implementation("denied", DeniedFileSystem, clobber=True)
    path = tmp_path / "x.flac"
    S.write_audio(path, S.tone(440, 1.0, 16000), 16000, "flac")
    _, info = run(missing_ref(f"denied://{path}"))
    assert (info.status, info.error_type) == ("error", "permission_denied")


def test_read_error_part_way_keeps_earlier_windows(tmp_path, speech_files, monkeypatch):
    class Flaky(_CountingReader):
        def read(self, n=-1):
            if self.bytes_read > 0.5 * self.size:
                raise ConnectionResetError("connection reset by peer")
            return super().read(n)

    original_open = stream.open_input
    monkeypatch.setattr(stream, "open_input", lambda *a, **k: Flaky(original_open(*a, **k)))
    windows, info = run(ref_for(speech_files["wav"]))
    assert (info.status, info.error_type) == ("partial", "read_error"), info
    assert "connection reset" in info.error_message
    assert 30 < info.duration_s < 40 and len(windows) == 2


def test_an_audio_bomb_is_decoded_only_up_to_the_cap(tmp_path):
    # An hour of silence is a few hundred KB of FLAC; its header says so, but only the decoded
    # samples decide: the first max_duration_s are kept, the rest is never decoded.
    path = tmp_path / "bomb.flac"
    S.write_audio(path, S.silence(3600.0, 8000), 8000, "flac")
    assert path.stat().st_size < 2_000_000
    windows, info = run(ref_for(path), DecodeOptions(max_duration_s=600))
    assert (info.status, info.error_type) == ("partial", "too_long"), info
    assert info.duration_s == 600.0 and len(windows) == 20 and all(w.is_silent for w in windows)


def _with_flac_total_samples(data: bytes, total: int) -> bytes:
    """Rewrite the total-samples field of a FLAC STREAMINFO block (36 bits at bytes 18..25)."""
    import struct

    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0   # STREAMINFO is the first block
    (word,) = struct.unpack(">Q", data[18:26])
    word = (word & ~(2**36 - 1)) | total
    return data[:18] + struct.pack(">Q", word) + data[26:]


def test_decoded_samples_are_capped_whatever_the_header_says(tmp_path):
    # 100 s of FLAC whose STREAMINFO declares 10 s: the early check passes, the loop cap stops it.
    real = io.BytesIO()
    S.write_audio(real, S.speech_like(100.0, 16000), 16000, "flac")
    path = tmp_path / "liar.flac"
    path.write_bytes(_with_flac_total_samples(real.getvalue(), 10 * 16000))
    windows, info = run(ref_for(path), DecodeOptions(max_duration_s=25, window_s=10))
    assert (info.status, info.error_type) == ("partial", "too_long"), info
    assert info.duration_s == 25.0 and joined(windows).size == 25 * SR
    assert [w.end_s for w in windows] == [10.0, 20.0, 25.0]
    _, uncapped = run(ref_for(path))
    assert (uncapped.status, uncapped.duration_s) == ("ok", 100.0)


def test_too_large_is_rejected_before_opening(tmp_path):
    path = tmp_path / "big.wav"
    S.write_audio(path, S.tone(440, 5.0, 16000), 16000, "wav")
    windows, info = run(ref_for(path), DecodeOptions(max_bytes=10_000))
    assert (info.status, info.error_type, windows) == ("error", "too_large", [])


def test_directory_of_good_and_bad_files(tmp_path, speech_files):
    d = tmp_path / "mixed"
    d.mkdir()
    good = [("wav", 16000, 1), ("wav24", 44100, 2), ("flac", 48000, 2), ("mp3", 22050, 1),
            ("ogg", 44100, 2), ("opus", 48000, 2), ("m4a", 44100, 2), ("mp4", 48000, 2),
            ("mkv", 22050, 1), ("webm", 48000, 1)]
    for i, (fmt, rate, channels) in enumerate(good):
        S.write_audio(d / f"good_{i}{S.suffix(fmt)}", S.tone(440, 1.0 + 0.1 * i, rate, channels), rate, fmt)
    bad_kinds = ["zero_bytes", "text_named_mp3", "random_bytes", "video_without_audio_mp4",
                 "unknown_codec", "truncated_m4a_without_moov"]
    for kind in bad_kinds:
        _bad_file(kind, d, speech_files)
    refs = list_inputs(str(d))
    assert len(refs) == 16
    infos, windows = [], {}
    for ref in refs:
        for item in decode_file(ref):
            if isinstance(item, FileInfo):
                infos.append(item)
            else:
                windows.setdefault(item.file_id, []).append(item)
    assert len(infos) == 16
    ok = [i for i in infos if i.status == "ok"]
    errors = [i for i in infos if i.status == "error"]
    assert len(ok) == 10 and all(os.path.basename(i.uri).startswith("good_") for i in ok)
    assert sorted(i.error_type for i in errors) == sorted(BAD_CASES[k] for k in bad_kinds)
    for info in ok:
        assert len(windows[info.file_id]) == info.n_segments == 1
        assert abs(info.duration_s - windows[info.file_id][0].end_s) < 1e-9


def test_closing_early_releases_the_file(tmp_path, speech_files):
    items = decode_file(ref_for(speech_files["flac"]))
    assert isinstance(next(items), Window)
    items.close()   # GeneratorExit must not be swallowed or turned into an error row


# --- hygiene -------------------------------------------------------------------------------


def test_stage_modules_do_not_import_ray():
    code = ("import sys, pipelines.sources, pipelines.decode, pipelines.synth; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_demo_clips(tmp_path):
    paths = S.make_demo_clips(tmp_path, seconds=4.0)
    assert len(paths) == 6
    infos = [run(ref_for(p))[1] for p in paths]
    assert [i.status for i in infos].count("ok") == 5
    (broken,) = [i for i in infos if i.status != "ok"]
    assert broken.uri.endswith("broken.mp3") and broken.error_type == "invalid_data"


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="no ffmpeg binary to compare with")
def test_matches_ffmpeg_resampling_closely(tmp_path):
    """Cross-check against the ffmpeg CLI (when installed): same length, same signal."""
    path = tmp_path / "m.flac"
    S.write_audio(path, S.music_like(3.0, 44100, channels=1), 44100, "flac")
    ours = joined(run(ref_for(path))[0])
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-ac", "1", "-ar",
                          "16000", "-f", "f32le", "-"], check=True, capture_output=True).stdout
    theirs = np.frombuffer(out, dtype="<f4")
    assert abs(len(ours) - len(theirs)) <= 16
    n = min(len(ours), len(theirs))
    # soxr (ours) and libswresample (ffmpeg) pad the very edges of the signal differently: compare
    # sample by sample away from them (< 1 ms each side), and the whole signal by its SNR.
    edge = 16
    assert np.abs(ours[edge:n - edge] - theirs[edge:n - edge]).max() < 1e-3
    snr_db = 10 * np.log10(np.sum(theirs[:n] ** 2) / np.sum((ours[:n] - theirs[:n]) ** 2))
    assert snr_db > 50
