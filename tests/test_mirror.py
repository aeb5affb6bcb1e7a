"""The tables mirror the archive (issue 23): files gone from a run's input scope leave the tables
(history keeps them), a bad listing cannot wipe an index (--max-removed), and a moved or copied
file reuses the results of the same content instead of being decoded and generated again.

The end-to-end tests run the real pipeline (local Ray, the tiny model, one task, two new tokens)
on a local folder and on the moto S3 server; the guard and the schema tests need no Ray.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

import schemas
from pipelines.cli import main as cli_main
from pipelines.config import ConfigError, PipelineConfig, config_hash_of
from pipelines.decode import DecodeOptions
from pipelines.ops import plan as plan_mod
from pipelines.ops import report
from pipelines.ops.status import status_text
from pipelines.output import CommittedFile, Committer, OutputStore, TooManyRemovals, table_schema_version
from pipelines.output.mirror import Removals, check_removals
from pipelines.output.runs import RunRecord
from pipelines.output.tables import SCHEMA_VERSION_KEY
from pipelines.run import run_pipeline
from pipelines.sources import (
    ContentHasher,
    FileRef,
    Region,
    Scope,
    content_key,
    file_id_for,
    list_archive,
    sha256_key,
)
from pipelines.synth import noise, tone, write_audio
from salmonn import builtin_task
from schemas.vocabulary import RUN_COMPLETED, RUN_FAILED

SR = 16000
WINDOW_S = 2.0
TRANSCRIBE = builtin_task("transcribe")
# Cheap generation: one task, two new tokens per window; the speech gate off so every window
# is generated (its texts are what reuse must copy).
TASKS = (dataclasses.replace(TRANSCRIBE, settings=dataclasses.replace(TRANSCRIBE.settings, max_new_tokens=2)),)


def _cfg(inp, out, **kw) -> PipelineConfig:
    return PipelineConfig(input=str(inp), out=str(out), tasks=TASKS, decode=DecodeOptions(window_s=WINDOW_S),
                          speech_gate=False, progress=False, batch_size=4, **kw)


def _clip(path: Path, i: int, seconds: float = 2.5) -> None:
    """A distinct short clip (tone or noise, by ``i``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sig = tone(200.0 + 37 * i, seconds, SR) if i % 2 else noise(seconds, SR, seed=i)
    write_audio(path, sig, SR, "flac" if path.suffix == ".flac" else "wav")


def _rows(store: OutputStore, name: str, **kw) -> list[dict]:
    return store.read_table(name, **kw).to_pylist()


def _by_uri(rows: list[dict]) -> dict[str, dict]:
    return {r["uri"]: r for r in rows}


def _texts(store: OutputStore, uri: str, version: int | None = None) -> dict[tuple[int, str], tuple]:
    return {(s["segment_index"], s["task"]): (s["start_s"], s["end_s"], s["text"], s["n_output_tokens"],
                                              s["finish_reason"], s["label"], s["speech_ratio"])
            for s in _rows(store, "segments", version=version) if s["uri"] == uri}


def _snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _faults_never_decode(monkeypatch, *names: str) -> None:
    """Decoding any of ``names`` raises: a reused file that reached Ray would get an error row."""
    rules = [{"stage": "decode", "uri_contains": n, "raise": f"{n} must be reused, not decoded"} for n in names]
    monkeypatch.setenv("SALMONN_PIPELINE_FAULTS", json.dumps(rules))


# ---------------------------------------------------------------------------------------------
# Units: scope, content keys, the guard, the config
# ---------------------------------------------------------------------------------------------

def test_scope_per_input_kind(tmp_path):
    a, b = tmp_path / "audio", tmp_path / "audio-b"
    for name in ("x.wav", "sub/y.flac", "notes.txt"):
        (a / name).parent.mkdir(parents=True, exist_ok=True)
        (a / name).write_bytes(b"x")
    (b / "z.wav").parent.mkdir(parents=True)
    (b / "z.wav").write_bytes(b"z")
    scope = list_archive(str(a)).scope
    assert scope.contains(f"{a}/gone.wav") and scope.contains(f"{a}/deep/er/gone.mp3")
    assert not scope.contains(f"{b}/z.wav"), "a sibling folder sharing the name's prefix is outside"
    assert not scope.contains(f"{a}/notes.txt"), "the extension filter: a file never listed is not gone"
    assert list_archive(str(a), extensions=()).scope.contains(f"{a}/notes.txt")
    folder = list_archive(str(a), recursive=False).scope
    assert folder.contains(f"{a}/gone.wav") and not folder.contains(f"{a}/sub/gone.wav")
    glob = list_archive(str(a / "*.wav")).scope
    assert glob.contains(f"{a}/gone.wav") and not glob.contains(f"{a}/sub/gone.wav")
    assert not glob.contains(f"{a}/gone.flac")
    single = list_archive(str(a / "x.wav")).scope
    assert single.contains(f"{a}/x.wav") and not single.contains(f"{a}/other.wav")
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{a}/x.wav\n")
    listed = list_archive(str(manifest))
    assert [r.uri for r in listed.refs] == [f"{a}/x.wav"]
    assert not listed.scope.contains(f"{a}/x.wav") and not listed.scope.contains(f"{a}/gone.wav")
    assert "removes nothing" in listed.scope.describe()[0]
    # URIs of object stores, and folders the listing could not read
    s3 = Scope((Region("prefix", "s3://bucket/pod"), Region("glob", "s3://bucket/other/*/ep*.mp3")), None,
               unlisted=("s3://bucket/pod/locked",))
    assert s3.contains("s3://bucket/pod/a.mp3") and not s3.contains("s3://bucket/podcasts/a.mp3")
    assert s3.contains("s3://bucket/other/2024/ep1.mp3") and not s3.contains("s3://bucket/other/ep1.mp3")
    assert not s3.contains("gs://bucket/pod/a.mp3")
    assert not s3.contains("s3://bucket/pod/locked/a.mp3")


def test_a_folder_the_listing_cannot_read_is_out_of_scope(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    a = tmp_path / "audio"
    (a / "locked").mkdir(parents=True)
    (a / "locked" / "x.wav").write_bytes(b"x")
    (a / "y.wav").write_bytes(b"y")
    real_ls = LocalFileSystem.ls

    def ls(self, path, *args, **kwargs):   # as os.scandir on a folder without read permission (root reads any)
        if str(path).rstrip("/").endswith("/locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_ls(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "ls", ls)
    listing = list_archive(str(a))
    assert [Path(r.uri).name for r in listing.refs] == ["y.wav"]
    assert not listing.scope.contains(f"{a}/locked/x.wav") and listing.scope.contains(f"{a}/gone.wav")


def test_content_keys_are_content_hashes_only():
    class S3:
        protocol = ("s3", "s3a")

    class GCS:
        protocol = ("gs", "gcs")

    class Memory:
        protocol = "memory"

    md5 = hashlib.md5(b"abc").hexdigest()
    assert content_key(S3, {"ETag": f'"{md5}"'}) == f"s3-etag:{md5}"
    assert content_key(S3, {"ETag": f'"{md5.upper()}-12"'}) == f"s3-etag:{md5}-12"      # multipart
    assert content_key(S3, {"ETag": '"W/xyz"', "VersionId": md5}) is None, "never a version id"
    assert content_key(S3, {"VersionId": md5}) is None
    assert content_key(S3, {"ETag": f'"{md5}-0"'}) is None
    assert content_key(GCS, {"md5Hash": "kAFQmDzST7DWlj99KOF/cg==", "generation": "17"}) == \
        "gcs-md5:kAFQmDzST7DWlj99KOF/cg=="
    assert content_key(GCS, {"etag": "CJDg", "generation": "17"}) is None      # a composite object
    assert content_key(Memory, {"ETag": md5}) is None


def test_sha256_key_of_the_listed_version_only(tmp_path):
    p = tmp_path / "a.wav"
    p.write_bytes(b"some bytes" * 1000)
    (ref,) = list_archive(str(tmp_path)).refs
    assert ref.content_key is None                       # local files: hashed when needed
    assert sha256_key(ref) == "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
    hasher = ContentHasher()
    assert hasher.keyed(ref).content_key == sha256_key(ref) and hasher.files == 1 and hasher.bytes == 10000
    hasher.close()
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert sha256_key(ref) is None, "the file changed since it was listed: no key"
    gone = FileRef(str(tmp_path / "gone.wav"), 3, None, ref.mtime, file_id_for(str(tmp_path / "gone.wav")))
    assert sha256_key(gone) is None
    os.mkfifo(tmp_path / "fifo.wav")
    fifo = FileRef(str(tmp_path / "fifo.wav"), 3, None, ref.mtime, "f")
    assert sha256_key(fifo) is None                      # never blocks on a FIFO


def test_the_guard_and_its_flags():
    check_removals(Removals(("a",), ("u",), 10), 0.1, 0)              # 10% is not more than 10%
    with pytest.raises(TooManyRemovals, match=r"2 of the 10 indexed files .*20% > --max-removed 0.1, and 2 > "
                                              r"--max-removed-files 0.*--max-removed 0\.2 .*--keep-removed"):
        check_removals(Removals(("a", "b"), ("u", "v"), 10), 0.1, 0)
    check_removals(Removals(("a", "b"), ("u", "v"), 2), 1.0, 0)
    with pytest.raises(TooManyRemovals):
        check_removals(Removals(("a",), ("u",), 1000), 0.0, 0)
    # both the share and the count must be exceeded: one episode deleted from an archive of seven
    # files (14%) is a correct nightly run, not a bad listing; a listing that lost 6 of 7 is refused
    seven = [f"f{i}" for i in range(7)]
    check_removals(Removals(("f0",), ("u0",), 7), 0.1)                # default: more than 3 files
    check_removals(Removals(tuple(seven[:3]), tuple(seven[:3]), 7), 0.1)
    with pytest.raises(TooManyRemovals, match=r"4 of the 7 .*4 > --max-removed-files 3"):
        check_removals(Removals(tuple(seven[:4]), tuple(seven[:4]), 7), 0.1)
    check_removals(Removals(tuple(seven[:4]), tuple(seven[:4]), 1000), 0.1)   # 4 files, but 0.4% of the scope
    for bad in (-0.1, 1.5, float("nan"), float("inf"), True, "0.2"):
        with pytest.raises(ConfigError, match="--max-removed"):
            PipelineConfig(input="/x", out="/o", max_removed=bad)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ConfigError, match="--max-removed-files"):
            PipelineConfig(input="/x", out="/o", max_removed_files=bad)
    cfg = PipelineConfig(input="/x", out="/o")
    assert (cfg.keep_removed, cfg.max_removed, cfg.max_removed_files) == (False, 0.1, 3)
    assert config_hash_of(cfg) == config_hash_of(dataclasses.replace(cfg, keep_removed=True, max_removed=1.0,
                                                                     max_removed_files=0))


def test_an_output_of_schema_v3_gets_the_new_columns(tmp_path):
    """A v3 files table (no content_hash, reused_from) reads with nulls and gains the columns
    (schema version 4) on the next commit; its rows stay."""
    from deltalake import DeltaTable, write_deltalake

    store = OutputStore(str(tmp_path / "out"))
    v3 = pa.schema([f for f in schemas.FILES if f.name not in ("content_hash", "reused_from")])
    DeltaTable.create(store.table_uri("files"), v3, configuration={SCHEMA_VERSION_KEY: "3"},
                      raise_if_key_not_exists=False)
    write_deltalake(store.table_uri("files"), pa.Table.from_pylist(
        [{"file_id": "id-old", "uri": "/a/old.wav", "status": "ok", "run_id": "r0", "config_hash": "h",
          "version": "v1"}], schema=v3), mode="append")
    old = store.read_table("files")
    assert old["content_hash"].to_pylist() == [None] and old["reused_from"].to_pylist() == [None]
    files = pa.Table.from_pylist([{"file_id": "id-new", "uri": "/a/new.wav", "status": "ok", "run_id": "r1",
                                   "config_hash": "h", "content_hash": "sha256:00", "reused_from": "/a/old.wav"}],
                                 schema=schemas.FILES)
    Committer(store, "r1").commit(files, schemas.SEGMENTS.empty_table(),
                                  [CommittedFile("id-new", "/a/new.wav", "v1", "h", "ok", None, "r1", 0)])
    assert table_schema_version(store.table("files")) == schemas.SCHEMA_VERSION
    rows = _by_uri(_rows(store, "files"))
    assert rows["/a/old.wav"]["content_hash"] is None and rows["/a/old.wav"]["run_id"] == "r0"
    assert (rows["/a/new.wav"]["content_hash"], rows["/a/new.wav"]["reused_from"]) == ("sha256:00", "/a/old.wav")


# ---------------------------------------------------------------------------------------------
# The guard, --keep-removed and reuse without Ray (an index committed directly)
# ---------------------------------------------------------------------------------------------

def _index_directly(cfg: PipelineConfig, run_id: str) -> None:
    """Commit every listed file as processed by ``run_id`` (one window, one transcribe row each,
    with its content key), as a run under ``cfg`` would."""
    store = OutputStore(cfg.out)
    chash = config_hash_of(cfg)
    refs = list_archive(cfg.input).refs
    hasher = ContentHasher()
    refs = [hasher.keyed(r) for r in refs]
    hasher.close()
    now = dt.datetime.now(dt.UTC)
    files = pa.Table.from_pylist([{
        "file_id": r.file_id, "uri": r.uri, "size_bytes": r.size_bytes, "mtime": r.mtime, "status": "ok",
        "duration_s": 1.5, "n_segments": 1, "run_id": run_id, "config_hash": chash, "processed_at": now,
        "model_id": "tiny-random", "content_hash": r.content_key} for r in refs], schema=schemas.FILES)
    segs = pa.Table.from_pylist([{
        "file_id": r.file_id, "uri": r.uri, "segment_index": 0, "start_s": 0.0, "end_s": 1.5, "task": "transcribe",
        "prompt": TASKS[0].prompt, "text": f"said in {Path(r.uri).name}", "n_output_tokens": 2,
        "finish_reason": "length", "run_id": run_id, "model_id": "tiny-random"} for r in refs], schema=schemas.SEGMENTS)
    Committer(store, run_id).commit(files, segs, [CommittedFile(r.file_id, r.uri, r.version, chash, "ok", None,
                                                                run_id, 0) for r in refs])
    store.write_run(RunRecord.from_dict({"run_id": run_id, "status": RUN_COMPLETED, "config_hash": chash, "input": cfg.input}))


def _cli_run(audio: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(audio), "--out", str(out), "--tasks", "transcribe", "--max-new-tokens", "2", "--window-s",
            str(WINDOW_S), "--speech-gate", "off", "--no-progress", "--num-cpus", "2", *extra]


@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to start or connect to Ray fails the test."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called: this run had nothing for Ray to do")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)


