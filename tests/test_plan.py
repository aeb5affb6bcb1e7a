"""plan: new/changed/config-changed/retry/unchanged against an earlier run's outputs, durations from
earlier runs, container headers or bytes, windows x tasks, GPU hours; reads no audio, writes nothing."""

from __future__ import annotations

import argparse
import builtins
import contextlib
import dataclasses
import io
import os
import struct
import wave

import numpy as np
import pyarrow as pa
import pytest

import schemas
from pipelines.config import PipelineConfig, config_hash_of
from pipelines.decode import DecodeOptions
from pipelines.ops import commands as cli_ops
from pipelines.ops import plan
from pipelines.output import CommittedFile, Committer, OutputStore, utcnow
from pipelines.output.runs import RunRecord
from pipelines.sources import list_inputs
from salmonn import builtin_task
from schemas.vocabulary import RUN_COMPLETED

RATE = 16000


TASKS = tuple(builtin_task(name) for name in ("caption", "transcribe", "emotion"))


def write_wav(path, seconds: float, seed: int = 0) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(int(RATE * seconds)) * 3000).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(x.tobytes())


class _Counting(io.RawIOBase):
    """Wraps a file object and counts what is read through it."""

    def __init__(self, f, counter, path):
        self._f, self._counter, self._path = f, counter, path

    def read(self, *args):
        data = self._f.read(*args)
        self._counter[self._path] = self._counter.get(self._path, 0) + len(data)
        return data

    def readinto(self, b):
        n = self._f.readinto(b)
        self._counter[self._path] = self._counter.get(self._path, 0) + (n or 0)
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)

    def seek(self, *a):
        return self._f.seek(*a)

    def tell(self):
        return self._f.tell()

    def close(self):
        self._f.close()


