"""The search index at archive scale: build speed, query latency, size, and one night's update.

Builds an output whose ``segments`` table holds ``--windows`` synthetic rows (transcript-like text
drawn from a Zipf vocabulary of 30,000 pseudo-words, in 30-s windows of 72-window files: every
window transcribed (~100 words), half captioned (~12 words), a sixth with an emotion (1-2 words),
so 60/30/10% of the rows; 64 words a row on average, like SEARCH_NOTES' archive), with rare
phrases planted at known places (inside a window, and across a window cut), then:

* builds the index (``update_index``: a full build) and reports documents per second and its size;
* runs each kind of query ``--queries`` times through ``search`` on the open index (ranking,
  snippets and hit times included): a planted rare phrase (checked: found first, right file and
  window), a planted phrase across a cut (checked), a phrase taken from a row's text, three words
  (any), three words with a task filter; p50 / p95 latency;
* the baseline: DuckDB scanning the same Parquet data files with ``text ILIKE '%phrase%'``
  (no ranking, no stemming) for the planted phrases;
* one night: ``--night-removed`` files removed, new files with ``--night-rows`` rows added and
  ``--night-reprocessed`` files reprocessed (the real Committer), then ``update_index`` (the
  incremental update): seconds, and the bytes of index files it wrote.

    python benchmarks/search_scale.py [--windows 200000] [--queries 40]
    python benchmarks/search_scale.py --windows 1200000
    python benchmarks/search_scale.py --smoke       # 3,000 windows (a test)

The last line: the DuckDB ILIKE phrase scan's p50 / the index's phrase p50, and the full build's
time / one night's update time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WINDOWS_PER_FILE = 72
ROWS_PER_FILE = WINDOWS_PER_FILE + WINDOWS_PER_FILE // 2 + WINDOWS_PER_FILE // 6     # 120
OLD_RUN, NEW_RUN = "20261101T020000Z-old000", "20261102T020000Z-new000"
T0 = dt.datetime(2026, 11, 1, 2, 0, tzinfo=dt.UTC)
SYLLABLES = ("ka ri to mu sen da lo pe vi na shu gor tel bam kis ron fe lu zo an mi ter pol dus "
             "har quin wel jo bri cam").split()


def vocabulary(n: int = 30_000, seed: int = 3) -> np.ndarray:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return np.array(sorted(words, key=lambda w: (len(w), w)))


def uri_of(i: int) -> str:
    return f"s3://archive/shows/show{i // 500:03d}/ep{i:06d}.mp3"


def file_rows(i: int, vocab: np.ndarray, p: np.ndarray, rng: np.random.Generator, run_id: str,
              tag: str = "") -> list[dict]:
    """The segments rows of file ``i``: transcribe, caption and emotion rows of its windows."""
    from pipelines.sources import file_id_for

    uri = uri_of(i)
    fid = file_id_for(uri)
    rows = []
    for task, n_win, lo, hi in (("transcribe", WINDOWS_PER_FILE, 80, 120), ("caption", WINDOWS_PER_FILE // 2, 8, 16),
                                ("emotion", WINDOWS_PER_FILE // 6, 1, 2)):
        counts = rng.integers(lo, hi + 1, n_win)
        words = vocab[rng.choice(vocab.size, int(counts.sum()), p=p)]
        ends = np.cumsum(counts)
        for w, (e, k) in enumerate(zip(ends.tolist(), counts.tolist())):
            rows.append({"file_id": fid, "uri": uri, "segment_index": w, "start_s": w * 30.0,
                         "end_s": w * 30.0 + 30.0, "task": task, "prompt": "p", "text": tag + " ".join(words[e - k:e]),
                         "finish_reason": "stop", "run_id": run_id, "model_id": "salmonn-13b"})
    return rows


def build_tables(out: str, n_files: int, seed: int = 1) -> tuple[list[tuple[str, str, int, str]], float]:
    """The two tables of ``n_files`` files; returns the planted phrases (phrase, uri, segment
    index, "inside" | "across") and the seconds taken."""
    from deltalake import write_deltalake

    import schemas
    from pipelines.output import OutputStore
    from pipelines.output.tables import WRITER_PROPERTIES, table_schema
    from pipelines.sources import file_id_for

    t0 = time.perf_counter()
    vocab = vocabulary()
    ranks = np.arange(1, vocab.size + 1, dtype=np.float64)
    p = 1.0 / ranks ** 1.07
    p /= p.sum()
    rng = np.random.default_rng(seed)
    store = OutputStore(out)
    store.open_for_write("files")
    store.open_for_write("segments")
    planted: list[tuple[str, str, int, str]] = []
    chunk = max(1, 240_000 // ROWS_PER_FILE)
    plant_every = max(1, n_files // 60)
    for start in range(0, n_files, chunk):
        rows: list[dict] = []
        for i in range(start, min(n_files, start + chunk)):
            mine = file_rows(i, vocab, p, rng, OLD_RUN)
            if i % plant_every == 0:        # a rare phrase inside a window, another across a cut
                k = len(planted)
                inside, across = f"zephyrine quokkalot{k}", f"marbleglow{k} snickerdoodle{k}"
                w = int(rng.integers(0, WINDOWS_PER_FILE - 1))
                mine[w]["text"] += " " + inside + " and so on"
                mine[w]["text"] += " " + across.split()[0]
                mine[w + 1]["text"] = across.split()[1] + " " + mine[w + 1]["text"]
                planted += [(inside, uri_of(i), w, "inside"), (across, uri_of(i), w, "across")]
            rows += mine
        seg = pa.Table.from_pylist(rows, schema=schemas.SEGMENTS).cast(table_schema("segments"))
        write_deltalake(store.table_uri("segments"), seg, mode="append", writer_properties=WRITER_PROPERTIES)
        files = pa.Table.from_pylist(
            [{"file_id": file_id_for(uri_of(i)), "uri": uri_of(i), "status": "ok", "run_id": OLD_RUN,
              "n_segments": WINDOWS_PER_FILE, "duration_s": WINDOWS_PER_FILE * 30.0, "config_hash": "c0",
              "processed_at": T0, "version": "v1"} for i in range(start, min(n_files, start + chunk))],
            schema=schemas.FILES).cast(table_schema("files"))
        write_deltalake(store.table_uri("files"), files, mode="append", writer_properties=WRITER_PROPERTIES)
    return planted, time.perf_counter() - t0


def night(out: str, n_files: int, removed: int, new_rows: int, reprocessed: int, seed: int = 9) -> dict:
    """One nightly run's commits: removals, new files, reprocessed files."""
    import schemas
    from pipelines.output import CommittedFile, Committer, OutputStore
    from pipelines.sources import file_id_for

    vocab = vocabulary()
    p = 1.0 / np.arange(1, vocab.size + 1, dtype=np.float64) ** 1.07
    p /= p.sum()
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    gone = pick.sample(range(n_files), removed)
    redo = pick.sample(sorted(set(range(n_files)) - set(gone)), reprocessed)
    new = list(range(n_files, n_files + max(1, new_rows // ROWS_PER_FILE)))
    committer = Committer(OutputStore(out), NEW_RUN)
    committer.remove([file_id_for(uri_of(i)) for i in gone])
    rows, files, entries = [], [], []
    for i in redo + new:
        rows += file_rows(i, vocab, p, rng, NEW_RUN, tag="nightly " if i in redo else "")
        fid = file_id_for(uri_of(i))
        files.append({"file_id": fid, "uri": uri_of(i), "status": "ok", "run_id": NEW_RUN,
                      "n_segments": WINDOWS_PER_FILE, "duration_s": WINDOWS_PER_FILE * 30.0, "config_hash": "c0",
                      "processed_at": T0 + dt.timedelta(days=1)})
        entries.append(CommittedFile(fid, uri_of(i), "v2", "c0", "ok", None, NEW_RUN, 0))
    committer.commit(pa.Table.from_pylist(files, schema=schemas.FILES),
                     pa.Table.from_pylist(rows, schema=schemas.SEGMENTS), entries)
    return {"removed": [uri_of(i) for i in gone], "redo": [uri_of(i) for i in redo], "new": [uri_of(i) for i in new],
            "rows": len(rows)}


def dir_bytes(path: Path) -> tuple[int, set[str]]:
    names = {p.name for p in path.iterdir() if p.is_file()}
    return sum((path / n).stat().st_size for n in names), names


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    result = fn(*args, **kw)
    return result, (time.perf_counter() - t0) * 1000


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=200_000, help="segments rows (windows x tasks) in the table")
    ap.add_argument("--queries", type=int, default=40, help="queries of each kind")
    ap.add_argument("--night-removed", type=int, default=120)
    ap.add_argument("--night-rows", type=int, default=13_000, help="rows of the night's new files")
    ap.add_argument("--night-reprocessed", type=int, default=20)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "salmonn-search-scale")
    ap.add_argument("--smoke", action="store_true", help="3,000 windows, 10 queries of each kind, a small night")
    args = ap.parse_args()
    if args.smoke:
        args.windows, args.queries, args.night_removed, args.night_rows, args.night_reprocessed = 3000, 10, 3, 600, 2
    import logging

    logging.basicConfig(level=logging.ERROR)
    import deltalake
    import duckdb
    import tantivy

    from pipelines.output import OutputStore
    from pipelines.search import search, update_index
    from pipelines.search.query import search_index
    from pipelines.search.schema import open_index

    n_files = max(1, args.windows // ROWS_PER_FILE)
    out = args.dir / f"out-{args.windows}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.environ.setdefault("SALMONN_SEARCH_CACHE", str(args.dir / "cache"))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"{getattr(tantivy, '__version__', 'tantivy ?')}, deltalake {deltalake.__version__}, "
          f"duckdb {duckdb.__version__}",
          flush=True)
    planted, build_s = build_tables(str(out), n_files)
    store = OutputStore(str(out))
    data = store.data_files("segments")
    table_mb = sum(os.path.getsize(p) for p in data) / 2**20
    print(f"tables: {n_files:,} files, {n_files * ROWS_PER_FILE:,} segment rows ({table_mb:.0f} MiB of Parquet) "
          f"written in {build_s:.0f} s", flush=True)

    full = update_index(store)
    size, before = dir_bytes(out / "_search")
    print(f"full build: {full.documents:,} documents in {full.seconds:.1f} s = {full.documents / full.seconds:,.0f} "
          f"docs/s; index {size / 2**20:.0f} MiB ({size / max(1, full.documents):.0f} B/document); "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB", flush=True)

    index = open_index(out / "_search")
    rng = random.Random(5)
    vocab = vocabulary()
    texts = store.read_table("segments", columns=["text", "task"]).filter(
        pa.compute.equal(pa.compute.field("task"), "transcribe")).column("text")
    kinds: dict[str, list[tuple[str, dict]]] = {
        "rare phrase (planted)": [(f'"{ph}"', {}) for ph, _, _, k in planted if k == "inside"],
        "phrase across a cut (planted)": [(f'"{ph}"', {}) for ph, _, _, k in planted if k == "across"],
        "phrase from a row's text": [],
        "3 words, any": [(" ".join(rng.choice(vocab[100:3000]) for _ in range(3)), {}) for _ in range(args.queries)],
        "3 words, task=caption": [(" ".join(rng.choice(vocab[100:3000]) for _ in range(3)), {"task": "caption"})
                                  for _ in range(args.queries)],
    }
    for _ in range(args.queries):
        words = texts[rng.randrange(len(texts))].as_py().split()
        k = rng.randrange(len(words) - 1)
        kinds["phrase from a row's text"].append((f'"{words[k]} {words[k + 1]}"', {}))
    where = {ph: (uri, w) for ph, uri, w, _ in planted}
    search_index(index, "warm up", limit=10)
    latency: dict[str, list[float]] = {}
    for kind, queries in kinds.items():
        queries = (queries * (1 + args.queries // max(1, len(queries))))[:args.queries]
        latency[kind] = []
        for q, filters in queries:
            hits, ms = timed(search_index, index, q, limit=10, **filters)
            latency[kind].append(ms)
            if kind.endswith("(planted)"):
                uri, w = where[q.strip('"')]
                assert hits and (hits[0].uri, hits[0].segment_index) == (uri, w), (q, hits[:1])
                assert hits[0].start_s >= w * 30.0 and hits[0].spans_next == ("across" in kind), hits[0]
        print(f"  {kind:32} p50 {pct(latency[kind], 50):7.2f} ms   p95 {pct(latency[kind], 95):7.2f} ms", flush=True)
    _, cli_ms = timed(search, str(out), '"zephyrine quokkalot0"')
    print(f"  (search() with opening the index: {cli_ms:.1f} ms)", flush=True)

    # the baseline: DuckDB's ILIKE over the same Parquet files (no ranking, no stemming)
    con = duckdb.connect()
    con.execute(f"CREATE VIEW seg AS SELECT * FROM read_parquet({[str(p) for p in data]!r})")
    duck = []
    for ph, uri, w, _ in [x for x in planted if x[3] == "inside"][:5]:
        rows, ms = timed(lambda ph=ph: con.execute(
            "SELECT uri, segment_index FROM seg WHERE text ILIKE ? LIMIT 10", [f"%{ph}%"]).fetchall())
        assert (uri, w) in rows, (ph, rows)
        duck.append(ms)
    print(f"DuckDB ILIKE phrase scan: p50 {pct(duck, 50):.0f} ms over {len(duck)} phrases", flush=True)

    # one night
    changes = night(str(out), n_files, args.night_removed, args.night_rows, args.night_reprocessed)
    update = update_index(store)
    size_after, after = dir_bytes(out / "_search")
    written = sum((out / "_search" / n).stat().st_size for n in after - before if (out / "_search" / n).exists())
    print(f"one night ({args.night_removed} files removed, {len(changes['new'])} new files / {changes['rows']:,} rows "
          f"incl. {args.night_reprocessed} reprocessed files): update {update.seconds:.2f} s ({update.files_added} "
          f"added, {update.files_reindexed} re-indexed, {update.files_removed} removed, "
          f"{update.documents_added:,} documents); new index files {written / 2**20:.1f} MiB; index "
          f"{size_after / 2**20:.0f} MiB", flush=True)
    common = str(vocab[0])
    assert not search_index(index, common, uri_prefix=changes["removed"][0], limit=5), "a removed file is found"
    assert search_index(index, common, uri_prefix=changes["new"][0], limit=5), "a new file is not found"
    assert search_index(index, '"nightly"', limit=1)[0].run_id == NEW_RUN
    noop = update_index(store)
    print(f"update with nothing new: {noop.seconds * 1000:.0f} ms", flush=True)
    phrase_p50 = pct(latency["rare phrase (planted)"], 50)
    print(f"search_scale: {full.documents:,} windows: DuckDB ILIKE {pct(duck, 50):.0f} ms / index phrase p50 "
          f"{phrase_p50:.2f} ms = {pct(duck, 50) / max(phrase_p50, 1e-6):.0f}x; full build {full.seconds:.1f} s / "
          f"one night's update {update.seconds:.2f} s = {full.seconds / max(update.seconds, 1e-6):.1f}x")


if __name__ == "__main__":
    from pipelines import lifecycle

    lifecycle.main(main)
