"""The output as Delta Lake tables: storage options for delta-rs, moto S3, concurrent writers,
the README's queries, migration from the earlier layout, maintenance."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake
from deltalake.exceptions import CommitFailedError

import schemas
from pipelines import storage
from pipelines.output import (
    CommittedFile,
    Committer,
    OldLayoutError,
    OutputStore,
    committed_ledger,
    committed_seq,
    data_file_schema_version,
    migrate,
    table_schema_version,
    utcnow,
)
from pipelines.output.maintenance import LEASE_NAME, LEASE_SCHEMA, LEASE_TABLE, claim_maintenance, release_maintenance
from pipelines.output.migrate import CommitRecord
from schemas.vocabulary import RUN_COMPLETED
from tests import ops_fixtures as fx

ROOT = Path(__file__).resolve().parents[1]


def _batch(run_id: str, names: list[str], n_seg: int = 2, tag: str = ""):
    """files/segments/entries for files named ``names`` (one caption row per segment)."""
    uris = [f"s3://archive/{n}.mp3" for n in names]
    files = pa.Table.from_pylist([
        {"file_id": fx.file_id(u), "uri": u, "status": "ok", "run_id": run_id, "n_segments": n_seg,
         "duration_s": 30.0 * n_seg, "config_hash": "h"} for u in uris], schema=schemas.FILES)
    segs = pa.Table.from_pylist([
        {"file_id": fx.file_id(u), "uri": u, "segment_index": i, "start_s": 30.0 * i, "end_s": 30.0 * (i + 1),
         "task": "caption", "text": f"{tag}{u}-{i}", "finish_reason": "stop", "run_id": run_id}
        for u in uris for i in range(n_seg)], schema=schemas.SEGMENTS)
    entries = [CommittedFile(fx.file_id(u), u, "v1", "h", "ok", None, run_id, 0) for u in uris]
    return files, segs, entries


def _assert_each_file_once(store: OutputStore, n_files: int, n_seg: int = 2) -> None:
    files = store.read_table("files")
    assert sorted(collections.Counter(files["file_id"].to_pylist()).values()) == [1] * n_files
    segs = store.read_table("segments")
    keys = list(zip(segs["file_id"].to_pylist(), segs["segment_index"].to_pylist(), segs["task"].to_pylist()))
    assert len(keys) == len(set(keys)) == n_files * n_seg
    # every file's segment rows come from one commit (one run)
    runs = collections.defaultdict(set)
    for fid, run in zip(segs["file_id"].to_pylist(), segs["run_id"].to_pylist()):
        runs[fid].add(run)
    assert all(len(r) == 1 for r in runs.values())


def test_storage_options_for_delta_rs():
    s3 = storage.delta_options("s3://bucket/out", {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
        "key": "AKIA", "secret": "s3cr3t", "token": "tok",
        "config_kwargs": {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 10}},
    })
    assert s3 == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ALLOW_HTTP": "true", "AWS_REGION": "eu-west-1",
                  "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "tok",
                  "connect_timeout": "10s", "timeout": "60s", "max_retries": "10"}
    assert storage.delta_options("s3://b/o", {"anon": True, "profile": "nightly"}) == {
        "AWS_SKIP_SIGNATURE": "true", "AWS_PROFILE": "nightly"}
    # the top-level endpoint_url wins over client_kwargs; https needs no AWS_ALLOW_HTTP
    assert storage.delta_options("s3a://b/o", {"endpoint_url": "https://minio:9000",
                                               "client_kwargs": {"endpoint_url": "http://x"}})["AWS_ENDPOINT_URL"] \
        == "https://minio:9000"
    assert "AWS_ALLOW_HTTP" not in storage.delta_options("s3://b/o", {"endpoint_url": "https://minio:9000"})
    # delta-rs keys pass through; environment credentials are left to delta-rs (nothing added)
    assert storage.delta_options("s3://b/o", {"AWS_REGION": "us-west-2"}) == {"AWS_REGION": "us-west-2"}
    assert storage.delta_options("s3://b/o", {}) == {}
    assert storage.delta_options("gs://b/o", {"token": "/keys/sa.json"}) == {"GOOGLE_SERVICE_ACCOUNT": "/keys/sa.json"}
    assert storage.delta_options("gs://b/o", {"token": "anon"}) == {"GOOGLE_SKIP_SIGNATURE": "true"}
    assert storage.delta_options("az://c/o", {"account_name": "acct", "account_key": "k", "sas_token": "sv=1"}) == {
        "AZURE_STORAGE_ACCOUNT_NAME": "acct", "AZURE_STORAGE_ACCOUNT_KEY": "k", "AZURE_STORAGE_SAS_TOKEN": "sv=1"}
    assert storage.delta_options("/data/out", {"auto_mkdir": True}) == {}


_WRITER = """
import json, sys, time
from pipelines.output import Committer, OutputStore
from tests.test_delta import _batch
out, run_id, names, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
store = OutputStore(out, options)
committer = Committer(store, run_id)
for i in range(0, len(names), 2):
    committer.commit(*_batch(run_id, names[i:i + 2], tag=run_id))