def test_a_listing_that_lost_most_files_changes_nothing(tmp_path, capsys, no_ray):
    audio, out = tmp_path / "audio", tmp_path / "out"
    for i in range(10):
        _clip(audio / f"clip{i:02d}.wav", i, seconds=1.5)
    cfg = _cfg(audio, out)
    _index_directly(cfg, "20260101T000000Z-aaaaaa")
    store = OutputStore(str(out))
    for i in range(6):                        # 60% of the archive disappears (an unmounted volume...)
        (audio / f"clip{i:02d}.wav").unlink()
    shutil.copyfile(audio / "clip07.wav", audio / "copy-of-07.wav")   # and one copy arrives
    tables = _snapshot(out / "files"), _snapshot(out / "segments")

    p = plan_mod.plan_run(cfg, probe="never")
    assert len(p.removed) == 6 and p.removal_refused and "would remove 6 of 10" in p.format()
    assert "THE RUN WOULD STOP" in p.format()

    capsys.readouterr()
    assert cli_main(_cli_run(audio, out)) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "RANDOM weights" not in line]
    assert len(err) == 1, err                                       # one line
    assert "TooManyRemovals" in err[0] and "6 of the 10 indexed files" in err[0] and "60%" in err[0]
    assert "--max-removed 0.6" in err[0] and "--keep-removed" in err[0]
    assert (_snapshot(out / "files"), _snapshot(out / "segments")) == tables, "no Delta commit at all"
    (failed,) = [r for r in store.list_runs() if r != "20260101T000000Z-aaaaaa"]
    rec = store.read_run(failed)
    assert rec.status == RUN_FAILED and rec.error.startswith("TooManyRemovals: the listing no longer returns 6")
    assert "failed: TooManyRemovals" in status_text(str(out))

    # --keep-removed: nothing removed; the copy reuses clip07's results, and Ray is not needed
    assert cli_main(_cli_run(audio, out, "--keep-removed")) == 0
    printed = capsys.readouterr().out
    assert "removed 0, reused 1" in printed
    run_id = printed.split()[1]
    assert run_id == failed, "the same input and config resume the failed run"
    rows = _by_uri(_rows(store, "files"))
    assert len(rows) == 11
    copy = rows[str(audio / "copy-of-07.wav")]
    assert copy["reused_from"] == str(audio / "clip07.wav") and copy["content_hash"] == rows[copy["reused_from"]][
        "content_hash"]
    assert _texts(store, str(audio / "copy-of-07.wav")) == _texts(store, str(audio / "clip07.wav"))
    rec = store.read_run(run_id)
    assert rec.counts.reused == 1 and rec.counts.processed == 0
    assert "ray_init" not in rec.counts.phases_s and rec.resources is None   # Ray never started

    # --max-removed 1.0 removes them: rows gone from the latest version, still in the history
    before = store.table("files").version()
    assert cli_main(_cli_run(audio, out, "--max-removed", "1.0")) == 0
    printed = capsys.readouterr().out
    assert "removed 6, reused 0" in printed
    run_id = printed.split()[1]
    rows = _by_uri(_rows(store, "files"))
    assert sorted(Path(u).name for u in rows) == ["clip06.wav", "clip07.wav", "clip08.wav", "clip09.wav",
                                                  "copy-of-07.wav"]
    assert {s["uri"] for s in _rows(store, "segments")} == set(rows)
    assert len(_rows(store, "files", version=before)) == 11                 # time travel
    rec = store.read_run(run_id)
    assert rec.status == RUN_COMPLETED and rec.counts.removed == 6
    assert rec.mirror["indexed_in_scope"] == 11 and rec.mirror["to_remove"] == 6
    assert "removed 6, reused 0" in status_text(str(out))
    # each removal commit carries the run's transaction and metadata, segments first
    for name in ("segments", "files"):
        info = next(i for _, i in store.commit_infos(name) if i.get("salmonn_pipeline.operation") == "remove")
        assert info["run_id"] == rec.run_id and len(info["file_ids"].split(",")) == 6
    # a manifest names files, not a region: it removes nothing
    manifest = tmp_path / "some.txt"
    manifest.write_text(f"{audio}/clip06.wav\n")
    assert plan_mod.plan_run(dataclasses.replace(cfg, input=str(manifest)), probe="never").removed == ()


