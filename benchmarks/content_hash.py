"""What recognising moved and copied local files costs: the sha256 of a file's bytes
(``pipelines.sources.sha256_key``, the run's own hashing loop) against merely reading them.

A run hashes only the local files it processes (new or changed ones), on a thread pool beside its
other work; unchanged files cost nothing. This measures one file of ``--size-gb`` GiB (random
bytes), warm (in the page cache) and cold (evicted with ``posix_fadvise(POSIX_FADV_DONTNEED)``
before each pass, which needs no root; the figure is then the disk's), and ``hashlib.file_digest``
for reference.

    .venv/bin/python benchmarks/content_hash.py --size-gb 1
Final line: ``content_hash: sha256 / read of a X GiB file = R x warm (S s/GiB, C CPU-s/GiB); R x cold (...)``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.sources import HASH_CHUNK, FileRef, file_id_for, sha256_key  # noqa: E402

GIB = 2**30


def make_file(path: Path, size: int) -> None:
    chunk = os.urandom(16 * 2**20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(chunk[:left])
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())


def evict(path: Path) -> bool:
    """Drop the file's pages from the page cache (clean pages only: it was fsync'ed)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def read_only(path: Path) -> int:
    """The baseline: read every byte into one buffer, as the hashing loop does, and nothing else."""
    buf = bytearray(HASH_CHUNK)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            n += k
    return n


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def ref_of(path: Path) -> FileRef:
    st = path.stat()
    return FileRef(str(path), st.st_size, None, datetime.fromtimestamp(st.st_mtime, tz=UTC), file_id_for(str(path)))


def measure(fn, path: Path, repeats: int, cold: bool) -> tuple[float, float]:
    """(median wall s, median CPU s) of ``fn(path)``."""
    walls, cpus = [], []
    for _ in range(repeats):
        if cold:
            evict(path)
        else:
            read_only(path)
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(path)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        assert out
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="file size in GiB (default 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", help="where to write the file (default: a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="a 32 MiB file, one repeat (for the tests)")
    args = ap.parse_args()
    size_gib = 32 / 1024 if args.smoke else args.size_gb
    repeats = 1 if args.smoke else args.repeats
    size = int(size_gib * GIB)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; file {size_gib:g} GiB "
          f"({size:,} bytes), {repeats} repeat(s), chunk {HASH_CHUNK // 2**20} MiB")
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = Path(d) / "archive-file.bin"
        make_file(path, size)
        ref = ref_of(path)
        assert sha256_key(ref) == "sha256:" + file_digest(path)
        results = {}
        for mode in ("warm", "cold"):
            cold = mode == "cold"
            if cold and not evict(path):
                print("cold: posix_fadvise is not available here; skipped")
                continue
            base = measure(read_only, path, repeats, cold)
            ours = measure(lambda p: sha256_key(ref), path, repeats, cold)
            ref_digest = measure(file_digest, path, repeats, cold)
            results[mode] = (base, ours)
            for name, (wall, cpu) in (("read only (baseline)", base), ("sha256_key (the run's)", ours),
                                      ("hashlib.file_digest", ref_digest)):
                print(f"{mode:<5} {name:<24} {wall:8.3f} s = {wall / size_gib:7.3f} s/GiB "
                      f"({size_gib / wall:6.2f} GiB/s), CPU {cpu / size_gib:6.3f} s/GiB")
    parts = []
    for mode, (base, ours) in results.items():
        parts.append(f"{ours[0] / base[0]:.2f}x {mode} ({ours[0] / size_gib:.2f} s/GiB, "
                     f"{ours[1] / size_gib:.2f} CPU-s/GiB)")
    print(f"content_hash: sha256 / read of a {size_gib:g} GiB file = " + "; ".join(parts))


if __name__ == "__main__":
    main()
