"""Hostile archives: odd names, special files, non-finite samples, damaged and unusual streams.

Every input is made here. The decode tests look at one file each; the last test runs the whole
pipeline once, through the CLI, over an archive holding all of them beside good files, and checks
one ``files`` row per input with the README's error types.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from pipelines import synth as S
from pipelines.decode import SAMPLE_RATE, DecodeOptions, FileInfo, Window, decode_file
from pipelines.sources import FileRef, escape_uri, file_id_for, list_inputs, unescape_uri
from schemas import vocabulary

SR = SAMPLE_RATE
LATIN1 = os.fsdecode(b"caf\xe9 \xabn\xb0 1\xbb.wav")     # a Latin-1 name: not valid UTF-8


def decode(ref: FileRef, options: DecodeOptions = DecodeOptions(window_s=4.0), timeout_s: float = 60.0):
    """decode_file -> (windows, info), in a thread: an input that blocks fails the test instead of
    hanging it."""
    items: list = []
    worker = threading.Thread(target=lambda: items.extend(decode_file(ref, options)), daemon=True)
    worker.start()
    worker.join(timeout_s)
    assert not worker.is_alive(), f"decode of {ref.uri} did not finish in {timeout_s} s"
    *windows, info = items
    assert isinstance(info, FileInfo) and all(isinstance(w, Window) for w in windows)
    assert info.n_segments == len(windows)
    return windows, info


def ref_for(path) -> FileRef:
    (ref,) = list_inputs(str(path))
    return ref


def joined(windows) -> np.ndarray:
    return np.concatenate([w.samples for w in windows]) if windows else np.zeros(0, np.float32)


def dominant_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum)) * SR / len(x)


def float_wav(samples: np.ndarray, rate: int) -> bytes:
    """(C, N) float32 -> an IEEE-float WAV (format tag 3), NaN and inf kept bit for bit."""
    samples = np.atleast_2d(samples).astype(np.float32)
    data = np.ascontiguousarray(samples.T).tobytes()
    return S.wav_bytes(data, rate, samples.shape[0], bits_per_sample=32, format_tag=3)


def encode(path, container: str, codec: str, parts, *, rate: int = 48000, start_s: float = 0.0,
           video_s: float | None = None, defaults=None) -> None:
    """Write ``parts`` (one (C, N) signal per audio stream) with ``codec`` into ``container``;
    the first sample of each audio stream at ``start_s``; a tiny video stream from 0 to
    ``video_s`` when given; ``defaults``: which audio streams carry the default disposition."""
    with av.open(str(path), "w", format=container) as out:
        streams = []
        for i, sig in enumerate(parts):
            layout = "mono" if sig.shape[0] == 1 else "stereo"
            st = out.add_stream(codec, rate=rate, layout=layout)
            if defaults is not None:
                st.disposition = av.stream.Disposition.default if defaults[i] else av.stream.Disposition(0)
            streams.append((st, sig, layout))
        video = S._add_video_stream(out, "mpeg4") if video_s else None
        offset = round(start_s * rate)
        for st, sig, layout in streams:
            for start in range(0, sig.shape[1], 4096):
                chunk = np.ascontiguousarray(sig[:, start:start + 4096].T).reshape(1, -1)
                frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout=layout)
                frame.sample_rate, frame.time_base, frame.pts = rate, Fraction(1, rate), start + offset
                for packet in st.encode(frame):
                    out.mux(packet)
            for packet in st.encode(None):
                out.mux(packet)
        if video is not None:
            S._write_video_frames(out, video, video_s)


def damage(src: Path, dst: Path, n_bytes: int, seed: int = 0) -> None:
    data = bytearray(src.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n_bytes] = np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))


# --- names that are not UTF-8 -----------------------------------------------------------------


def test_escaped_names_round_trip_and_leave_valid_names_alone():
    rng = np.random.default_rng(1)
    for _ in range(200):
        raw = bytes(rng.integers(1, 256, rng.integers(1, 24), dtype=np.uint8)).replace(b"/", b"_")
        name = "/data/" + os.fsdecode(raw)
        uri = escape_uri(name)
        uri.encode("utf-8")                               # always storable as text
        try:
            raw.decode("utf-8")
            assert uri == name and unescape_uri(uri) is None
        except UnicodeDecodeError:
            assert unescape_uri(uri) == name and os.fsencode(unescape_uri(uri)) == b"/data/" + raw
    assert escape_uri(LATIN1) == "caf%E9 %ABn%B0 1%BB.wav"
    assert escape_uri("100%" + os.fsdecode(b"\xff")) == "100%25%FF"
    assert unescape_uri("/data/100%41.wav") is None       # a valid name spelt with % stays itself
    assert file_id_for(LATIN1) == file_id_for(escape_uri(LATIN1))


def test_a_non_utf8_name_is_listed_and_decoded(tmp_path):
    S.write_audio(tmp_path / "good.wav", S.tone(440, 1.0, SR), SR, "wav")
    S.write_audio(tmp_path / LATIN1, S.tone(660, 1.5, SR), SR, "wav")
    refs = list_inputs(str(tmp_path))
    assert [Path(r.uri).name for r in refs] == ["caf%E9 %ABn%B0 1%BB.wav", "good.wav"]
    odd = refs[0]
    assert odd.size_bytes and odd.file_id == file_id_for(odd.uri)
    assert list_inputs(str(tmp_path)) == refs                             # stable
    windows, info = decode(odd)
    assert (info.status, info.duration_s) == ("ok", 1.5), info
    assert abs(dominant_hz(joined(windows)) - 660) < 5


def test_a_latin1_manifest_and_a_manifest_of_escaped_uris(tmp_path):
    S.write_audio(tmp_path / LATIN1, S.tone(440, 1.0, SR), SR, "wav")
    latin1 = tmp_path / "list.txt"
    latin1.write_bytes(os.fsencode(LATIN1) + b"\n")           # the raw bytes, as an old tool wrote them
    escaped = tmp_path / "again.txt"
    escaped.write_text(escape_uri(str(tmp_path / LATIN1)) + "\n")   # copied from a files.uri column
    (a,), (b,) = list_inputs(str(latin1)), list_inputs(str(escaped))
    assert a == b and a.size_bytes and a.uri.endswith("caf%E9 %ABn%B0 1%BB.wav")
    assert decode(a)[1].status == "ok"


# --- files that are not regular files --------------------------------------------------------


def _special_files(d: Path) -> dict[str, str]:
    """name -> expected error type; every kind of non-file a directory can hold."""
    os.symlink("nowhere.wav", d / "dangling.wav")
    os.symlink("loop_b.wav", d / "loop_a.wav")
    os.symlink("loop_a.wav", d / "loop_b.wav")
    os.mkfifo(d / "fifo.wav")
    os.symlink("/dev/null", d / "device.wav")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "socket.wav"))
    sock.close()
    (d / "folder.wav").mkdir()
    os.symlink("folder.wav", d / "dirlink.wav")
    (d / "empty.wav").write_bytes(b"")
    return {"dangling.wav": "not_found", "loop_a.wav": "symlink_loop", "loop_b.wav": "symlink_loop",
            "fifo.wav": "not_a_regular_file", "device.wav": "not_a_regular_file",
            "socket.wav": "not_a_regular_file", "dirlink.wav": "not_a_file", "empty.wav": "empty_file"}


def test_special_files_get_their_own_error_types_and_never_block(tmp_path):
    expected = _special_files(tmp_path)
    S.write_audio(tmp_path / "target.wav", S.tone(440, 1.0, SR), SR, "wav")
    os.symlink("target.wav", tmp_path / "link_ok.wav")
    refs = {Path(r.uri).name: r for r in list_inputs(str(tmp_path))}
    assert set(refs) == {*expected, "target.wav", "link_ok.wav"}   # folder.wav itself is a directory
    assert refs["link_ok.wav"].size_bytes == refs["target.wav"].size_bytes
    for name, etype in expected.items():
        windows, info = decode(refs[name], timeout_s=30)
        assert (info.status, info.error_type, windows) == ("error", etype, []), info
        assert info.error_message
    assert "dangling symlink" in decode(refs["dangling.wav"])[1].error_message
    assert decode(refs["link_ok.wav"])[1].status == "ok"


def test_manifest_entries_that_are_missing_or_directories(tmp_path):
    (tmp_path / "folder.wav").mkdir()
    S.write_audio(tmp_path / "real.wav", S.tone(440, 1.0, SR), SR, "wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\nmissing.wav\nfolder.wav\nreal.wav/inner.wav\nreal.wav\n")
    refs = {Path(r.uri).name: r for r in list_inputs(str(manifest))}
    got = {name: decode(r)[1] for name, r in refs.items()}
    assert {n: (i.status, i.error_type) for n, i in got.items()} == {
        "missing.wav": ("error", "not_found"), "folder.wav": ("error", "not_a_file"),
        "inner.wav": ("error", "not_found"), "real.wav": ("ok", None)}


def test_a_prefix_named_in_a_manifest_on_object_storage_is_not_a_file(s3fs_client, s3_storage_options, tmp_path):
    s3fs_client.mkdir("hostile")
    wav = io.BytesIO()
    S.write_audio(wav, S.tone(440, 1.0, SR), SR, "wav")
    s3fs_client.pipe("hostile/show/ep1.wav", wav.getvalue())
    ref = FileRef(uri="s3://hostile/show", size_bytes=None, etag=None, mtime=None,
                  file_id=file_id_for("s3://hostile/show"))
    items = list(decode_file(ref, DecodeOptions(window_s=4.0), s3_storage_options))
    assert (items[-1].status, items[-1].error_type) == ("error", "not_a_file"), items[-1]


def test_manifest_entries_no_file_system_can_open(tmp_path):
    manifest = tmp_path / "odd.txt"
    manifest.write_text("foo://bucket/x.mp3\nnul\x00byte.mp3\n" + "a" * 300 + ".mp3\n")
    infos = {r.uri.rsplit("/", 1)[-1][:8]: decode(r)[1] for r in list_inputs(str(manifest))}
    assert {k: (i.status, i.error_type) for k, i in infos.items()} == {
        "x.mp3": ("error", "not_found"), "nul\x00byte": ("error", "not_found"), "aaaaaaaa": ("error", "not_found")}
    assert "Protocol not known" in infos["x.mp3"].error_message


def test_a_manifest_entry_whose_file_system_package_is_not_installed(tmp_path):
    """gs:// is a protocol fsspec knows, served by a package (gcsfs) this environment lacks: a
    retried read_error naming the package, not an internal_error with a traceback."""
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed here")
    except ImportError:
        pass
    manifest = tmp_path / "cloud.txt"
    manifest.write_text("gs://bucket/show/x.mp3\n")
    (ref,) = list_inputs(str(manifest))
    info = decode(ref)[1]
    assert (info.status, info.error_type) == ("error", "read_error"), info
    assert "gcsfs" in info.error_message and "next run retries" in info.error_message


# --- non-finite samples ----------------------------------------------------------------------


def test_nan_and_inf_in_a_float_wav_become_counted_silence(tmp_path):
    x = S.tone(440, 6.0, SR)[0].astype(np.float32)
    x[2 * SR + 5] = np.nan
    x[3 * SR:3 * SR + 10] = np.inf
    x[4 * SR] = -np.inf
    path = tmp_path / "nan.wav"
    path.write_bytes(float_wav(x, SR))
    windows, info = decode(ref_for(path))
    y = joined(windows)
    assert np.isfinite(y).all() and y.size == x.size
    assert (info.status, info.error_type) == ("partial", "non_finite_samples"), info
    assert "12 non-finite sample(s)" in info.error_message and "the first at 2.00 s" in info.error_message
    bad = ~np.isfinite(x)
    assert (y[bad] == 0).all()
    np.testing.assert_allclose(y[~bad], x[~bad], atol=1e-6)     # nothing else touched
    assert [w.is_silent for w in windows] == [False, False]


def test_a_down_mix_that_overflows_is_caught_too(tmp_path):
    y = np.repeat(S.tone(440, 4.0, 44100)[:1], 2, axis=0).astype(np.float32)
    y[:, 44100:44100 + 100] = 3e38            # finite in each channel, inf once summed
    path = tmp_path / "loud.wav"
    path.write_bytes(float_wav(y, 44100))
    windows, info = decode(ref_for(path))
    assert (info.status, info.error_type) == ("partial", "non_finite_samples"), info
    assert np.isfinite(joined(windows)).all() and info.duration_s == 4.0


def test_a_sample_rate_of_1_hz_does_not_blow_up_memory(tmp_path):
    """400 KB of PCM that claims 1 Hz: 200,000 samples are 55 hours at 16 kHz. The cap stops the
    decode, and the resampler hands its output out in bounded pieces (it made 1 GB at once)."""
    import psutil

    data = (np.random.default_rng(0).standard_normal(200_000) * 3000).astype(np.int16).tobytes()
    path = tmp_path / "one_hz.wav"
    path.write_bytes(S.wav_bytes(data, 1, 1))
    process = psutil.Process()
    base = peak = process.memory_info().rss
    n_windows, info = 0, None
    for item in decode_file(ref_for(path), DecodeOptions(max_duration_s=1800)):
        peak = max(peak, process.memory_info().rss)
        if isinstance(item, Window):
            n_windows += 1
        else:
            info = item
    assert (info.status, info.error_type, info.duration_s, n_windows) == ("partial", "too_long", 1800.0, 60), info
    assert (peak - base) / 2**20 < 300, f"RSS grew by {(peak - base) / 2**20:.0f} MB"


# --- streams the decoder used to give up on --------------------------------------------------


def test_garbage_in_an_ac3_stream_keeps_the_audio_after_it_and_says_why(tmp_path):
    clean = tmp_path / "clean.ac3"
    encode(clean, "ac3", "ac3", [S.speech_like(20.0, 48000)])
    hurt = tmp_path / "hurt.ac3"
    damage(clean, hurt, 500)
    windows, info = decode(ref_for(hurt))
    assert (info.status, info.error_type) == ("partial", "decode_error"), info
    assert info.duration_s > 19.5                           # the audio after the damage is there
    assert "AAC/AC-3 frame header" in info.error_message and "Error number" not in info.error_message
    assert "the first at 9." in info.error_message or "the first at 10." in info.error_message


def test_a_long_run_of_bad_packets_is_skipped_and_the_timeline_kept(tmp_path):
    clean = tmp_path / "clean.m4a"
    S.write_audio(clean, S.speech_like(60.0, 16000), 16000, "m4a")
    hurt = tmp_path / "hurt.m4a"
    damage(clean, hurt, 20000)                     # ~2.5 s of packets, dozens of them refused
    windows, info = decode(ref_for(hurt), DecodeOptions(window_s=10.0))
    assert (info.status, info.error_type) == ("partial", "decode_error"), info
    assert abs(info.duration_s - 60.0) < 0.1, info      # refused packets became silence in place
    assert [w.start_s for w in windows][:6] == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]   # + AAC padding
    x = joined(windows)
    assert np.abs(x[55 * SR:58 * SR]).max() > 0.05     # audio long after the damage


@pytest.mark.parametrize("fmt", ["ogg", "opus"])
def test_a_chained_ogg_with_other_parameters_decodes_every_link(tmp_path, fmt):
    first, second = tmp_path / f"a{S.suffix(fmt)}", tmp_path / f"b{S.suffix(fmt)}"
    S.write_audio(first, S.tone(440, 5.0, 48000, 2 if fmt == "ogg" else 1), 48000, fmt)
    S.write_audio(second, S.tone(880, 7.0, 44100, 2), 44100, fmt)     # other rate (and channels)
    chain = tmp_path / f"radio{S.suffix(fmt)}"
    chain.write_bytes(first.read_bytes() + second.read_bytes())
    windows, info = decode(ref_for(chain))
    assert (info.status, info.error_type) == ("ok", None), info
    assert abs(info.duration_s - 12.0) < 0.1
    x = joined(windows)
    assert abs(dominant_hz(x[SR:4 * SR]) - 440) < 5 and abs(dominant_hz(x[7 * SR:11 * SR]) - 880) < 5


def test_a_track_that_starts_late_is_stamped_in_media_time(tmp_path):
    path = tmp_path / "late.mkv"            # video from 0 s, audio from 5 s (Matroska: no stream duration)
    encode(path, "matroska", "flac", [S.tone(440, 5.0, 48000)], start_s=5.0, video_s=10.0)
    windows, info = decode(ref_for(path))
    assert (info.status, info.error_type) == ("ok", None), info          # not "truncated"
    assert [(w.start_s, w.end_s) for w in windows] == [(5.0, 9.0), (9.0, 10.0)]
    assert info.duration_s == 5.0


def test_a_container_that_starts_late_is_stamped_from_its_start(tmp_path):
    path = tmp_path / "late_audio_only.mkv"   # every stream starts at 5 s: players show 0:00 there
    encode(path, "matroska", "flac", [S.tone(440, 5.0, 48000)], start_s=5.0)
    windows, info = decode(ref_for(path))
    assert (info.status, info.error_type) == ("ok", None), info
    assert windows[0].start_s == 0.0 and info.duration_s == 5.0


def test_a_header_claiming_100_hours_decodes_what_is_there(tmp_path):
    flac = io.BytesIO()
    S.write_audio(flac, S.tone(440, 2.0, SR), SR, "flac")
    data = flac.getvalue()
    (word,) = struct.unpack(">Q", data[18:26])                    # STREAMINFO total samples
    word = (word & ~(2**36 - 1)) | (100 * 3600 * SR)
    path = tmp_path / "liar.flac"
    path.write_bytes(data[:18] + struct.pack(">Q", word) + data[26:])
    windows, info = decode(ref_for(path), DecodeOptions(window_s=4.0, max_duration_s=3600))
    assert info.error_type != "too_long" and info.duration_s == 2.0 and len(windows) == 1, info
    assert (info.status, info.error_type) == ("partial", "truncated")   # what the header promised is not there


def test_the_default_audio_stream_is_the_one_decoded_and_recorded(tmp_path):
    path = tmp_path / "two_languages.mkv"
    encode(path, "matroska", "flac", [S.tone(300, 3.0, 48000), S.tone(1000, 3.0, 48000, 2)],
           defaults=[False, True])
    windows, info = decode(ref_for(path))
    assert (info.status, info.audio_stream, info.channels_in) == ("ok", 1, 2), info
    assert abs(dominant_hz(joined(windows)) - 1000) < 5


# --- the whole pipeline over a hostile archive -----------------------------------------------


@pytest.mark.slow
def test_a_hostile_archive_runs_to_the_end_with_one_row_per_input(tmp_path, ray_local, capsys):
    """One run over a directory of hostile files and good ones, plus a manifest with missing
    entries and a directory: exit 0, one files row per input, the README's error types."""
    from pipelines.cli import main
    from pipelines.output import OutputStore

    d = tmp_path / "archive"
    d.mkdir()
    expected = _special_files(d)
    S.write_audio(d / "good_a.wav", S.tone(440, 3.0, SR), SR, "wav")
    S.write_audio(d / "good_b.mp3", S.speech_like(5.0, SR), SR, "mp3")
    S.write_audio(d / LATIN1, S.tone(550, 2.0, SR), SR, "wav")
    x = S.tone(440, 3.0, SR)[0].astype(np.float32)
    x[SR] = np.nan
    (d / "nan.wav").write_bytes(float_wav(x, SR))
    (d / "notes.mp3").write_text("not audio\n" * 50)
    clean = tmp_path / "clean.ac3"
    encode(clean, "ac3", "ac3", [S.speech_like(8.0, 48000)])
    damage(clean, d / "hurt.ac3", 300)
    expected.update({"good_a.wav": None, "good_b.mp3": None, "caf%E9 %ABn%B0 1%BB.wav": None,
                     "nan.wav": "non_finite_samples", "notes.mp3": "invalid_data", "hurt.ac3": "decode_error"})
    manifest = tmp_path / "extra.txt"
    manifest.write_text(f"{tmp_path / 'gone.wav'}\n{tmp_path}\n")
    expected.update({"gone.wav": "not_found", tmp_path.name: "not_a_file"})
    out = tmp_path / "out"

    rc = main(["run", str(d), str(manifest), "--out", str(out), "--window-s", "4", "--tasks", "caption",
               "--max-new-tokens", "2", "--no-progress", "--flush-files", "4"])
    assert rc == 0, capsys.readouterr().err
    files = OutputStore(str(out)).read_table("files").to_pylist()
    by_name = {Path(r["uri"]).name: r for r in files}
    assert len(files) == len(by_name) == len(expected), sorted(by_name)
    assert {n: r["error_type"] for n, r in by_name.items()} == expected
    assert all(r["error_type"] in vocabulary.ERRORS for r in files if r["error_type"])
    assert by_name["caf%E9 %ABn%B0 1%BB.wav"]["status"] == "ok"
    assert {by_name[n]["status"] for n in ("nan.wav", "hurt.ac3")} == {"partial"}