@pytest.mark.slow
def test_an_interrupted_removal_is_finished_by_the_resume(tmp_path, ray_local):
    """A crash between the removal's two deletes (segments gone, files rows not): the resumed run
    removes the file still gone, and processes the one the listing returns again (the ledger alone
    would skip it, its segments missing)."""
    audio, out = tmp_path / "audio", tmp_path / "out"
    for i in range(4):
        _clip(audio / f"clip{i}.wav", i, seconds=1.5)
    cfg = _cfg(audio, out, max_removed=1.0)
    _index_directly(cfg, "20260101T000000Z-aaaaaa")
    store = OutputStore(str(out))
    ids = {Path(r["uri"]).name: r["file_id"] for r in _rows(store, "files")}
    run = "20260102T000000Z-bbbbbb"
    store.write_run(RunRecord.from_dict({"run_id": run, "status": "running", "config_hash": config_hash_of(cfg), "input": str(audio),
                     "started_at": "2026-01-02T00:00:00+00:00"}))
    c = Committer(store, run)
    c._delete("segments", sorted([ids["clip0.wav"], ids["clip1.wav"]]), c.next_seq)   # then the driver died
    assert len(_rows(store, "files")) == 4 and len(_rows(store, "segments")) == 2
    (audio / "clip0.wav").unlink()                       # clip1.wav is listed again
    assert sorted(Committer(store, run).in_flight_removal()) == sorted([ids["clip0.wav"], ids["clip1.wav"]])

    resumed = run_pipeline(cfg)
    assert (resumed.run_id, resumed.resumed, resumed.removed, resumed.processed) == (run, True, 1, 1)
    files = _by_uri(_rows(store, "files"))
    assert sorted(Path(u).name for u in files) == ["clip1.wav", "clip2.wav", "clip3.wav"]
    assert files[str(audio / "clip1.wav")]["run_id"] == run
    segs = _rows(store, "segments")
    assert {s["uri"] for s in segs} == set(files), "every file has its segment rows"
    assert Committer(store, run).in_flight_seq is None


