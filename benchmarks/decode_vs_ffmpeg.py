"""Decode throughput: pipelines.decode.decode_file vs the ffmpeg CLI, in audio-seconds per CPU-second.

For each format, a 44.1 kHz stereo music-like file (10 minutes by default, encoded with PyAV and
cached in ``--dir``) is decoded to 16 kHz mono float32 windows by
``decode_file`` (in this process, CPU time from ``time.process_time``) and by
``ffmpeg -i F -ac 1 -ar 16000 -f f32le -`` (output to /dev/null, CPU time of the child from
``getrusage``). Best of ``--repeats`` runs each. ffmpeg is skipped, with a message, when there is
no ffmpeg binary (``--ffmpeg PATH`` or on PATH).

    python benchmarks/decode_vs_ffmpeg.py [--minutes 10] [--formats mp3,m4a,opus,flac] [--repeats 3]

The last line gives the ratio of our throughput to ffmpeg's per format (> 1: we are faster).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import synth as samples  # noqa: E402
from pipelines.decode import DecodeOptions, FileInfo, decode_file  # noqa: E402
from pipelines.sources import list_inputs  # noqa: E402

RATE = 44100
CHANNELS = 2
BIT_RATES = {"mp3": 128_000, "m4a": 128_000, "opus": 96_000}


def make_file(directory: Path, fmt: str, minutes: int) -> Path:
    path = directory / f"music_{minutes}min{samples.suffix(fmt)}"
    if not path.exists():   # a real encode of the whole length (cached in --dir)
        minute = samples.music_like(60.0, RATE, CHANNELS)
        signal = np.tile(minute, (1, minutes)) * np.linspace(0.5, 1.0, 60 * RATE * minutes, dtype=np.float32)
        samples.write_audio(path, signal, RATE, fmt, bit_rate=BIT_RATES.get(fmt))
    return path


def time_ours(path: Path, repeats: int) -> tuple[float, float, float]:
    """(best CPU s, its wall s, decoded audio s)."""
    (ref,) = list_inputs(str(path))
    best = (float("inf"), 0.0, 0.0)
    for _ in range(repeats):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for item in decode_file(ref, DecodeOptions()):
            if isinstance(item, FileInfo):
                info = item
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        assert info.status == "ok", info
        best = min(best, (cpu, wall, info.duration_s))
    return best


def time_ffmpeg(ffmpeg: str, path: Path, repeats: int) -> tuple[float, float, float]:
    """(best CPU s of the child, its wall s, decoded audio s from the output size)."""
    best = (float("inf"), 0.0, 0.0)
    command = [ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-ac", "1", "-ar", "16000",
               "-f", "f32le", "-"]
    for _ in range(repeats):
        with tempfile.TemporaryFile() as out:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall0 = time.perf_counter()
            subprocess.run(command, stdout=out, check=True)
            wall = time.perf_counter() - wall0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            n_bytes = out.seek(0, os.SEEK_END)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        best = min(best, (cpu, wall, n_bytes / 4 / 16000))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--formats", default="mp3,m4a,opus,flac")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "salmonn-decode-bench")
    parser.add_argument("--ffmpeg", default=shutil.which("ffmpeg"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    formats = args.formats.split(",")
    if not args.ffmpeg:
        print("ffmpeg: not found (pass --ffmpeg PATH or put it on PATH); measuring decode_file only")
    else:
        version = subprocess.run([args.ffmpeg, "-version"], capture_output=True, text=True).stdout
        print(f"ffmpeg: {args.ffmpeg} ({version.splitlines()[0] if version else '?'})")
    import av

    print(f"ours: PyAV {av.__version__}, FFmpeg libs {av.ffmpeg_version_info}; "
          f"{args.minutes} min {RATE} Hz {CHANNELS} ch per file; best of {args.repeats}; "
          f"x = audio-seconds per CPU-second\n")
    print(f"{'format':6} {'size MB':>8} {'audio s':>8} | {'ours cpu s':>10} {'wall s':>7} {'x':>6} | "
          f"{'ffmpeg cpu s':>12} {'wall s':>7} {'x':>6} | {'ratio':>6}")
    ratios = {}
    for fmt in formats:
        path = make_file(args.dir, fmt, args.minutes)
        cpu, wall, audio = time_ours(path, args.repeats)
        line = (f"{fmt:6} {path.stat().st_size / 1e6:8.1f} {audio:8.1f} | {cpu:10.2f} {wall:7.2f} "
                f"{audio / cpu:6.0f} | ")
        if args.ffmpeg:
            f_cpu, f_wall, f_audio = time_ffmpeg(args.ffmpeg, path, args.repeats)
            ratios[fmt] = (audio / cpu) / (f_audio / f_cpu)
            line += f"{f_cpu:12.2f} {f_wall:7.2f} {f_audio / f_cpu:6.0f} | {ratios[fmt]:6.2f}"
        else:
            line += f"{'-':>12} {'-':>7} {'-':>6} | {'-':>6}"
        print(line)
    print()
    if ratios:
        print("ratio vs ffmpeg (our audio-s per CPU-s / ffmpeg's): "
              + ", ".join(f"{fmt} {r:.2f}" for fmt, r in ratios.items()))
    else:
        print("ratio vs ffmpeg: not measured (no ffmpeg binary)")


if __name__ == "__main__":
    from pipelines import lifecycle

    lifecycle.main(main)   # exit code = main's; native libraries closed in order first