@contextlib.contextmanager
def count_reads(root):
    """Every open of a file under ``root`` (Python and os level) and every byte read from it."""
    root = os.path.realpath(str(root))
    opened, nread = [], {}
    real_open, real_os_open = builtins.open, os.open

    def is_audio(p):
        return isinstance(p, (str, os.PathLike)) and os.path.realpath(os.fspath(p)).startswith(root)

    def fake_open(file, *args, **kwargs):
        f = real_open(file, *args, **kwargs)
        if is_audio(file):
            opened.append(os.fspath(file))
            return _Counting(f, nread, os.fspath(file))
        return f

    def fake_os_open(path, *args, **kwargs):
        if is_audio(path):
            opened.append(os.fspath(path))
        return real_os_open(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", fake_open)
        mp.setattr(io, "open", fake_open)
        mp.setattr(os, "open", fake_os_open)
        yield opened, nread


def _tree(path):
    return sorted((os.path.relpath(os.path.join(r, f), path), os.stat(os.path.join(r, f)).st_mtime_ns)
                  for r, _, fs in os.walk(path) for f in fs)


@pytest.fixture
def archive(tmp_path):
    """An audio folder, and an earlier run's outputs for it (then the folder changes)."""
    audio, out = tmp_path / "audio", tmp_path / "out"
    durations = {"a.wav": 3.0, "b.wav": 5.0, "c.wav": 2.0, "sub/d.wav": 4.0, "e.wav": 1.0}
    for i, (name, sec) in enumerate(durations.items()):
        write_wav(audio / name, sec, seed=i)
    (audio / "notes.txt").write_text("not audio, not listed")
    cfg = PipelineConfig(input=str(audio), out=str(out), tasks=TASKS, model="salmonn-13b",
                         decode=DecodeOptions(window_s=2.0))
    chash = config_hash_of(cfg)
    refs = {os.path.relpath(r.uri, audio): r for r in list_inputs(str(audio))}
    # earlier run: (status, error_type, config hash it ran under)
    earlier = {"a.wav": ("ok", None, chash), "b.wav": ("ok", None, chash), "c.wav": ("ok", None, "0ldc0nf1g0000000"),
               "sub/d.wav": ("error", "read_error", chash), "e.wav": ("error", "invalid_data", chash)}
    run = "20260101T000000Z-aaaaaa"
    store = OutputStore(str(out))
    files = pa.Table.from_pylist([{
        "file_id": refs[n].file_id, "uri": refs[n].uri, "size_bytes": refs[n].size_bytes, "mtime": refs[n].mtime,
        "status": st, "error_type": et, "duration_s": durations[n] if st == "ok" else None,
        "n_segments": 1 if st == "ok" else 0, "run_id": run, "config_hash": h, "processed_at": utcnow(),
    } for n, (st, et, h) in earlier.items()], schema=schemas.FILES)
    entries = [CommittedFile(refs[n].file_id, refs[n].uri, refs[n].version, h, st, et, run, 0)
               for n, (st, et, h) in earlier.items()]
    Committer(store, run).commit(files, schemas.SEGMENTS.empty_table(), entries)
    store.write_run(RunRecord.from_dict({"run_id": run, "status": RUN_COMPLETED, "config_hash": chash}))
    # since then: b.wav re-recorded (longer), two new files
    write_wav(audio / "b.wav", 6.0, seed=10)
    os.utime(audio / "b.wav", ns=(os.stat(audio / "b.wav").st_atime_ns, os.stat(audio / "b.wav").st_mtime_ns + 10**9))
    write_wav(audio / "f.wav", 7.0, seed=11)
    write_wav(audio / "new" / "g.wav", 1.5, seed=12)
    return cfg, chash, audio, out


def test_counts_and_reads_no_audio(archive):
    cfg, chash, audio, out = archive
    before = _tree(out), _tree(audio)
    with count_reads(audio) as (opened, nread):
        p = plan.plan_run(cfg, probe="never", throughput=10.0)
    assert opened == [] and nread == {}                 # not one audio file was opened
    assert (_tree(out), _tree(audio)) == before          # nothing written anywhere

    by_name = {os.path.relpath(f.uri, audio): f for f in p.files}
    assert {n: f.action for n, f in by_name.items()} == {
        "a.wav": "unchanged", "b.wav": "changed", "c.wav": "config_changed", "sub/d.wav": "retry",
        "e.wav": "unchanged", "f.wav": "new", "new/g.wav": "new"}
    assert {a: p.count(a) for a in plan.ACTIONS} == {"new": 2, "changed": 1, "config_changed": 1, "retry": 1,
                                                     "unchanged": 2}
    # c.wav's duration was measured by the earlier run; the rest are estimates from bytes,
    # calibrated on the earlier run's wav files (16 kHz 16-bit mono = 256 kbit/s)
    assert by_name["c.wav"].duration_source == "measured" and by_name["c.wav"].duration_s == 2.0
    for name, sec in {"b.wav": 6.0, "f.wav": 7.0, "new/g.wav": 1.5}.items():
        assert by_name[name].duration_source == "estimate"
        assert by_name[name].duration_s == pytest.approx(sec, rel=0.01)
    assert by_name["sub/d.wav"].duration_source == "estimate"  # its earlier attempt measured nothing
    assert p.audio_hours("estimate") > 0
    text = p.format()
    assert "ESTIMATED from bytes" in text and "header probe: no file was opened" in text
    assert "new" in text and "unchanged (skipped)" in text


def test_header_probe_is_exact_and_reads_only_headers(archive):
    cfg, chash, audio, _out = archive
    with count_reads(audio) as (opened, nread):
        p = plan.plan_run(cfg, probe="auto", throughput=10.0)
    by_name = {os.path.relpath(f.uri, audio): f for f in p.files}
    probed = {"b.wav": 6.0, "f.wav": 7.0, "new/g.wav": 1.5, "sub/d.wav": 4.0}
    for name, sec in probed.items():
        assert by_name[name].duration_source == "header"
        assert by_name[name].duration_s == pytest.approx(sec, abs=1e-9)
    assert by_name["c.wav"].duration_source == "measured"
    # only the files to process were opened, and only their headers were read
    assert sorted(os.path.relpath(o, audio) for o in opened) == sorted(probed)
    assert set(nread) == {str(audio / n) for n in probed}
    assert max(nread.values()) <= 64                   # RIFF + fmt + data chunk headers: 44 bytes
    assert p.probe_bytes == sum(nread.values()) and p.probe_files == 4
    # windows of 2 s: b 3, f 4, g 1, d 2, c 1 -> 11 windows x 3 tasks
    assert p.windows == 11 and p.rows == 33
    hours = (6 + 7 + 1.5 + 4 + 2) / 3600
    assert p.audio_hours() == pytest.approx(hours)
    assert p.gpu_hours == pytest.approx(hours / 10.0)
    assert p.to_dict()["audio_hours_is_estimate"] is False
    assert "~" not in p.format().split("audio to process:")[1].split("=")[0]


def test_second_plan_after_everything_committed_has_nothing_to_do(archive):
    cfg, chash, audio, out = archive
    store = OutputStore(str(out))
    refs = list_inputs(str(audio))
    run = "20260102T000000Z-bbbbbb"
    files = pa.Table.from_pylist([{"file_id": r.file_id, "uri": r.uri, "status": "ok", "run_id": run, "duration_s": 1.0,
                                   "size_bytes": r.size_bytes} for r in refs], schema=schemas.FILES)
    Committer(store, run).commit(files, schemas.SEGMENTS.empty_table(), [
        CommittedFile(r.file_id, r.uri, r.version, chash, "ok", None, run, 0) for r in refs])
    p = plan.plan_run(cfg, probe="never")
    assert p.count("unchanged") == 7 and p.todo == [] and p.gpu_hours == 0.0
    # a changed config makes every file config_changed, each with its measured duration
    p2 = plan.plan_run(dataclasses.replace(cfg, tasks=(builtin_task("caption"),)), probe="never")
    assert p2.count("config_changed") == 7
    assert all(f.duration_source == "measured" for f in p2.files)


def test_default_throughput_scales_with_tasks():
    one, src = plan.default_throughput("salmonn-13b", 1)
    three, _ = plan.default_throughput("salmonn-13b", 3)
    assert one == pytest.approx(3 * three) and "placeholder" in src
    assert plan.default_throughput("/models/my-parts", 3)[0] == three  # a parts dir is costed like 13B


def test_limits_and_windows():
    assert plan.n_windows(75.0, 30.0, 30.0) == 3
    assert plan.n_windows(60.0, 30.0, 30.0) == 2
    assert plan.n_windows(30.5, 30.0, 30.0) == 2
    assert plan.n_windows(0.3, 30.0, 30.0) == 1
    assert plan.n_windows(None, 30.0, 30.0) == 0
    assert plan.n_windows(60.0, 30.0, 15.0) == 3      # 0-30, 15-45, 30-60


def _mp4_bytes(timescale: int, duration: int) -> bytes:
    mvhd = b"\x00\x00\x00\x00" + struct.pack(">IIII", 0, 0, timescale, duration) + b"\x00" * 80
    moov = struct.pack(">I4s", 8 + 8 + len(mvhd), b"moov") + struct.pack(">I4s", 8 + len(mvhd), b"mvhd") + mvhd
    ftyp = struct.pack(">I4s", 16, b"ftyp") + b"M4A \x00\x00\x00\x00"
    mdat = struct.pack(">I4s", 8 + 50000, b"mdat") + b"\x00" * 50000
    return ftyp + mdat + moov                          # moov at the end: found by seeking, not reading


def _flac_bytes(rate: int, total: int) -> bytes:
    bits = (rate << 44) | (0 << 41) | (15 << 36) | total
    info = b"\x00" * 10 + bits.to_bytes(8, "big") + b"\x00" * 16
    return b"fLaC" + bytes([0x80, 0, 0, 34]) + info + b"\x00" * 4000


def test_header_parsers(tmp_path):
    (tmp_path / "x.m4a").write_bytes(_mp4_bytes(44100, 44100 * 95))
    (tmp_path / "x.flac").write_bytes(_flac_bytes(48000, 48000 * 12))
    (tmp_path / "bad.wav").write_bytes(b"this is not a wav header at all" * 10)
    (tmp_path / "x.ogg").write_bytes(b"OggS" + b"\x00" * 100)
    for name, want in (("x.m4a", 95.0), ("x.flac", 12.0), ("bad.wav", None), ("x.ogg", None)):
        p = str(tmp_path / name)
        dur, nbytes = plan.probe_file(p, os.path.getsize(p))
        assert dur == (pytest.approx(want) if want else None), name
        assert nbytes <= 200, name


def test_cli_plan(archive, capsys):
    import salmonn

    if not hasattr(salmonn, "builtin_task"):
        pytest.skip("salmonn does not expose builtin_task yet (the CLI builds tasks with it)")
    cfg, _chash, audio, out = archive
    parser = argparse.ArgumentParser()
    cli_ops.add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", str(audio), "--out", str(out), "--model", "salmonn-13b", "--window-s", "2",
                              "--throughput", "20", "--files"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "GPU estimate" in text and "set with --throughput" in text and "f.wav" in text


def test_over_limit_files_are_capped_or_cost_no_work(archive):
    cfg, chash, audio, _out = archive
    big = os.path.getsize(audio / "f.wav") - 1
    cfg = dataclasses.replace(cfg, decode=DecodeOptions(window_s=2.0, max_duration_s=3.0, max_bytes=big))
    p = plan.plan_run(cfg, probe="auto")
    by_name = {os.path.relpath(f.uri, audio): f for f in p.files}
    assert by_name["f.wav"].over_limit == "too_large" and by_name["f.wav"].windows == 0
    assert by_name["b.wav"].over_limit == "too_long" and by_name["b.wav"].duration_s == 3.0  # decoded to the cap
    assert by_name["sub/d.wav"].over_limit == "too_long" and by_name["sub/d.wav"].duration_s == 3.0  # capped
    assert by_name["new/g.wav"].over_limit is None
    assert "too_large" in p.format() and "too_long" in p.format()


def test_header_probe_of_real_files_reads_a_few_hundred_bytes(tmp_path):
    """Files encoded by FFmpeg (through PyAV), tagged ones included: the probe finds their length in
    their headers and reads little, however large the tags (200 KiB of cover art is skipped)."""
    import mutagen.flac
    import mutagen.id3

    from pipelines import synth

    signal = synth.speech_like(3.0, RATE, seed=3)
    cover = bytes(range(256)) * 800
    for fmt in ("wav", "wav24", "flac", "mp3", "m4a", "mp4", "mov"):
        path = tmp_path / f"x_{fmt}{synth.suffix(fmt)}"
        synth.write_audio(path, signal, RATE, fmt)
        dur, nbytes = plan.probe_file(str(path), os.path.getsize(path))
        assert dur == pytest.approx(3.0, abs=0.11), fmt   # mp3: LAME's delay and padding are estimated
        assert nbytes <= 1024, (fmt, nbytes)
    mp3, flac = tmp_path / "cover.mp3", tmp_path / "cover.flac"
    synth.write_audio(mp3, signal, RATE, "mp3")
    tags = mutagen.id3.ID3()
    tags.add(mutagen.id3.APIC(encoding=3, mime="image/png", type=3, desc="cover", data=cover))
    tags.save(str(mp3))
    synth.write_audio(flac, signal, RATE, "flac")
    f = mutagen.flac.FLAC(str(flac))
    pic = mutagen.flac.Picture()
    pic.type, pic.mime, pic.data = 3, "image/png", cover
    f.add_picture(pic)
    f.save()
    for path in (mp3, flac):
        assert os.path.getsize(path) > len(cover)
        dur, nbytes = plan.probe_file(str(path), os.path.getsize(path))
        assert dur == pytest.approx(3.0, abs=0.11) and nbytes <= 1024, (path.name, dur, nbytes)
    # a truncated wav keeps its header's length: the probe cuts it to what the file holds
    wav = tmp_path / "x_wav.wav"
    data = wav.read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    dur, _ = plan.probe_file(str(tmp_path / "cut.wav"), len(data) // 2)
    assert dur == pytest.approx(1.5, abs=0.01)