# ---------------------------------------------------------------------------------------------
# End to end: a local folder, then moto S3
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_folder_archive_follows_deletes_moves_copies(tmp_path, ray_local, monkeypatch):
    audio, other, out = tmp_path / "audio", tmp_path / "audio-b", tmp_path / "out"
    names = ["keep1.wav", "keep2.flac", "del1.wav", "del2.flac", "move.flac", "copy.wav", "change.wav", "keep3.wav"]
    for i, name in enumerate(names):
        _clip(audio / name, i)
    for i, name in enumerate(["b1.wav", "b2.wav"]):
        _clip(other / name, 20 + i)
    first = run_pipeline(_cfg(audio, out))
    assert (first.status, first.ok, first.removed, first.reused) == (RUN_COMPLETED, 8, 0, 0)
    second_archive = run_pipeline(_cfg(other, out))           # another archive in the same OUT
    assert second_archive.ok == 2 and second_archive.removed == 0
    store = OutputStore(str(out))
    original = _by_uri(_rows(store, "files"))
    assert all(r["content_hash"].startswith("sha256:") for r in original.values())
    moved_texts = _texts(store, str(audio / "move.flac"))
    copy_texts = _texts(store, str(audio / "copy.wav"))
    b_files = sorted((r for r in original.values() if r["uri"].startswith(f"{other}/")), key=lambda r: r["uri"])
    b_segs = sorted((s for s in _rows(store, "segments") if s["uri"].startswith(f"{other}/")),
                    key=lambda s: (s["uri"], s["segment_index"]))
    version_before = store.table("files").version()

    # the archive changes: 2 deleted, 1 moved into a new folder, 1 copied, 1 new, 1 changed
    (audio / "del1.wav").unlink()
    (audio / "del2.flac").unlink()
    (audio / "season2" / "new").mkdir(parents=True)
    os.rename(audio / "move.flac", audio / "season2" / "new" / "move.flac")
    shutil.copyfile(audio / "copy.wav", audio / "copy-again.wav")
    _clip(audio / "added.wav", 30)
    _clip(audio / "change.wav", 31, seconds=3.5)

    p = plan_mod.plan_run(_cfg(audio, out, max_removed=0.5))
    text = p.format(show_files=True)
    assert "would remove 3 of 8 indexed files" in text and "would reuse 2" in text
    assert {Path(f.uri).name: f.reused_from for f in p.reused} == {
        "move.flac": str(audio / "move.flac"), "copy-again.wav": str(audio / "copy.wav")}
    assert sorted(Path(u).name for u in p.removed) == ["del1.wav", "del2.flac", "move.flac"]
    assert sorted(Path(f.uri).name for f in p.todo) == ["added.wav", "change.wav"]

    _faults_never_decode(monkeypatch, "season2/new/move.flac", "copy-again.wav")
    second = run_pipeline(_cfg(audio, out, max_removed=0.5))
    assert (second.status, second.removed, second.reused, second.processed, second.ok) == (RUN_COMPLETED, 3, 2, 2, 2)
    assert "removed 3, reused 2" in second.format()
    files = _by_uri(_rows(store, "files"))
    segs = _rows(store, "segments")
    gone = [str(audio / n) for n in ("del1.wav", "del2.flac", "move.flac")]
    assert not set(gone) & set(files) and not set(gone) & {s["uri"] for s in segs}
    moved, copied = files[str(audio / "season2" / "new" / "move.flac")], files[str(audio / "copy-again.wav")]
    for row, source, texts in ((moved, "move.flac", moved_texts), (copied, "copy.wav", copy_texts)):
        src = original[str(audio / source)]
        assert row["reused_from"] == src["uri"] and row["content_hash"] == src["content_hash"]
        assert row["run_id"] == second.run_id and row["status"] == "ok" and row["file_id"] == file_id_for(row["uri"])
        assert (row["duration_s"], row["n_segments"], row["codec"]) == (src["duration_s"], src["n_segments"],
                                                                         src["codec"])
        assert _texts(store, row["uri"]) == texts and texts, "the source's exact rows"
        mine = [s for s in segs if s["uri"] == row["uri"]]
        assert {s["file_id"] for s in mine} == {row["file_id"]} and {s["run_id"] for s in mine} == {second.run_id}
    assert files[str(audio / "copy.wav")] == original[str(audio / "copy.wav")], "the source itself is untouched"
    for name in ("added.wav", "change.wav"):
        row = files[str(audio / name)]
        assert row["run_id"] == second.run_id and row["reused_from"] is None and row["status"] == "ok"
        assert row["content_hash"] == "sha256:" + hashlib.sha256((audio / name).read_bytes()).hexdigest()
    assert files[str(audio / "change.wav")]["duration_s"] == pytest.approx(3.5, abs=0.05)
    # the other archive in the same OUT is untouched
    assert sorted((r for r in files.values() if r["uri"].startswith(f"{other}/")), key=lambda r: r["uri"]) == b_files
    assert sorted((s for s in segs if s["uri"].startswith(f"{other}/")),
                  key=lambda s: (s["uri"], s["segment_index"])) == b_segs
    # earlier versions keep the removed files (time travel)
    old = _by_uri(_rows(store, "files", version=version_before))
    assert set(gone) <= set(old) and _texts(store, str(audio / "move.flac"), version=version_before) == moved_texts
    # the record, status and report say so
    rec = store.read_run(second.run_id)
    assert (rec.counts.removed, rec.counts.reused, rec.counts.processed) == (3, 2, 2)
    assert f"prefix {audio}" in rec.mirror["scope"][0]
    assert "removed 3, reused 2" in status_text(str(out))
    assert "3 removed" in report.render_text(report.collect(str(out), second.run_id))
    # a third run: nothing to do
    third = run_pipeline(_cfg(audio, out))
    assert (third.processed, third.removed, third.reused, third.skipped) == (0, 0, 0, 8)


