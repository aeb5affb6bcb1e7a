"""Peak memory of decoding a 3-hour file vs a 30-second file of the same format.

The decode is streamed (``pipelines.decode.decode_file``), so its memory should be O(window), not
O(file): a 3-hour file should need about as much memory as a 30-second one. Each decode runs in a
fresh Python subprocess; its peak RSS is the ``ru_maxrss`` that ``os.wait4`` reports for that one
child (so an earlier, bigger child cannot mask it). The child also reports its RSS after the
imports, so the table shows how much the decode itself added on top of the interpreter.

The long file is made cheaply: one minute of a speech-like signal is encoded once at a low bit
rate and its packets are muxed ``N`` times (``samples.write_audio(..., repeats=N)``), so the file
is a real, valid 3-hour stream (cached in ``--dir``).

    python benchmarks/long_file_memory.py [--formats mp3,m4a] [--hours 3] [--short-s 30]
        [--via decode_file|stage] [--repeats 1]
    python benchmarks/long_file_memory.py --smoke          # 3 minutes vs 30 s, mp3 only (a test)

The last line is the worst (largest) ratio over the formats; the goal is <= 1.2x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOAL = 1.2
RATE = 16_000            # the signal's rate (16 kHz mono speech, podcast-like)
CHUNK_S = 60             # one encoded chunk, muxed N times
BIT_RATES = {"mp3": 32_000, "m4a": 32_000, "opus": 24_000, "mp4": 32_000, "webm": 24_000}


def make_file(directory: Path, fmt: str, seconds: float) -> Path:
    """A ``seconds`` long file (a multiple of CHUNK_S, or shorter than it) in ``fmt``, cached."""
    from pipelines import synth as samples

    chunk_s = min(CHUNK_S, seconds)
    repeats = max(1, round(seconds / chunk_s))
    path = directory / f"speech_{int(chunk_s)}s_x{repeats}{samples.suffix(fmt)}"
    if not path.exists():
        signal = samples.speech_like(chunk_s, RATE, seed=1)
        tmp = path.with_suffix(".part" + path.suffix)
        samples.write_audio(tmp, signal, RATE, fmt, bit_rate=BIT_RATES.get(fmt), repeats=repeats)
        tmp.rename(path)
    return path


# --- the child: one decode, then a JSON line on stdout ---------------------------------------------

def child(path: str, via: str) -> None:
    import resource

    import numpy as np  # noqa: F401 - imported before the baseline, as the decode needs it

    from pipelines.decode import DecodeOptions, FileInfo, decode_file
    from pipelines.sources import list_inputs
    from pipelines.stages import DecodeStage, refs_table

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    (ref,) = list_inputs(path)
    baseline = rss_mb()
    baseline_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    n_windows, info = 0, None
    if via == "stage":   # what a decode actor runs: batches of window rows (samples as bytes)
        stage = DecodeStage(DecodeOptions())
        for out in stage(refs_table([ref])):
            for kind, file_info in zip(out["kind"].to_pylist(), out["file_info"].to_pylist()):
                n_windows += kind == "window"
                if file_info is not None:
                    info = file_info
    else:
        for item in decode_file(ref, DecodeOptions()):
            if isinstance(item, FileInfo):
                info = item.__dict__
            else:
                n_windows += 1
    wall = time.perf_counter() - t0
    print(json.dumps({"baseline_mb": baseline, "baseline_peak_mb": baseline_peak, "wall_s": wall,
                      "windows": n_windows, "status": info["status"], "duration_s": info["duration_s"]}))


def measure(path: Path, via: str) -> dict:
    """Run one decode in a fresh interpreter; its own peak RSS from wait4."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(path), "--via", via],
                            stdout=subprocess.PIPE, cwd=REPO)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"decode child failed for {path} (exit {proc.returncode})")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_mb"] = usage.ru_maxrss / 1024   # KiB on Linux
    if result["status"] != "ok":
        raise RuntimeError(f"{path}: decode status {result['status']}")
    return result


def median_run(path: Path, via: str, repeats: int) -> dict:
    runs = [measure(path, via) for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) if isinstance(runs[0][k], (int, float)) else runs[0][k]
            for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", default="mp3,m4a")
    parser.add_argument("--hours", type=float, default=3.0)
    parser.add_argument("--short-s", type=float, default=30.0)
    parser.add_argument("--via", choices=("decode_file", "stage"), default="decode_file",
                        help="decode_file: the generator alone; stage: DecodeStage batches (a decode actor)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per file (median)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "salmonn-long-file-bench")
    parser.add_argument("--smoke", action="store_true", help="3 minutes vs 30 s, mp3 only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.via)
        return
    if args.smoke:
        args.formats, args.hours = "mp3", 3 / 60
    args.dir.mkdir(parents=True, exist_ok=True)
    long_s = args.hours * 3600

    print(f"peak RSS of one decode in a fresh subprocess (os.wait4 ru_maxrss), via {args.via}; "
          f"median of {args.repeats}; 16 kHz mono speech-like input; cpus {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'format':6} {'file':>6} {'size MB':>8} {'audio s':>8} {'windows':>7} {'decode s':>8} | "
          f"{'after imports MB':>16} {'peak MB':>8} {'added MB':>8}")
    ratios: dict[str, float] = {}
    for fmt in args.formats.split(","):
        rows = {}
        for label, seconds in (("short", args.short_s), ("long", long_s)):
            path = make_file(args.dir, fmt, seconds)
            r = median_run(path, args.via, args.repeats)
            rows[label] = r
            name = f"{seconds / 3600:.3g}h" if seconds >= 3600 else f"{seconds:.0f}s"
            print(f"{fmt:6} {name:>6} {path.stat().st_size / 1e6:8.2f} {r['duration_s']:8.0f} {r['windows']:7d} "
                  f"{r['wall_s']:8.2f} | {r['baseline_mb']:16.1f} {r['peak_mb']:8.1f} "
                  f"{r['peak_mb'] - r['baseline_mb']:8.1f}")
        ratios[fmt] = rows["long"]["peak_mb"] / rows["short"]["peak_mb"]
    print()
    worst = max(ratios, key=ratios.get)
    long_name = f"{args.hours:g}h" if args.hours >= 1 else f"{long_s / 60:g}min"
    detail = ", ".join(f"{fmt} {r:.2f}x" for fmt, r in ratios.items())
    print(f"long_file_memory: peak RSS {long_name}/{args.short_s:g}s = {ratios[worst]:.2f}x "
          f"(worst: {worst}; {detail}) (goal <= {GOAL}x)")


if __name__ == "__main__":
    from pipelines import lifecycle

    lifecycle.main(main)   # exit code = main's; native libraries closed in order first
