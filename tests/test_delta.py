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
from pipelines.output.runs import RunRecord
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
        store.write_run(RunRecord.from_dict({"run_id": run, "status": RUN_COMPLETED, "config_hash": "h"}))


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
    history = store.read_run("20250101T000000Z-old111").legacy_commits
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
    printed = capsys.readouterr().out
    assert "segments: compacted 6 data files into 1" in printed
    assert "search index: 0 file(s) no index version needs deleted" in printed
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
    assert len(runs) == 2 and all(store.read_run(r).status == RUN_COMPLETED for r in runs)
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


# ---------------------------------------------------------------------------------------------
# Schema v5: timed text (language, words, Whisper's measures)
# ---------------------------------------------------------------------------------------------

TIMED_COLUMNS = ("language", "language_prob", "words", "avg_logprob", "compression_ratio", "no_speech_prob")
WORDS = [{"word": " Grüß", "start_s": 30.52, "end_s": 30.9, "probability": 0.75},
         {"word": " Gott,", "start_s": 30.9, "end_s": 31.26, "probability": None},
         {"word": " 東京", "start_s": 31.5, "end_s": 32.0, "probability": 0.5}]


def _timed_batch(run_id: str, name: str):
    """One file, two windows x (transcribe with words, whisper with words and measures, caption)."""
    uri = f"s3://archive/{name}.mp3"
    fid = fx.file_id(uri)
    files = pa.Table.from_pylist([{"file_id": fid, "uri": uri, "status": "ok", "run_id": run_id, "n_segments": 2,
                                   "duration_s": 60.0, "config_hash": "h"}], schema=schemas.FILES)
    rows = []
    for i in range(2):
        base = {"file_id": fid, "uri": uri, "segment_index": i, "start_s": 30.0 * i, "end_s": 30.0 * (i + 1),
                "run_id": run_id, "finish_reason": "stop", "language": "de", "language_prob": 0.91}
        words = WORDS if i == 1 else []        # window 0: timed, no word (an empty list is not null)
        rows += [{**base, "task": "transcribe", "text": "Grüß Gott, 東京" if i else "", "words": words},
                 {**base, "task": "whisper", "text": "Grüß Gott, 東京" if i else "", "words": words,
                  "avg_logprob": -1.3 if i else -0.1, "compression_ratio": 1.1, "no_speech_prob": 0.02,
                  "finish_reason": schemas.FINISH_LOW_LOGPROB if i else "stop"},
                 {**base, "task": "caption", "text": "speech", "language": None, "language_prob": None}]
    segs = pa.Table.from_pylist(rows, schema=schemas.SEGMENTS)
    return files, segs, [CommittedFile(fid, uri, "v1", "h", "ok", None, run_id, 0)]


def test_schema_v5_round_trip_with_words(tmp_path):
    assert schemas.SCHEMA_VERSION == "5"
    assert [schemas.SEGMENTS.field(c).nullable for c in TIMED_COLUMNS] == [True] * 6
    assert schemas.SEGMENTS.field("words").type == pa.list_(schemas.WORD)
    store = OutputStore(str(tmp_path / "out"))
    files, segs, entries = _timed_batch("r1", "talk")
    Committer(store, "r1").commit(files, segs, entries)
    back = store.read_table("segments").sort_by([("segment_index", "ascending"), ("task", "ascending")])
    want = schemas.conform(segs, schemas.SEGMENTS).sort_by([("segment_index", "ascending"), ("task", "ascending")])
    assert back.schema == schemas.SEGMENTS
    assert back.select(TIMED_COLUMNS + ("task", "finish_reason")).to_pylist() == \
        want.select(TIMED_COLUMNS + ("task", "finish_reason")).to_pylist()
    by_task = {(r["segment_index"], r["task"]): r for r in back.to_pylist()}
    assert by_task[(0, "transcribe")]["words"] == [] and by_task[(0, "caption")]["words"] is None
    assert [w["word"] for w in by_task[(1, "whisper")]["words"]] == [" Grüß", " Gott,", " 東京"]
    assert by_task[(1, "whisper")]["words"][1]["probability"] is None
    for path in store.data_files("segments"):
        assert data_file_schema_version(pq.read_schema(path)) == "5"
    assert table_schema_version(store.table("segments")) == "5"
    # an unknown finish reason is still refused
    bad = segs.set_column(segs.schema.get_field_index("finish_reason"), "finish_reason",
                          pa.array(["hallucinated"] * segs.num_rows))
    with pytest.raises(schemas.SchemaError, match="finish_reason"):
        Committer(store, "r2").commit(files, bad, entries)


