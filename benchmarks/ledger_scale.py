"""Incremental planning cost against the number of commits: Delta tables vs the earlier layout.

A no-op nightly run starts by reading what is already done (the ledger) and comparing every
listed file with it. This times exactly that step on an S3 server (moto, in its own process)
for an output holding 100k files written in 50, 500 and 3,000 commits:

* **Delta** (this layout): ``pipelines.planning.to_process(files, refs, config_hash)``, as
  ``run_pipeline`` calls it: a column scan of the ``files`` table joined with the listing in
  Arrow (``is_done`` for every file). The tables are built with the real table settings and commit
  metadata, in runs of 100 commits each ending with the end-of-run compaction and checkpoint, as
  nightly runs leave them (blind appends stand in for the driver's predicate overwrites: every
  file is new, so the result is the same table; building is not what is measured). They are
  built on local disk, vacuumed (``maintain --vacuum-hours 0``) and uploaded to the S3 server.
* **earlier layout** (Parquet parts + one JSON commit record per commit): the commit records are
  written with the earlier ``pipelines/commit.py`` itself, loaded from git history
  (``git show OLD_COMMIT:pipelines/commit.py``), and read back through its own
  ``committed_ledger(store.all_commits())`` and ``is_done`` per file, as the earlier
  ``run_pipeline`` did: one GET per record. (Its Parquet parts are not
  needed for this step and are not written.)

    .venv/bin/python benchmarks/ledger_scale.py                     # 50/500/3000 commits, 100k files
    .venv/bin/python benchmarks/ledger_scale.py --smoke             # 2,000 files, 5/40 commits
Final line: ``ledger_scale: <N> files after <C> commits: earlier layout X s / Delta Y s = R x
(goal >= 20x); Delta <first> -> <last> commits: a s -> b s``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import posixpath
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
from deltalake import CommitProperties, Transaction, write_deltalake  # noqa: E402

import schemas  # noqa: E402
from pipelines.output import CommittedFile, Committer, OutputStore, maintain  # noqa: E402
from pipelines.output.maintenance import TARGET_FILE_SIZE, maintain_table  # noqa: E402
from pipelines.output.tables import WRITER_PROPERTIES, table_schema  # noqa: E402
from pipelines.planning import to_process  # noqa: E402
from pipelines.sources import FileRef, file_id_for  # noqa: E402

# The last commit whose pipelines/commit.py is the earlier layout (parts + commit records).
OLD_COMMIT = "a898102"
COMMITS_PER_RUN = 100
BUCKET = "ledger-bench"
CONFIG_HASH = "cafe0123456789ab"
NOW = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def load_old_commit_module():
    """The earlier pipelines/commit.py, from git history, as a module."""
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:pipelines/commit.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("old_commit", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_commit"] = module   # dataclasses look their module up there
    exec(compile(source, f"{OLD_COMMIT}:pipelines/commit.py", "exec"), module.__dict__)
    return module


def start_s3_server() -> tuple[subprocess.Popen, str]:
    """A moto S3 server in a child process (its request handling must not share our GIL)."""
    code = ("import sys, time\n"
            "from tests.s3_server import MotoS3\n"
            "s = MotoS3().start()\n"
            "print(s.endpoint_url, flush=True)\n"
            "sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    return proc, proc.stdout.readline().strip()


def uris_of(commit: int, per_commit: int) -> list[str]:
    return [f"s3://archive/shows/ep{commit * per_commit + i:07d}.mp3" for i in range(per_commit)]


def etag(uri: str) -> str:
    return file_id_for(uri) + "-1"


def listed_refs(n_files: int, per_commit: int) -> list[FileRef]:
    """What listing the unchanged archive gives: every committed file at its committed version."""
    return [FileRef(uri=u, size_bytes=1_000_000, etag=etag(u), mtime=None, file_id=file_id_for(u))
            for c in range(n_files // per_commit) for u in uris_of(c, per_commit)]


def build_delta(local_out: str, n_commits: int, per_commit: int) -> float:
    """The files table of an OUT written by n_commits commits, in runs of COMMITS_PER_RUN."""
    t0 = time.perf_counter()
    store = OutputStore(local_out)
    table = store.open_for_write("files")
    store.open_for_write("segments")
    schema = table_schema("files")
    for start in range(0, n_commits, COMMITS_PER_RUN):
        run_id = (NOW + dt.timedelta(days=start // COMMITS_PER_RUN)).strftime("%Y%m%dT%H%M%SZ") + "-bench0"
        for seq, c in enumerate(range(start, min(n_commits, start + COMMITS_PER_RUN)), start=1):
            uris = uris_of(c, per_commit)
            rows = [{"file_id": file_id_for(u), "uri": u, "size_bytes": 1_000_000, "etag": etag(u), "status": "ok",
                     "container": "mp3", "codec": "mp3", "sample_rate_in": 44100, "channels_in": 2,
                     "duration_s": 1800.0, "n_segments": 60, "run_id": run_id, "model_id": "salmonn-13b",
                     "config_hash": CONFIG_HASH, "pipeline_version": "0.2.0", "processed_at": NOW,
                     "version": etag(u)} for u in uris]
            data = pa.Table.from_pylist(rows, schema=schemas.FILES).cast(schema)
            props = CommitProperties(custom_metadata={"run_id": run_id, "seq": str(seq),
                                                      "file_ids": ",".join(data["file_id"].to_pylist())},
                                     app_transactions=[Transaction(run_id, seq)])
            write_deltalake(table, data, mode="append", writer_properties=WRITER_PROPERTIES, commit_properties=props)
        maintain_table(table, "files", vacuum_hours=None, target_size=TARGET_FILE_SIZE)  # end of the run
    maintain(store, vacuum_hours=0)
    return time.perf_counter() - t0


def build_old(old, fs, prefix: str, n_commits: int, per_commit: int) -> float:
    """The earlier layout's commit records (and run records) for the same commits."""
    t0 = time.perf_counter()
    objects: dict[str, bytes] = {}
    for start in range(0, n_commits, COMMITS_PER_RUN):
        run_id = (NOW + dt.timedelta(days=start // COMMITS_PER_RUN)).strftime("%Y%m%dT%H%M%SZ") + "-bench0"
        for seq, c in enumerate(range(start, min(n_commits, start + COMMITS_PER_RUN)), start=1):
            entries = tuple(old.CommittedFile(file_id_for(u), u, etag(u), CONFIG_HASH, "ok", None, run_id, seq)
                            for u in uris_of(c, per_commit))
            rec = old.CommitRecord(run_id=run_id, seq=seq, files_part=f"files/run_id={run_id}/part-{seq:06d}-0.parquet",
                                   segments_part=f"segments/run_id={run_id}/part-{seq:06d}-0.parquet",
                                   n_files=per_commit, n_segments=per_commit * 180, committed_at=NOW.isoformat(),
                                   files=entries)
            objects[f"{prefix}/_runs/{run_id}/commits/{seq:06d}.json"] = rec.to_json().encode()
        objects[f"{prefix}/_runs/{run_id}/run.json"] = json.dumps({"run_id": run_id, "status": "completed"}).encode()
    fs.pipe(objects)
    return time.perf_counter() - t0


def upload(fs, local: str, remote: str) -> None:
    paths = [os.path.join(d, n) for d, _, names in os.walk(local) for n in names]
    fs.put(paths, [posixpath.join(remote, os.path.relpath(p, local)) for p in paths])


def time_planning(todo, repeats: int) -> tuple[float, int]:
    """Median seconds of ``todo()`` (the files a run would process), and how many there are
    (after one untimed call: imports and connection set-up)."""
    todo()
    times, n = [], -1
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = len(todo())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), n


def time_one_commit(store: OutputStore) -> float:
    """Seconds of the driver's next commit (32 new files, both tables) through the real Committer."""
    committer = Committer(store, "20270101T000000Z-commit")
    uris = [f"s3://archive/new/ep{i:03d}.mp3" for i in range(32)]
    files = pa.Table.from_pylist([{"file_id": file_id_for(u), "uri": u, "status": "ok", "run_id": committer.run_id,
                                   "config_hash": CONFIG_HASH} for u in uris], schema=schemas.FILES)
    entries = [CommittedFile(file_id_for(u), u, etag(u), CONFIG_HASH, "ok", None, committer.run_id, 0)
               for u in uris]
    t0 = time.perf_counter()
    committer.commit(files, schemas.SEGMENTS.empty_table(), entries)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--commits", default="50,500,3000", help="comma-separated commit counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="2,000 files, 5 and 40 commits, 1 repeat")
    args = ap.parse_args()
    if args.smoke:
        args.files, args.commits, args.repeats = 2000, "5,40", 1
    counts = [int(c) for c in args.commits.split(",")]
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; deltalake "
          f"{__import__('deltalake').__version__}; earlier layout from {OLD_COMMIT}:pipelines/commit.py", flush=True)

    import s3fs

    from tests.s3_server import FAKE_CREDENTIALS, set_fake_credentials

    set_fake_credentials()
    old = load_old_commit_module()
    server, endpoint = start_s3_server()
    options = {"client_kwargs": {"endpoint_url": endpoint}, "key": FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
               "secret": FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    fs.mkdir(BUCKET)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="ledger-scale-") as tmp:
            for n_commits in counts:
                per_commit = args.files // n_commits
                n_files = per_commit * n_commits
                build_s = build_delta(f"{tmp}/c{n_commits}", n_commits, per_commit)
                delta_out = f"s3://{BUCKET}/delta-{n_commits}"
                upload(fs, f"{tmp}/c{n_commits}", delta_out)
                refs = listed_refs(n_files, per_commit)
                store = OutputStore(delta_out, options)
                delta_s, delta_todo = time_planning(
                    lambda store=store, refs=refs: to_process(store.read_table("files"), refs, CONFIG_HASH),
                    args.repeats)

                old_out = f"{BUCKET}/old-{n_commits}"
                old_build_s = build_old(old, fs, old_out, n_commits, per_commit)
                old_store = old.OutputStore(f"s3://{old_out}", options)

                def old_todo(old_store=old_store, refs=refs):   # the earlier run_pipeline's lines
                    ledger = old.committed_ledger(old_store.all_commits())
                    return [r for r in refs if not old.is_done(ledger.get(r.uri), r.version, CONFIG_HASH)]

                old_s, old_n = time_planning(old_todo, args.repeats)
                assert delta_todo == old_n == 0, (delta_todo, old_n)
                dt_ = store.table("files")
                n_data = len(store.data_files("files"))
                commit_s = time_one_commit(store)
                results.append((n_commits, n_files, old_s, delta_s))
                print(f"{n_commits:5d} commits x {per_commit:5d} files: earlier layout {old_s:7.2f} s | "
                      f"Delta {delta_s:6.2f} s (table version {dt_.version()}, {n_data} data file(s)) | "
                      f"ratio {old_s / delta_s:6.1f}x | next 32-file commit {commit_s:.2f} s | built in "
                      f"{build_s:.0f} s (Delta, local) + {old_build_s:.0f} s (records)", flush=True)
    finally:
        server.stdin.close()
        server.terminate()
        server.wait(timeout=30)
    n_commits, n_files, old_s, delta_s = results[-1]
    first, last = results[0], results[-1]
    print(f"ledger_scale: {n_files} files after {n_commits} commits: earlier layout {old_s:.2f} s / Delta "
          f"{delta_s:.2f} s = {old_s / delta_s:.1f}x (goal >= 20x); Delta {first[0]} -> {last[0]} commits: "
          f"{first[3]:.2f} s -> {last[3]:.2f} s")


if __name__ == "__main__":
    from pipelines import lifecycle

    lifecycle.main(main)   # exit code = main's; native libraries closed in order first
