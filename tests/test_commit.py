"""Commit protocol on Delta tables: latest view, ledger, resume of an interrupted commit,
redaction (no Ray)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from pipelines.output import (
    CommittedFile,
    Committer,
    OldLayoutError,
    OutputStore,
    committed_ledger,
    committed_seq,
    data_file_schema_version,
    redact,
    table_schema_version,
)
from pipelines.output.tables import SCHEMA_VERSION_KEY


def _tables(run_id: str, uris: list[str], n_seg: int = 2, text: str = "t", version: str = "v1"):
    files = pa.Table.from_pylist([
        {"file_id": f"id-{u}", "uri": u, "status": "ok", "run_id": run_id, "n_segments": n_seg,
         "duration_s": 30.0 * n_seg, "config_hash": "h"} for u in uris
    ], schema=schemas.FILES)
    segs = pa.Table.from_pylist([
        {"file_id": f"id-{u}", "uri": u, "segment_index": i, "start_s": 30.0 * i, "end_s": 30.0 * (i + 1),
         "task": "caption", "text": f"{text}-{u}-{i}", "finish_reason": "stop", "run_id": run_id}
        for u in uris for i in range(n_seg)
    ], schema=schemas.SEGMENTS)
    entries = [CommittedFile(file_id=f"id-{u}", uri=u, version=version, config_hash="h", status="ok",
                             error_type=None, run_id=run_id, seq=0) for u in uris]
    return files, segs, entries


def test_commit_roundtrip_and_schema_version(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    assert store.read_table("files").num_rows == 0 and committed_ledger(store) == {}
    c = Committer(store, "run1")
    rec = c.commit(*_tables("run1", ["a", "b"]))
    assert (rec.seq, rec.n_files, rec.n_segments) == (1, 2, 4)
    files = store.read_table("files")
    assert sorted(files["uri"].to_pylist()) == ["a", "b"]
    assert files["version"].to_pylist() == ["v1", "v1"]           # from the ledger entries
    assert store.read_table("segments").num_rows == 4
    assert schemas.schema_version(files.schema) == schemas.SCHEMA_VERSION
    # where the schema version is: every data file's file_id field metadata, and the table's configuration
    for name in ("files", "segments"):
        paths = store.data_files(name)
        assert paths and all(p.endswith(".parquet") for p in paths)
        for p in paths:
            s = pq.read_schema(p)
            assert s.field("file_id").metadata == {schemas.METADATA_KEY: schemas.SCHEMA_VERSION.encode()}
            assert data_file_schema_version(s) == schemas.SCHEMA_VERSION
            assert pq.ParquetFile(p).metadata.row_group(0).column(0).compression == "ZSTD"
        assert table_schema_version(store.table(name)) == schemas.SCHEMA_VERSION
    # both Delta commits carry the run's application transaction and commit metadata
    for name in ("files", "segments"):
        dt = store.table(name)
        assert dt.transaction_version("run1") == 1
        last = dt.history(1)[0]
        assert (last["run_id"], last["seq"], last["file_ids"]) == ("run1", "1", "id-a,id-b")


def test_reprocessed_file_replaces_its_rows(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    Committer(store, "20260101T000000Z-aaaaaa").commit(*_tables("20260101T000000Z-aaaaaa", ["a", "b"], text="old"))
    new = Committer(store, "20260102T000000Z-bbbbbb")
    new.commit(*_tables("20260102T000000Z-bbbbbb", ["a"], n_seg=3, text="new", version="v2"))
    latest = store.read_table("segments")
    texts = sorted((r["uri"], r["segment_index"], r["text"]) for r in latest.to_pylist())
    assert texts == [("a", 0, "new-a-0"), ("a", 1, "new-a-1"), ("a", 2, "new-a-2"),
                     ("b", 0, "old-b-0"), ("b", 1, "old-b-1")]
    ledger = committed_ledger(store)
    assert (ledger["a"].version, ledger["a"].run_id) == ("v2", "20260102T000000Z-bbbbbb")
    assert (ledger["b"].version, ledger["b"].run_id) == ("v1", "20260101T000000Z-aaaaaa")
    # the older run's rows as of its last commit are still there (Delta time travel)
    old = store.read_run_rows("segments", "20260101T000000Z-aaaaaa")
    assert sorted(old["text"].to_pylist()) == ["old-a-0", "old-a-1", "old-b-0", "old-b-1"]
    assert store.read_table("segments", run_id="20260101T000000Z-aaaaaa").num_rows == 2
    # an error result removes the file's old segments
    files, _, entries = _tables("20260103T000000Z-cccccc", ["b"], n_seg=0)
    files = files.set_column(files.schema.get_field_index("status"), "status", pa.array(["error"]))
    Committer(store, "20260103T000000Z-cccccc").commit(files, schemas.SEGMENTS.empty_table(), entries)
    assert sorted(store.read_table("segments")["uri"].to_pylist()) == ["a", "a", "a"]
    assert store.read_table("files").num_rows == 2


def test_committer_continues_sequence(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    Committer(store, "r").commit(*_tables("r", ["a"]))
    c2 = Committer(store, "r")
    assert (c2.next_seq, c2.in_flight_seq) == (2, None)
    assert c2.commit(*_tables("r", ["b"])).seq == 2
    assert committed_seq(store, "r") == 2 and committed_seq(store, "other") == 0


def test_interrupted_commit_is_redone_without_duplicates(tmp_path):
    """A crash between the segments commit and the files commit: resume redoes those files; the
    redo replaces the segment rows the interrupted commit wrote; files no longer listed lose them."""
    store = OutputStore(str(tmp_path / "out"))
    c = Committer(store, "r")
    c.commit(*_tables("r", ["a"]))
    # seq 2 dies after its segments commit: write only that half, as _write does
    files, segs, entries = _tables("r", ["b", "gone"])
    c._write("segments", schemas.conform(segs, schemas.SEGMENTS), ["id-b", "id-gone"], 2)
    assert store.read_table("segments").num_rows == 6
    assert set(committed_ledger(store)) == {"a"}              # b and gone are not done

    resumed = Committer(store, "r")
    assert (resumed.in_flight_seq, resumed.next_seq) == (2, 3)
    assert resumed.in_flight_file_ids() == ["id-b", "id-gone"]
    # this attempt lists b again but not "gone": gone's stale rows go, b's wait for its redo
    assert resumed.settle_in_flight(["id-b"]) == ["id-gone"]
    assert sorted(store.read_table("segments")["uri"].to_pylist()) == ["a", "a", "b", "b"]
    resumed.commit(*_tables("r", ["b"], n_seg=3, text="redo"))
    segs = store.read_table("segments").to_pylist()
    keys = [(s["file_id"], s["segment_index"], s["task"]) for s in segs]
    assert len(keys) == len(set(keys)) == 5
    assert sorted(s["text"] for s in segs if s["uri"] == "b") == ["redo-b-0", "redo-b-1", "redo-b-2"]
    assert committed_seq(store, "r") == 3 and Committer(store, "r").in_flight_seq is None


def test_old_layout_is_refused_with_the_migrate_command(tmp_path):
    out = tmp_path / "out"
    part = out / "files" / "run_id=20250101T000000Z-old111" / "part-000001-aa.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(_tables("20250101T000000Z-old111", ["a"])[0], part)
    store = OutputStore(str(out))
    with pytest.raises(OldLayoutError, match=f"salmonn-pipeline migrate {out}"):
        store.read_table("files")
    with pytest.raises(OldLayoutError):
        Committer(store, "r")


def test_schema_evolution_adds_columns(tmp_path):
    """A table created by an older schema (no files.version) gains the column on the next commit."""
    from deltalake import DeltaTable

    store = OutputStore(str(tmp_path / "out"))
    old = pa.schema([f for f in schemas.FILES if f.name != "version"])
    DeltaTable.create(store.table_uri("files"), old, configuration={SCHEMA_VERSION_KEY: "2"},
                      raise_if_key_not_exists=False)
    Committer(store, "r").commit(*_tables("r", ["a"]))
    dt = store.table("files")
    assert "version" in [f.name for f in dt.schema().fields]
    assert table_schema_version(dt) == schemas.SCHEMA_VERSION
    assert committed_ledger(store)["a"].version == "v1"


def test_conform_rejects_bad_tables():
    t = pa.table({"file_id": ["x"], "uri": ["u"], "bogus": [1]})
    with pytest.raises(schemas.SchemaError, match="bogus"):
        schemas.conform(t, schemas.FILES)
    t = pa.table({"uri": ["u"], "status": ["ok"], "run_id": ["r"]})
    with pytest.raises(schemas.SchemaError, match="file_id"):
        schemas.conform(t, schemas.FILES)
    t = schemas.conform(pa.table({"file_id": ["x"], "uri": ["u"], "status": ["fine"], "run_id": ["r"]}), schemas.FILES)
    with pytest.raises(schemas.SchemaError, match="status"):
        schemas.check_values("files", t)


def test_the_skip_rule_decides_each_listed_file(tmp_path):
    """pipelines.planning.classify, the one skip rule: an Arrow join of the listing with the files
    table, a permanent error skipped, a transient one retried."""
    from pipelines.planning import classify, to_process
    from pipelines.sources import FileRef

    store = OutputStore(str(tmp_path / "out"))
    rows = {  # uri -> (version, config hash, status, error_type) committed
        "same": ("v1", "h", "ok", None), "changed": ("v1", "h", "ok", None), "other-config": ("v1", "h0", "ok", None),
        "bad": ("v1", "h", "error", "invalid_data"), "flaky": ("v1", "h", "error", "read_error"),
        "partial-flaky": ("v1", "h", "partial", "inference_error"), "no-hash": ("v1", None, "ok", None),
    }
    files = pa.Table.from_pylist([{"file_id": f"id-{u}", "uri": u, "status": st, "error_type": et, "run_id": "r",
                                   "config_hash": h} for u, (_, h, st, et) in rows.items()], schema=schemas.FILES)
    entries = [CommittedFile(f"id-{u}", u, v, h or "", st, et, "r", 0) for u, (v, h, st, et) in rows.items()]
    files = files.set_column(files.schema.get_field_index("config_hash"), "config_hash",
                             pa.array([h for (_, h, _, _) in rows.values()], pa.string()))
    Committer(store, "r").commit(files, schemas.SEGMENTS.empty_table(), entries)
    listed = [FileRef(u, 1, "v2" if u == "changed" else "v1", None, f"id-{u}") for u in [*rows, "new"]]
    table = store.read_table("files")
    assert dict(zip([r.uri for r in listed], classify(table, listed, "h"))) == {
        "same": "unchanged", "changed": "changed", "other-config": "config_changed", "bad": "unchanged",
        "flaky": "retry", "partial-flaky": "retry", "no-hash": "config_changed", "new": "new"}
    assert [r.uri for r in to_process(table, listed, "h")] == [
        "changed", "other-config", "flaky", "partial-flaky", "no-hash", "new"]
    assert classify(table.slice(0, 0), listed, "h") == ["new"] * len(listed)


def test_redact_hides_secrets():
    opts = {"key": "AKIA123", "secret": "s3cr3t", "endpoint_url": "http://127.0.0.1:9",
            "client_kwargs": {"aws_secret_access_key": "zzz", "region_name": "us-east-1"}, "anon": False}
    red = redact(opts)
    blob = json.dumps(red)
    assert "s3cr3t" not in blob and "AKIA123" not in blob and "zzz" not in blob
    assert red["endpoint_url"] == "http://127.0.0.1:9" and red["client_kwargs"]["region_name"] == "us-east-1"


def test_model_and_stages_import_no_ray():
    """salmonn/ and every pipeline stage work without Ray; only pipelines.run imports it."""
    import subprocess
    import sys

    modules = ["salmonn", "salmonn.model", "salmonn.checkpoint", "salmonn.tiny", "schemas", "schemas.stage",
               "pipelines.sources", "pipelines.decode", "pipelines.synth", "pipelines.infer",
               "pipelines.stages", "pipelines.output", "pipelines.driver", "pipelines.ops.status", "pipelines.storage",
               "pipelines.labels", "pipelines.ops.export", "pipelines.ops.plan", "pipelines.ops.report",
               "salmonn.weights", "pipelines.cli", "pipelines.run"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "from pipelines.infer import SalmonnPredictor\n"
            "assert 'ray' not in sys.modules, sorted(k for k in sys.modules if k.startswith('ray'))[:5]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _error_refs(n: int):
    import datetime as dt

    from pipelines.sources import FileRef, file_id_for

    uris = [f"/archive/clip{i:02d}.mp3" for i in range(n)]
    return [FileRef(u, 100, None, dt.datetime(2026, 1, 1, tzinfo=dt.UTC), file_id_for(u)) for u in uris]


def _buffer(out, refs, **kw):
    from pipelines.driver import CommitBuffer, Progress

    store = OutputStore(str(out))
    buffer = CommitBuffer(Committer(store, "20260101T000000Z-spaced"), {r.file_id: r for r in refs},
                          Progress(len(refs), False), run_id="20260101T000000Z-spaced", model_id="m", chash="h",
                          flush_files=1, flush_seconds=0.0, **kw)
    return store, buffer


def test_slow_commits_are_spaced_out_and_carry_the_files_completed_meanwhile(tmp_path, monkeypatch):
    """A commit that takes long (one that rewrites big data files: reprocessing in a large table)
    makes the next one wait 9x its duration; the files completed meanwhile go into one commit,
    none lost or written twice. Without spacing (commit_share=None) each file is its own commit."""
    import time

    from pipelines import faults
    from pipelines.driver import error_file

    refs = _error_refs(10)
    # the commit holding clip00 is slow (the fault hook's sleep stands in for a slow rewrite)
    monkeypatch.setenv(faults.ENV, json.dumps([{"stage": "commit", "uri_contains": "clip00", "sleep_s": 0.3}]))
    store, buffer = _buffer(tmp_path / "spaced", refs)
    for ref in refs[:6]:
        buffer.add([error_file(ref, "not_found", "gone")])
    # the first file was committed at once (0.3 s); the next five wait for 2.7 s after it
    assert buffer.n_commits == 1 and len(buffer.buffer) == 5 and buffer.last_commit_s >= 0.3
    time.sleep(max(0.0, buffer.last_commit_end + 9 * buffer.last_commit_s - time.monotonic()) + 0.1)
    buffer.add([error_file(refs[6], "not_found", "gone")])
    assert buffer.n_commits == 2 and not buffer.buffer     # the wait is over: six files in one commit
    for ref in refs[7:]:      # within 9x that commit's time after it: they wait for the last flush
        buffer.add([error_file(ref, "not_found", "gone")])
    assert buffer.n_commits == 2 and len(buffer.buffer) == 3
    buffer.flush()            # the end of a pass commits whatever is buffered, at once
    assert buffer.n_commits == 3 and not buffer.buffer
    files = store.read_table("files")
    assert sorted(files["uri"].to_pylist()) == sorted(r.uri for r in refs) and files.num_rows == 10

    monkeypatch.setenv(faults.ENV, json.dumps([{"stage": "commit", "sleep_s": 0.05}]))   # every commit slow
    store, buffer = _buffer(tmp_path / "unspaced", refs, commit_share=None)
    for ref in refs:
        buffer.add([error_file(ref, "not_found", "gone")])
    assert buffer.n_commits == 10 and store.read_table("files").num_rows == 10


def test_filtered_reads_after_a_removal_rewrote_data_files(tmp_path):
    """A delete makes delta-rs rewrite the data files it touches with string_view columns; reads
    filtered by file_id or run_id (reuse sources, report, export) still work on them."""
    store = OutputStore(str(tmp_path / "out"))
    uris = ["a", "b", "c"]
    c = Committer(store, "r1")
    c.commit(*_tables("r1", uris))
    c.remove(["id-a"])
    assert store.read_table("segments", file_ids=["id-b"]).column("uri").to_pylist() == ["b", "b"]
    assert sorted(store.read_table("files", run_id="r1", columns=["uri"]).column("uri").to_pylist()) == ["b", "c"]
    assert store.read_table("segments", file_ids=["id-a"]).num_rows == 0
