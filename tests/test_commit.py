"""Commit protocol: manifest-listed parts only, latest view, ledger, redaction (no Ray)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from pipelines import commit as cm


def _tables(run_id: str, uris: list[str], n_seg: int = 2, text: str = "t"):
    files = pa.Table.from_pylist([
        {"file_id": f"id-{u}", "uri": u, "status": "ok", "run_id": run_id, "n_segments": n_seg,
         "duration_s": 30.0 * n_seg, "config_hash": "h"} for u in uris
    ], schema=schemas.FILES)
    segs = pa.Table.from_pylist([
        {"file_id": f"id-{u}", "uri": u, "segment_index": i, "start_s": 30.0 * i, "end_s": 30.0 * (i + 1),
         "task": "caption", "text": f"{text}-{u}-{i}", "finish_reason": "stop", "run_id": run_id}
        for u in uris for i in range(n_seg)
    ], schema=schemas.SEGMENTS)
    entries = [cm.CommittedFile(file_id=f"id-{u}", uri=u, version="v1", config_hash="h", status="ok",
                                error_type=None, run_id=run_id, seq=0) for u in uris]
    return files, segs, entries


def test_commit_roundtrip_and_schema_metadata(tmp_path):
    store = cm.OutputStore(str(tmp_path / "out"))
    c = cm.Committer(store, "run1")
    rec = c.commit(*_tables("run1", ["a", "b"]))
    assert rec.seq == 1 and rec.n_files == 2 and rec.n_segments == 4
    files = store.read_table("files")
    segs = store.read_table("segments")
    assert sorted(files["uri"].to_pylist()) == ["a", "b"]
    assert segs.num_rows == 4
    # every part on disk carries the schema version
    part = tmp_path / "out" / rec.segments_part
    assert schemas.schema_version(pq.read_schema(part)) == schemas.SCHEMA_VERSION
    # and no temporary files are left behind
    leftovers = [f for _, _, fs in os.walk(tmp_path) for f in fs if f.startswith(".tmp-")]
    assert leftovers == []


def test_unlisted_part_is_ignored_and_removed(tmp_path):
    store = cm.OutputStore(str(tmp_path / "out"))
    cm.Committer(store, "run1").commit(*_tables("run1", ["a"]))
    # a part written by a commit that crashed before its record: same layout, not in the manifest
    files, segs, _ = _tables("run1", ["ghost"])
    orphan = tmp_path / "out" / "segments" / "run_id=run1" / "part-000002-deadbeef.parquet"
    pq.write_table(segs, orphan)
    assert "ghost" not in store.read_table("segments")["uri"].to_pylist()
    assert store.orphan_parts("run1") == [str(orphan)]
    assert store.remove_orphans("run1") == [str(orphan)]
    assert not orphan.exists()
    assert store.read_table("segments")["uri"].to_pylist() == ["a", "a"]


def test_committer_continues_sequence(tmp_path):
    store = cm.OutputStore(str(tmp_path / "out"))
    cm.Committer(store, "r").commit(*_tables("r", ["a"]))
    c2 = cm.Committer(store, "r")
    assert c2.next_seq == 2
    assert c2.commit(*_tables("r", ["b"])).seq == 2
    assert [c.seq for c in store.commits("r")] == [1, 2]


def test_latest_view_prefers_newer_run(tmp_path):
    store = cm.OutputStore(str(tmp_path / "out"))
    cm.Committer(store, "20260101T000000Z-aaaaaa").commit(*_tables("20260101T000000Z-aaaaaa", ["a", "b"], text="old"))
    cm.Committer(store, "20260102T000000Z-bbbbbb").commit(*_tables("20260102T000000Z-bbbbbb", ["a"], text="new"))
    latest = store.read_table("segments", latest=True)
    texts = {(r["uri"], r["segment_index"]): r["text"] for r in latest.to_pylist()}
    assert texts == {("a", 0): "new-a-0", ("a", 1): "new-a-1", ("b", 0): "old-b-0", ("b", 1): "old-b-1"}
    assert store.read_table("segments").num_rows == 6
    assert schemas.schema_version(latest.schema) == schemas.SCHEMA_VERSION


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


def test_is_done_rules():
    e = cm.CommittedFile("f", "u", "v1", "h", "ok", None, "r", 1)
    assert cm.is_done(e, "v1", "h")
    assert not cm.is_done(e, "v2", "h")        # changed file
    assert not cm.is_done(e, "v1", "h2")       # changed config
    assert not cm.is_done(None, "v1", "h")     # new file
    bad = cm.CommittedFile("f", "u", "v1", "h", "error", "not_audio", "r", 1)
    assert cm.is_done(bad, "v1", "h")          # a permanent error is not retried every night
    flaky = cm.CommittedFile("f", "u", "v1", "h", "error", "read_error", "r", 1)
    assert not cm.is_done(flaky, "v1", "h")    # a transient one is


def test_redact_hides_secrets():
    opts = {"key": "AKIA123", "secret": "s3cr3t", "endpoint_url": "http://127.0.0.1:9",
            "client_kwargs": {"aws_secret_access_key": "zzz", "region_name": "us-east-1"}, "anon": False}
    red = cm.redact(opts)
    blob = json.dumps(red)
    assert "s3cr3t" not in blob and "AKIA123" not in blob and "zzz" not in blob
    assert red["endpoint_url"] == "http://127.0.0.1:9" and red["client_kwargs"]["region_name"] == "us-east-1"


def test_model_and_stages_import_no_ray():
    """salmonn/ and every pipeline stage work without Ray; only pipelines.run imports it."""
    import subprocess
    import sys

    modules = ["salmonn", "salmonn.model", "salmonn.checkpoint", "salmonn.tiny", "schemas", "schemas.stage",
               "pipelines.sources", "pipelines.decode", "pipelines.synth", "pipelines.infer",
               "pipelines.stages", "pipelines.commit", "pipelines.status", "pipelines.storage",
               "pipelines.labels", "pipelines.export", "pipelines.plan", "pipelines.report",
               "salmonn.weights", "pipelines.cli", "pipelines.run"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "from pipelines.infer import SalmonnPredictor\n"
            "assert 'ray' not in sys.modules, sorted(k for k in sys.modules if k.startswith('ray'))[:5]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