def test_results_carry_timed_text_into_segments_and_reused_copies(tmp_path):
    """RESULTS rows with words -> ResultAssembler -> build_tables -> the tables; a producer that
    sends none of the new keys still builds; a reused file's rows keep the words."""
    from pipelines.decode import FileInfo
    from pipelines.driver import build_tables, reused_file
    from pipelines.output import ReuseSource
    from pipelines.sources import FileRef
    from pipelines.stages import ResultAssembler, info_to_struct
    from schemas import stage as st

    uri = "/a/talk.wav"
    ref = FileRef(uri=uri, size_bytes=10, etag=None, mtime=None, file_id=fx.file_id(uri))
    info = FileInfo(file_id=ref.file_id, uri=uri, status="ok", error_type=None, error_message=None, container="wav",
                    codec="pcm_s16le", sample_rate_in=16000, channels_in=1, duration_s=60.0, n_segments=2)
    base = {"kind": st.KIND_SEGMENT, "file_id": ref.file_id, "uri": uri, "prompt": "p", "finish_reason": "stop"}
    rows = [{**base, "segment_index": i, "start_s": 30.0 * i, "end_s": 30.0 * (i + 1), "task": task, "text": "x",
             **({"language": "de", "language_prob": 0.9, "words": WORDS if i else None, "avg_logprob": -0.2,
                 "compression_ratio": 1.2, "no_speech_prob": 0.01} if task == "whisper" else {})}
            for i in range(2) for task in ("whisper", "caption")]    # caption rows: the keys absent
    rows[-1]["file_info"] = info_to_struct(info)
    batch = st.build(rows, st.RESULTS, "infer")
    assert batch.schema == st.RESULTS and batch["words"].null_count == 3
    # the words as Ray Data may hand them back (large types, Parquet's "element") are the same data
    large = pa.large_list(pa.field("element", pa.struct([pa.field("word", pa.large_string()),
                                                         *[schemas.WORD.field(i) for i in range(1, 4)]])))
    relaid = batch.set_column(batch.schema.get_field_index("words"), "words", batch["words"].cast(large))
    assert st.check(relaid, st.RESULTS, "results").equals(batch)
    asm = ResultAssembler(["whisper", "caption"])
    done, failed = asm.add(batch)
    assert failed == [] and len(done) == 1
    _, segs, _ = build_tables(done, {ref.file_id: ref}, run_id="r1", model_id="tiny-random", chash="h")
    got = {(r["segment_index"], r["task"]): r for r in segs.to_pylist()}
    assert got[(1, "whisper")]["words"] == [{**w, "probability": None if w["probability"] is None
                                             else pytest.approx(w["probability"])} for w in WORDS]
    assert got[(1, "whisper")]["language"] == "de" and got[(1, "whisper")]["avg_logprob"] == pytest.approx(-0.2)
    assert got[(1, "caption")]["words"] is None and got[(1, "caption")]["language"] is None

    store = OutputStore(str(tmp_path / "out"))
    files, segs, entries = build_tables(done, {ref.file_id: ref}, run_id="r1", model_id="m", chash="h")
    Committer(store, "r1").commit(files, segs, entries)
    source = ReuseSource(store.read_table("files").to_pylist()[0],
                         store.read_table("segments").sort_by("segment_index").to_pylist())
    copy_ref = FileRef(uri="/b/copy.wav", size_bytes=10, etag=None, mtime=None, file_id=fx.file_id("/b/copy.wav"))
    copied = reused_file(copy_ref, source)
    _, csegs, _ = build_tables([copied], {copy_ref.file_id: copy_ref}, run_id="r2", model_id="m", chash="h")
    for a, b in zip(sorted(segs.to_pylist(), key=lambda r: (r["segment_index"], r["task"])),
                    sorted(csegs.to_pylist(), key=lambda r: (r["segment_index"], r["task"]))):
        assert {c: a[c] for c in TIMED_COLUMNS} == {c: b[c] for c in TIMED_COLUMNS}