committer.finish()
"""


def _concurrent_writers(out: str, options: dict, env: dict | None = None) -> None:
    """Two processes commit overlapping batches (f02..f11 in both) to one OUT at the same time."""
    names_a = [f"f{i:02d}" for i in range(0, 12)]
    names_b = [f"f{i:02d}" for i in range(2, 14)][::-1]
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, out, run, json.dumps(names), json.dumps(options)],
                              cwd=ROOT, env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True)
             for run, names in (("20260301T000000Z-aaaaaa", names_a), ("20260301T000000Z-bbbbbb", names_b))]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    store = OutputStore(out, options)
    _assert_each_file_once(store, 14)
    assert {committed_seq(store, r) for r in ("20260301T000000Z-aaaaaa", "20260301T000000Z-bbbbbb")} == {6}


def test_a_conflicting_commit_is_retried_on_the_new_version(tmp_path, caplog):
    """Committer A's table snapshot predates B's commit of an overlapping file: Delta rejects A's
    commit (B added rows A's predicate covers); A retries on the new version and replaces them."""
    import logging

    store = OutputStore(str(tmp_path / "out"))
    Committer(store, "r0").commit(*_batch("r0", ["w"]))
    a, b = Committer(store, "ra"), Committer(store, "rb")
    b.commit(*_batch("rb", ["x", "y"]))
    with caplog.at_level(logging.INFO, logger="pipelines.output"):
        a.commit(*_batch("ra", ["y", "z"]))
    retried = [r.getMessage() for r in caplog.records if "a concurrent commit conflicts" in r.getMessage()]
    assert len(retried) == 2 and "segments" in retried[0] and "files" in retried[1]
    _assert_each_file_once(store, 4)
    assert {r["uri"][-5:]: r["run_id"] for r in store.read_table("files").to_pylist()} == {
        "w.mp3": "r0", "x.mp3": "rb", "y.mp3": "ra", "z.mp3": "ra"}


def test_concurrent_committers_local(tmp_path):
    _concurrent_writers(str(tmp_path / "out"), {})


def test_delta_tables_on_moto_s3(s3_server, s3_storage_options):
    """fsspec-style options reach delta-rs; commit, ledger, time travel and two concurrent
    writers on the S3 server."""
    s3_server.s3fs().mkdir("index")
    out = "s3://index/out"
    store = OutputStore(out, s3_storage_options)
    c = Committer(store, "20260101T000000Z-aaaaaa")
    c.commit(*_batch("20260101T000000Z-aaaaaa", ["a", "b"], tag="old-"))
    Committer(store, "20260102T000000Z-bbbbbb").commit(*_batch("20260102T000000Z-bbbbbb", ["a"], tag="new-"))
    ledger = committed_ledger(store)
    assert {u.rsplit("/", 1)[1]: e.run_id[-6:] for u, e in ledger.items()} == {"a.mp3": "bbbbbb", "b.mp3": "aaaaaa"}
    assert sorted(store.read_run_rows("segments", "20260101T000000Z-aaaaaa")["text"].to_pylist())[0].startswith("old-")
    fs = s3_server.s3fs()
    for path in store.data_files("segments"):
        with fs.open(path, "rb") as f:
            assert data_file_schema_version(pq.read_schema(f)) == schemas.SCHEMA_VERSION
    s3_server.reset()
    s3_server.s3fs().mkdir("index")
    _concurrent_writers(out, s3_storage_options)


def test_readme_queries_run_as_written(tmp_path):
    """The README's offline DuckDB query and its Polars/pandas lines, on the fixture's two runs."""
    out = tmp_path / "out"
    store = fx.build_two_runs(str(out))
    readme = (ROOT / "README.md").read_text()

    def block(marker: str) -> str:
        code = readme.split(f"<!-- tested: {marker} -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
        assert '"OUT/' in code
        return code.replace('"OUT/', f'"{out}/')

    scope: dict = {}
    exec(block("readme-duckdb"), scope)
    ok = {r["file_id"] for r in store.read_table("files").to_pylist() if r["status"] == "ok"}
    want = sorted((r["uri"], r["start_s"], r["end_s"], r["text"]) for r in store.read_table("segments").to_pylist()
                  if r["task"] == "transcribe" and r["file_id"] in ok)
    assert scope["transcripts"] == want and len(want) == 3 + 2 + 5 + 1   # ep01 (v2), ep02, ep06, ep07 (v2)
    assert all(t.startswith("v2 ") for u, _, _, t in want if u.endswith(("ep01.mp3", "ep07.mp3")))

    scope = {}
    exec(block("readme-polars-pandas"), scope)
    assert scope["transcripts"].height == 3 + 2 + 2 + 5 + 1              # + the partial ep03's 2 windows
    assert sorted(scope["errors"]["error_type"].to_list()) == ["invalid_data", "no_audio_stream"]
    emotions = scope["emotions"]
    assert len(emotions) == 13 and set(emotions["task"]) == {"emotion"}
    assert scope["per_label"].sum() == 13 and set(scope["per_label"].index) <= set(schemas.EMOTION_LABELS)


def _old_layout(out: Path) -> None:
    """Two runs of the earlier layout (parts + commit records, schema v2), b changed in run 2."""
    store = OutputStore(str(out))
    for run, names, version, tag in (("20250101T000000Z-old111", ["a", "b"], "v1", "one "),
                                     ("20250102T000000Z-old222", ["b", "c"], "v2", "two ")):
        files, segs, entries = _batch(run, names, tag=tag)
        files = files.drop_columns(["version"]).replace_schema_metadata({schemas.METADATA_KEY: b"2"})
        rels = {}
        for name, t in (("files", files), ("segments", segs)):
            rels[name] = f"{name}/run_id={run}/part-000001-aa.parquet"
            (out / rels[name]).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(t, out / rels[name])
        rec = CommitRecord(run_id=run, seq=1, files_part=rels["files"], segments_part=rels["segments"],
                           n_files=files.num_rows, n_segments=segs.num_rows, committed_at="2025-01-01T00:00:00+00:00",
                           files=tuple(e._replace(version=version) for e in entries))
        store.write_bytes(store.path("_runs", run, "commits", "000001.json"), rec.to_json().encode())
        store.write_run({"run_id": run, "status": RUN_COMPLETED, "config_hash": "h"})


def test_migrate_the_earlier_layout(tmp_path, capsys):
    from pipelines.cli import main as cli_main

    out = tmp_path / "out"
    _old_layout(out)
    store = OutputStore(str(out))
    with pytest.raises(OldLayoutError, match=f"salmonn-pipeline migrate {out}"):
        committed_ledger(store)
    assert cli_main(["migrate", str(out)]) == 0
    assert "migrated 2 commits of 2 run(s): 3 files and 6 segment rows" in capsys.readouterr().out

    ledger = committed_ledger(store)
    assert {u.rsplit("/", 1)[1]: (e.version, e.run_id[-6:]) for u, e in ledger.items()} == {
        "a.mp3": ("v1", "old111"), "b.mp3": ("v2", "old222"), "c.mp3": ("v2", "old222")}
    texts = sorted(store.read_table("segments")["text"].to_pylist())
    assert [t.split("s3://")[0] for t in texts] == ["one "] * 2 + ["two "] * 4
    for name in ("files", "segments"):
        assert table_schema_version(store.table(name)) == schemas.SCHEMA_VERSION
        assert not list((out / name).glob("run_id=*"))                  # no debris for Delta to see
        assert len(list((out / "_legacy" / name).glob("run_id=*/*.parquet"))) == 2   # nothing lost
    history = store.read_run("20250101T000000Z-old111")["legacy_commits"]
    assert [(c["seq"], [f["uri"][-5:] for f in c["files"]]) for c in history] == [(1, ["a.mp3", "b.mp3"])]
    assert len(list((out / "_legacy" / "_runs").glob("*/commits/*.json"))) == 2
    # a second migrate has nothing to do; runs continue on the tables
    assert migrate(str(out)).already_done
    Committer(store, "20260101T000000Z-new333").commit(*_batch("20260101T000000Z-new333", ["a"], tag="three "))
    assert committed_ledger(store)["s3://archive/a.mp3"].run_id == "20260101T000000Z-new333"


def test_maintain_compacts_checkpoints_and_vacuums(tmp_path, capsys):
    from pipelines.cli import main as cli_main

    store = OutputStore(str(tmp_path / "out"))
    c = Committer(store, "r")
    for i in range(6):
        c.commit(*_batch("r", [f"m{i}"]))
    assert len(store.data_files("segments")) == 6
    debris = tmp_path / "out" / "files" / "part-00000-debris-c000.zstd.parquet"
    debris.write_bytes(Path(store.data_files("files")[0]).read_bytes())
    assert store.untracked_files("files") == [str(debris)]
    before = store.read_table("segments").sort_by("file_id")

    assert cli_main(["maintain", str(tmp_path / "out")]) == 0
    assert "segments: compacted 6 data files into 1" in capsys.readouterr().out
    assert len(store.data_files("segments")) == len(store.data_files("files")) == 1
    assert store.read_table("segments").sort_by("file_id").equals(before)
    assert list((tmp_path / "out" / "segments" / "_delta_log").glob("*.checkpoint.parquet"))
    assert debris.exists()                                             # no vacuum asked for
    for path in store.data_files("segments"):                          # compaction keeps the footer metadata
        assert data_file_schema_version(pq.read_schema(path)) == schemas.SCHEMA_VERSION

    assert cli_main(["maintain", str(tmp_path / "out"), "--vacuum-hours", "0"]) == 0
    assert not debris.exists() and store.untracked_files("files") == []
    assert len(list((tmp_path / "out" / "segments").glob("*.parquet"))) == 1
    assert store.read_table("segments").sort_by("file_id").equals(before)


@pytest.mark.slow
def test_two_concurrent_runs_with_overlapping_inputs(tmp_path):
    """Two `salmonn-pipeline run` processes on one OUT, inputs overlapping in 4 of 8 files: both
    exit 0 and each file's rows are in each table once."""
    from pipelines.synth import noise, speech_like, tone, write_audio

    audio, out = tmp_path / "audio", tmp_path / "out"
    audio.mkdir()
    for i in range(8):
        sig = [tone(200.0 + 40 * i, 3.0, 16000), noise(3.0, 16000), speech_like(3.0, 16000, seed=i)][i % 3]
        write_audio(audio / f"clip{i}.flac", sig, 16000, "flac")
    exe = str(Path(sys.executable).with_name("salmonn-pipeline"))
    cmds = [[exe, "run", str(audio / pattern), "--out", str(out), "--window-s", "2", "--flush-files", "1",
             "--flush-seconds", "0", "--num-cpus", "1", "--no-progress"]
            for pattern in ("clip[0-5].flac", "clip[2-7].flac")]
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              start_new_session=True) for c in cmds]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (_, se) in zip(procs, results):
        assert p.returncode == 0, se[-3000:]
    store = OutputStore(str(out))
    runs = store.list_runs()
    assert len(runs) == 2 and all(store.read_run(r)["status"] == RUN_COMPLETED for r in runs)
    files = store.read_table("files")
    assert sorted(files["uri"].to_pylist()) == sorted(str(audio / f"clip{i}.flac") for i in range(8))
    assert len(set(files["file_id"].to_pylist())) == 8
    segs = store.read_table("segments")
    keys = list(zip(segs["file_id"].to_pylist(), segs["segment_index"].to_pylist(), segs["task"].to_pylist()))
    assert len(keys) == len(set(keys)) == sum(files["n_segments"].to_pylist()) * 3
    # a run's commits complete: its files' ledger rows are all there, whichever run wrote them last
    assert all(committed_seq(store, r) >= 1 for r in runs)


