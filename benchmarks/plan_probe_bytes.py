"""Bytes `plan`'s header probe reads: per file, and fetched from storage in fsspec blocks.

Makes N files (default 1,000) across the formats `plan` reads durations from (wav 16/24-bit, flac,
mp3 CBR with and without a Xing header, mp3 VBR, m4a, mp4, mov, and mp3/flac carrying 200 KiB of
cover art in their tags), cached in ``--dir``. Each is probed through a filesystem that serves
reads in fsspec blocks of ``pipelines.ops.plan.PROBE_BLOCK`` bytes the way s3fs does (a ranged GET per
block), counting the blocks and bytes fetched, and the duration found is compared with the
length of the signal written.

    .venv/bin/python benchmarks/plan_probe_bytes.py [--files 1000] [--dir DIR]

Final line: ``plan_probe_bytes: N files, read R bytes/file (fetched F bytes/file in B requests),
D% with a header duration, max error E s``.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

from fsspec.registry import register_implementation
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.ops import plan  # noqa: E402

KINDS = ("wav", "wav24", "flac", "mp3", "mp3_noxing", "mp3_vbr", "m4a", "mp4", "mov", "mp3_cover", "flac_cover")
RATE = 16_000
COVER_BYTES = 200 * 2**10

FETCHED: collections.Counter[str] = collections.Counter()
REQUESTS: collections.Counter[str] = collections.Counter()


class _CountingFile(AbstractBufferedFile):
    def _fetch_range(self, start: int, end: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        FETCHED[self.path] += len(data)
        REQUESTS[self.path] += 1
        return data


class CountingFS(AbstractFileSystem):
    """Local files served in blocks through fsspec's buffered file, like an object store."""

    protocol = "countfs"

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        return _CountingFile(self, path, mode, block_size=block_size or "default", cache_options=cache_options,
                             size=os.path.getsize(path), **kwargs)

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        return {"name": path, "size": os.path.getsize(path), "type": "file"}


def _make(path: Path, kind: str, seconds: float, seed: int) -> None:
    from pipelines import synth

    signal = synth.speech_like(seconds, RATE, seed=seed)
    fmt = {"mp3_noxing": "mp3", "mp3_vbr": "mp3", "mp3_cover": "mp3", "flac_cover": "flac"}.get(kind, kind)
    kwargs: dict = {}
    if kind == "mp3_noxing":
        kwargs["muxer_options"] = {"write_xing": "0"}
    elif kind == "mp3_vbr":
        kwargs["vbr_quality"] = 4
    synth.write_audio(path, signal, RATE, fmt, **kwargs)
    if kind.endswith("_cover"):
        _add_cover(path, fmt)


def _add_cover(path: Path, fmt: str) -> None:
    import mutagen.flac
    import mutagen.id3

    image = bytes(range(256)) * (COVER_BYTES // 256)
    if fmt == "mp3":
        tags = mutagen.id3.ID3()
        tags.add(mutagen.id3.APIC(encoding=3, mime="image/png", type=3, desc="cover", data=image))
        tags.save(str(path))
    else:
        f = mutagen.flac.FLAC(str(path))
        pic = mutagen.flac.Picture()
        pic.type, pic.mime, pic.data = 3, "image/png", image
        f.add_picture(pic)
        f.save()


def make_files(directory: Path, n: int) -> list[tuple[Path, float]]:
    import random

    rng = random.Random(0)
    files = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        seconds = round(rng.uniform(2.0, 40.0), 2)
        ext = {"wav24": ".wav", "mp3_noxing": ".mp3", "mp3_vbr": ".mp3", "mp3_cover": ".mp3",
               "flac_cover": ".flac"}.get(kind, "." + kind)
        path = directory / kind / f"{i:05d}_{seconds}{ext}"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".part" + ext)
            _make(tmp, kind, seconds, seed=i)
            tmp.rename(path)
        files.append((path, seconds))
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "salmonn-plan-probe-bench"))
    ap.add_argument("--smoke", action="store_true", help="22 files")
    args = ap.parse_args(argv)
    n = 2 * len(KINDS) if args.smoke else args.files
    register_implementation("countfs", CountingFS, clobber=True)
    t0 = time.monotonic()
    files = make_files(Path(args.dir), n)
    made_s = time.monotonic() - t0

    per_kind: dict[str, dict[str, float]] = collections.defaultdict(collections.Counter)
    total_read = 0
    found = 0
    max_err = 0.0
    t0 = time.monotonic()
    for path, seconds in files:
        kind = path.parent.name
        dur, nread = plan.probe_file(f"countfs://{path}", path.stat().st_size, {})
        k = per_kind[kind]
        k["files"] += 1
        k["read"] += nread
        k["fetched"] += FETCHED[str(path)]
        k["requests"] += REQUESTS[str(path)]
        total_read += nread
        if dur is not None:
            found += 1
            k["found"] += 1
            err = abs(dur - seconds)
            k["max_err"] = max(k["max_err"], err)
            max_err = max(max_err, err)
    probe_s = time.monotonic() - t0
    print(f"{n} files made/cached in {made_s:.1f} s; probed in {probe_s:.2f} s (PROBE_BLOCK {plan.PROBE_BLOCK} B, "
          f"cap {plan.PROBE_MAX_BYTES} B); load average {os.getloadavg()[0]:.1f}")
    print(f"{'kind':<12}{'files':>6}{'read B/file':>13}{'fetched B/file':>16}{'requests/file':>15}"
          f"{'header dur':>12}{'max err s':>11}")
    for kind in KINDS:
        k = per_kind.get(kind)
        if not k:
            continue
        f = k["files"]
        print(f"{kind:<12}{int(f):>6}{k['read'] / f:>13.0f}{k['fetched'] / f:>16.0f}{k['requests'] / f:>15.2f}"
              f"{int(k['found']):>8}/{int(f):<3}{k['max_err']:>11.3f}")
    fetched = sum(FETCHED.values())
    requests = sum(REQUESTS.values())
    print(f"plan_probe_bytes: {n} files, read {total_read / n:.0f} bytes/file (fetched {fetched / n:.0f} "
          f"bytes/file in {requests / n:.2f} requests), {100 * found / n:.0f}% with a header duration, "
          f"max error {max_err:.3f} s")
    return 0


if __name__ == "__main__":
    from pipelines import lifecycle

    lifecycle.main(main)   # exit code = main's; native libraries closed in order first