@pytest.mark.slow
def test_s3_archive_moves_copies_and_a_multipart_reupload(s3_server, s3_storage_options, ray_local, tmp_path,
                                                          monkeypatch):
    import moto.s3.models

    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 1024)    # small parts for the test
    local = tmp_path / "clips"
    for i, name in enumerate(["a.wav", "b.wav", "c.wav"]):
        _clip(local / name, i)
    fs = s3_server.s3fs()
    fs.mkdir("arch")
    for p in sorted(local.iterdir()):
        fs.pipe_file(f"arch/{p.name}", p.read_bytes())        # single-part uploads
    out = tmp_path / "out"

    def cfg(**kw):
        return _cfg("s3://arch/", out, storage_options=s3_storage_options, out_storage_options={}, **kw)

    first = run_pipeline(cfg())
    assert first.ok == 3
    store = OutputStore(str(out))
    original = _by_uri(_rows(store, "files"))
    for name in ("a.wav", "b.wav", "c.wav"):
        md5 = hashlib.md5((local / name).read_bytes()).hexdigest()
        assert original[f"s3://arch/{name}"]["content_hash"] == f"s3-etag:{md5}"
    a_texts = _texts(store, "s3://arch/a.wav")

    fs.mv("arch/a.wav", "arch/moved/a.wav")                 # server-side copy + delete: the ETag stays
    fs.copy("arch/b.wav", "arch/b-copy.wav")
    data = (local / "c.wav").read_bytes()
    client = s3_server.boto3_client()
    up = client.create_multipart_upload(Bucket="arch", Key="c-multi.wav")
    half = len(data) // 2
    parts = [client.upload_part(Bucket="arch", Key="c-multi.wav", UploadId=up["UploadId"], PartNumber=n + 1,
                                Body=chunk)["ETag"] for n, chunk in enumerate((data[:half], data[half:]))]
    client.complete_multipart_upload(Bucket="arch", Key="c-multi.wav", UploadId=up["UploadId"], MultipartUpload={
        "Parts": [{"ETag": e, "PartNumber": n + 1} for n, e in enumerate(parts)]})

    p = plan_mod.plan_run(cfg(max_removed=0.5))
    assert len(p.removed) == 1 and len(p.reused) == 2 and [f.uri for f in p.todo] == ["s3://arch/c-multi.wav"]
    _faults_never_decode(monkeypatch, "moved/a.wav", "b-copy.wav")
    second = run_pipeline(cfg(max_removed=0.5))
    assert (second.removed, second.reused, second.processed, second.ok) == (1, 2, 1, 1)
    files = _by_uri(_rows(store, "files"))
    assert "s3://arch/a.wav" not in files
    assert files["s3://arch/moved/a.wav"]["reused_from"] == "s3://arch/a.wav"
    assert _texts(store, "s3://arch/moved/a.wav") == a_texts
    assert files["s3://arch/b-copy.wav"]["reused_from"] == "s3://arch/b.wav"
    multi = files["s3://arch/c-multi.wav"]
    # the same bytes in another part layout: another ETag, so processed again (never a guess)
    assert multi["reused_from"] is None and multi["run_id"] == second.run_id
    assert multi["content_hash"].startswith("s3-etag:") and multi["content_hash"].endswith("-2")
    assert multi["content_hash"] != files["s3://arch/c.wav"]["content_hash"]