def test_one_compaction_at_a_time(tmp_path, capsys):
    """delta-rs (1.6) lets two concurrent compactions of the same data files both commit, each
    adding its own copy of the rows (two runs finishing together doubled every row). The
    compaction lease keeps a second one out: a run's finish then only writes checkpoints,
    `maintain` says who holds it and exits 1; a released or expired lease can be taken."""
    from pipelines.cli import main as cli_main

    out = str(tmp_path / "out")
    store = OutputStore(out)
    run = "20260301T000000Z-aaaaaa"
    committer = Committer(store, run)
    for names in (["a", "b"], ["c", "d"], ["e"]):          # three small data files per table
        committer.commit(*_batch(run, names))
    elsewhere = OutputStore(out)
    assert claim_maintenance(elsewhere, "maintain on host-b (pid 7)") is None
    assert claim_maintenance(store, "someone else").startswith("maintain on host-b (pid 7) (lease until ")

    report = committer.finish()       # the run ends while the other process compacts
    assert {r["skipped"].split(" (lease")[0] for r in report.values()} == {"maintain on host-b (pid 7)"}
    assert len(store.data_files("files")) == 3 and len(store.data_files("segments")) == 3
    assert cli_main(["maintain", out]) == 1
    assert "maintain on host-b (pid 7)" in capsys.readouterr().err
    _assert_each_file_once(store, 5)

    release_maintenance(elsewhere, "someone else")            # only its holder releases a lease
    assert claim_maintenance(store, "x") is not None
    release_maintenance(elsewhere, "maintain on host-b (pid 7)")
    assert cli_main(["maintain", out]) == 0
    assert len(store.data_files("files")) == 1 and len(store.data_files("segments")) == 1
    _assert_each_file_once(store, 5)

    # a holder that died: its lease ends by itself
    assert claim_maintenance(elsewhere, "a run that was killed", lease_s=-1.0) is None
    assert claim_maintenance(store, "the next run") is None
    assert claim_maintenance(elsewhere, "a third").startswith("the next run")
    # its holder renews it (between tables, for a long compaction); nobody else can meanwhile
    assert claim_maintenance(store, "the next run", lease_s=7200) is None
    assert "the next run" in claim_maintenance(elsewhere, "a third")


def test_two_processes_taking_the_lease_at_once_one_loses(tmp_path):
    """What the lease rests on: two overwrites of the lease row from the same table version
    (two processes at the same moment) do not both commit; Delta's conflict checker fails the
    second, which then sees the first's holder."""
    from deltalake import DeltaTable

    store = OutputStore(str(tmp_path / "out"))
    assert claim_maintenance(store, "first") is None
    release_maintenance(store, "first")
    uri = store.table_uri(LEASE_TABLE)
    stale_a, stale_b = DeltaTable(uri), DeltaTable(uri)
    row = pa.Table.from_pylist([{"name": LEASE_NAME, "holder": "a", "until": utcnow()}],
                               schema=LEASE_SCHEMA)
    write_deltalake(stale_a, row, mode="overwrite", predicate=f"name = '{LEASE_NAME}'")
    with pytest.raises(CommitFailedError):
        write_deltalake(stale_b, row, mode="overwrite", predicate=f"name = '{LEASE_NAME}'")