def _v4_table(store: OutputStore, name: str) -> None:
    """Table ``name`` as the schema-v4 pipeline created and wrote it: without the v5 columns,
    version "4" in its configuration and in its data files."""
    from deltalake import DeltaTable

    from pipelines.output.tables import SCHEMA_VERSION_KEY, STATS_COLUMNS, table_schema

    v4 = pa.schema([f.with_metadata({SCHEMA_VERSION_KEY: "4"}) if f.name == "file_id" else f
                    for f in table_schema(name) if f.name not in TIMED_COLUMNS])
    DeltaTable.create(store.table_uri(name), v4, name=name, raise_if_key_not_exists=False,
                      configuration={SCHEMA_VERSION_KEY: "4", "delta.dataSkippingStatsColumns": STATS_COLUMNS[name]})
    files, segs, _ = _batch("r0", ["old"], tag="v4 ")
    data = {"files": files, "segments": segs}[name]
    write_deltalake(store.table_uri(name), data.select(v4.names).cast(v4), mode="append")


def test_a_v4_output_evolves_to_v5(tmp_path, capsys):
    from pipelines.cli import main as cli_main

    for via_migrate in (True, False):
        out = tmp_path / f"out-{via_migrate}"
        store = OutputStore(str(out))
        for name in ("files", "segments"):
            _v4_table(store, name)
        assert table_schema_version(store.table("segments")) == "4"
        old = store.read_table("segments")                          # reads with the new columns null
        assert old.schema == schemas.SEGMENTS and all(old[c].null_count == old.num_rows for c in TIMED_COLUMNS)
        if via_migrate:
            assert cli_main(["migrate", str(out)]) == 0
            said = capsys.readouterr().out
            assert "table segments brought from schema version 4 to 5" in said and "table files" in said
            assert {f.name for f in store.table("segments").schema().fields} >= set(TIMED_COLUMNS)
            assert "schema version 5, nothing to migrate" in migrate(str(out)).format(str(out))
        # the next commit (evolving the table itself without migrate) writes words beside v4 rows
        Committer(store, "r1").commit(*_timed_batch("r1", "new"))
        for name in ("files", "segments"):
            assert table_schema_version(store.table(name)) == "5"
        segs = store.read_table("segments")
        old_rows = [r for r in segs.to_pylist() if r["run_id"] == "r0"]
        assert len(old_rows) == 2 and all(r["words"] is None and r["language"] is None for r in old_rows)
        new_rows = [r for r in segs.to_pylist() if r["run_id"] == "r1" and r["words"]]
        assert len(new_rows) == 2 and new_rows[0]["words"][0]["word"] == " Grüß"


def test_readme_words_query_runs_as_written(tmp_path):
    """The README's DuckDB queries of word timings: the SQL on an Arrow table of the segments
    (``delta_scan`` needs DuckDB's delta extension, downloaded on first use) and the offline
    block as written."""
    import duckdb

    out = tmp_path / "out"
    store = OutputStore(str(out))
    Committer(store, "r1").commit(*_timed_batch("r1", "talk"))
    Committer(store, "r1").commit(*_batch("r1", ["untimed"]))
    readme = (ROOT / "README.md").read_text()
    sql = readme.split("<!-- tested: readme-words-sql -->", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    assert "delta_scan('OUT/segments')" in sql
    segments = store.read_table("segments")   # noqa: F841 - read by DuckDB by name
    rows = duckdb.sql(sql.replace("delta_scan('OUT/segments')", "segments").rstrip().rstrip(";")).fetchall()
    want = [("s3://archive/talk.mp3", 1, "de", w["word"].strip(), w["start_s"], w["end_s"]) for w in WORDS]
    assert [r[:6] for r in rows] == want
    assert rows[0][6] == pytest.approx(0.75) and rows[1][6] is None

    code = readme.split("<!-- tested: readme-words -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(code.replace('"OUT/', f'"{out}/'), scope)
    assert [r[:6] for r in scope["words"]] == want
