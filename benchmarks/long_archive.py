"""Soak: an archive of >= 10 audio hours through the CLI on the tiny model.

Default archive: 6 x 1 h (MP3) + 2 x 2 h (Opus) + 200 short clips (5-60 s, mixed formats), 4 of
them broken. One CLI run (`salmonn-pipeline run`, local Ray on this machine) with the model's
three tasks; while it runs, a sampler records every second:

* the driver's RSS (the CLI process),
* each decode actor's and inference actor's RSS and USS (RSS counts the object-store pages a
  process has touched; USS only its own memory),
* the object store's use: shared memory in /dev/shm (Ray's plasma store lives there).

Printed: wall time, audio-h per wall-h, the peaks, and the growth of each series over the run
(median of the last quarter minus median of the second quarter, so start-up is left out), and
the ratio against the baseline named below.

Baseline: the same archive with backpressure off (``--prefetch-batches 100000``, i.e. decoding is
bounded only by Ray Data's default object-store budget). Run with ``--baseline`` to measure it too;
the ratio printed is peak decode-actor RSS (baseline / bounded).

    .venv/bin/python benchmarks/long_archive.py [--hours-scale 1.0] [--short 200] [--baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.synth import noise, silence, speech_like, tone, write_audio  # noqa: E402

CHUNK_S = 47.0


def make_archive(directory: Path, hours_scale: float, n_short: int) -> float:
    """The soak archive; returns its audio hours (nominal)."""
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    chunk = np.concatenate([speech_like(CHUNK_S - 9.0, 16000, seed=3), silence(9.0, 16000)], axis=1)
    total = 0.0
    longs = [(f"episode{i}.mp3", "mp3", 3600.0) for i in range(6)] + \
            [(f"film{i}.opus", "opus", 7200.0) for i in range(2)]
    for name, fmt, seconds in longs:
        repeats = max(1, round(seconds * hours_scale / CHUNK_S))
        path = directory / name
        if not path.exists():
            write_audio(path, chunk, 16000, fmt, bit_rate=16000, repeats=repeats,
                        muxer_options={"write_xing": "0"} if fmt == "mp3" else None)
        total += repeats * CHUNK_S
    fmts = ["wav", "flac", "mp3", "m4a", "opus"]
    for i in range(n_short):
        seconds = 5.0 + (i * 7.3) % 55.0
        fmt = fmts[i % len(fmts)]
        path = directory / f"clip{i:03d}.{fmt if fmt != 'opus' else 'opus'}"
        if i % 50 == 49:   # a few broken ones
            path.write_bytes(b"not audio at all " * 100)
            continue
        if not path.exists():
            sig = [tone(200.0 + i, seconds, 22050), noise(seconds, 22050), speech_like(seconds, 22050, seed=i)][i % 3]
            write_audio(path, sig, 22050, fmt)
        total += seconds
    return total / 3600


def _shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class Sampler(threading.Thread):
    """Samples the driver, its Ray actors and /dev/shm every ``every_s`` seconds."""

    def __init__(self, pid: int, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.shm0 = _shm_used()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set():
            try:
                driver = psutil.Process(self.pid)
                row = {"t": time.monotonic() - t0, "driver_rss": driver.memory_info().rss,
                       "shm": _shm_used() - self.shm0, "decode": [], "infer": []}
                for p in psutil.process_iter(["cmdline"]):
                    cmd = " ".join(p.info["cmdline"] or [])
                    kind = "decode" if "DecodeStage" in cmd else "infer" if "SalmonnPredictor" in cmd else None
                    if kind:
                        try:
                            m = p.memory_full_info()
                            row[kind].append((m.rss, m.uss))
                        except (psutil.NoSuchProcess, psutil.AccessDenied):
                            pass
                self.samples.append(row)
            except psutil.NoSuchProcess:
                break
            self.stop.wait(self.every_s)


def _growth(values: list[float]) -> float:
    n = len(values)
    if n < 8:
        return 0.0
    return statistics.median(values[3 * n // 4:]) - statistics.median(values[n // 4:n // 2])


def soak(audio: Path, out: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)   # every file processed (an existing output would skip them)
    cmd = [str(Path(sys.executable).with_name("salmonn-pipeline")), "run", str(audio), "--out", str(out),
           "--no-progress", "--fresh", *extra]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    sampler = Sampler(proc.pid)
    sampler.start()
    stdout, _ = proc.communicate()
    wall = time.monotonic() - t0
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {stdout[-2000:]}")
    summary = [line for line in stdout.splitlines() if line.startswith("run ")][-1]
    s = sampler.samples
    mb = 2**20
    decode_rss = [max((r for r, _ in x["decode"]), default=0) / mb for x in s]
    decode_uss = [max((u for _, u in x["decode"]), default=0) / mb for x in s]
    infer_rss = [max((r for r, _ in x["infer"]), default=0) / mb for x in s]
    driver = [x["driver_rss"] / mb for x in s]
    shm = [x["shm"] / mb for x in s]
    return {
        "summary": summary, "wall_s": round(wall, 1), "samples": len(s),
        "driver_rss_peak_mb": round(max(driver), 1), "driver_rss_growth_mb": round(_growth(driver), 1),
        "decode_rss_peak_mb": round(max(decode_rss), 1), "decode_rss_growth_mb": round(_growth(decode_rss), 1),
        "decode_uss_peak_mb": round(max(decode_uss), 1),
        "infer_rss_peak_mb": round(max(infer_rss), 1),
        "object_store_shm_peak_mb": round(max(shm), 1), "object_store_shm_growth_mb": round(_growth(shm), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "salmonn-soak"))
    ap.add_argument("--hours-scale", type=float, default=1.0, help="scale the long files (1.0: 1 h / 2 h)")
    ap.add_argument("--short", type=int, default=200)
    ap.add_argument("--tasks", default="caption,transcribe,emotion")
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--baseline", action="store_true", help="also run without the decode bound")
    args = ap.parse_args()
    base = Path(args.dir)
    t0 = time.monotonic()
    hours = make_archive(base / "audio", args.hours_scale, args.short)
    print(f"archive: {hours:.2f} audio h ({time.monotonic() - t0:.0f} s to make) in {base / 'audio'}")
    common = ["--tasks", args.tasks, "--max-new-tokens", str(args.max_new_tokens)]
    bounded = soak(base / "audio", base / "out-bounded", common)
    bounded["audio_h_per_wall_h"] = round(hours / (bounded["wall_s"] / 3600), 1)
    print("bounded (default --prefetch-batches 4):", json.dumps(bounded, indent=1))
    if args.baseline:
        free = soak(base / "audio", base / "out-unbounded", [*common, "--prefetch-batches", "100000"])
        free["audio_h_per_wall_h"] = round(hours / (free["wall_s"] / 3600), 1)
        print("baseline (decode unbounded):", json.dumps(free, indent=1))
        print(f"ratio (peak decode-actor RSS, baseline / bounded): "
              f"{free['decode_rss_peak_mb'] / max(bounded['decode_rss_peak_mb'], 1e-9):.2f}x; "
              f"object store peak {free['object_store_shm_peak_mb']:.0f} MB -> "
              f"{bounded['object_store_shm_peak_mb']:.0f} MB")


if __name__ == "__main__":
    from pipelines import lifecycle

    lifecycle.main(main)   # exit code = main's; native libraries closed in order first
