"""A table that lost a data file (issue 28): detected, repaired and refilled; never a traceback,
never a silent "completed".

One Parquet data file of ``segments`` (or of ``files``) disappears under the Delta log (a
lifecycle rule, another tool's vacuum, an ``rm``). Then ``status``, ``export``, ``report``,
``plan``, ``maintain`` and ``run`` each say so in one line naming the table, the file and
``salmonn-pipeline maintain OUT --repair`` (exit 1, no traceback); ``maintain --repair`` drops the
references in a Delta repair (FSCK) commit and marks the files whose rows were lost
(``rows_lost``, retried), and the next ordinary run makes the index whole: every window x task
of every file exactly once.

The fast tests use the operator tools' two-run fixture (no Ray, no model; the refill is the
commit the next run makes); the slow ones run the real pipeline (local Ray, the tiny model, one
task) on a local folder and on the moto S3 server, with the CLI in subprocesses.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.output import Committer, OutputStore
from pipelines.output.health import TableDamaged, check_tables, ensure_healthy, repair
from pipelines.output.maintenance import claim_maintenance, release_maintenance
from pipelines.planning import to_process
from schemas.vocabulary import RETRYABLE_ERRORS, ROWS_LOST, STATUS_PARTIAL
from tests import ops_fixtures as fx

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("salmonn-pipeline"))
EP06 = fx.PREFIX + "interviews/ep06.mp3"     # 5 windows, alone in the fixture's second segments data file


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``salmonn-pipeline ARGS`` in a subprocess (what an operator's terminal shows)."""
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def assert_one_line_error(p: subprocess.CompletedProcess, out: str, *names: str) -> str:
    """Exit 1, no traceback anywhere, and stderr's last line names ``names`` and the repair."""
    assert "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    assert p.returncode == 1, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    errors = [line for line in p.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, p.stderr
    for name in (*names, f"salmonn-pipeline maintain {out} --repair"):
        assert name in errors[0], (name, errors[0])
    return errors[0]


def data_file_of(store: OutputStore, name: str, uri: str) -> str:
    """The path (relative to the table) of the data file of table ``name`` holding only ``uri``'s
    rows (the Delta log's statistics say so)."""
    adds = pa.table(store.table(name).get_add_actions(flatten=True)).to_pylist()
    (path,) = [a["path"] for a in adds if a["min.uri"] == a["max.uri"] == uri]
    return path


def cells(store: OutputStore) -> collections.Counter:
    """(uri, segment_index, task) -> how many segments rows."""
    t = store.read_table("segments", columns=["uri", "segment_index", "task"])
    return collections.Counter(zip(t["uri"].to_pylist(), t["segment_index"].to_pylist(), t["task"].to_pylist()))


def expected_cells(store: OutputStore, tasks) -> collections.Counter:
    """One row per window x task of every file, as its files row says."""
    return collections.Counter({(r["uri"], i, task): 1 for r in store.read_table("files").to_pylist()
                                for i in range(r["n_segments"] or 0) for task in tasks})


def operations(store: OutputStore, name: str) -> list[tuple[str | None, str | None]]:
    """(Delta operation, salmonn_pipeline.operation) of table ``name``'s commits, newest first (read
    from the log objects: ``DeltaTable.history`` would stall an S3 server in this process)."""
    return [(i.get("operation"), i.get("salmonn_pipeline.operation")) for _, i in store.commit_infos(name)]


def refs_of(store: OutputStore) -> list[SimpleNamespace]:
    """The files of the files table as an unchanged listing returns them (uri, version)."""
    t = store.read_table("files", columns=["uri", "version"])
    return [SimpleNamespace(uri=u, version=v) for u, v in zip(t["uri"].to_pylist(), t["version"].to_pylist())]


def pending(store: OutputStore, refs, chash: str) -> list:
    """The listed files the next run processes (the plan's skip rule against ``files``)."""
    return to_process(store.read_table("files"), refs, chash)


# ---------------------------------------------------------------------------------------------
# Without Ray: the fixture's two runs
# ---------------------------------------------------------------------------------------------

def test_a_lost_segments_file_is_named_repaired_and_refilled(tmp_path):
    out = str(tmp_path / "out")
    store = fx.build_two_runs(out)
    before = {r["uri"]: r for r in store.read_table("files").to_pylist()}
    whole = cells(store)
    assert check_tables(store)[1].missing == ()
    lost = data_file_of(store, "segments", EP06)
    os.remove(store.path("segments", lost))

    damage = {d.table: d for d in check_tables(store)}
    assert damage["files"].missing == () and damage["segments"].missing == (lost,)
    assert damage["segments"].lost_rows == 15 and damage["segments"].referenced == 2
    with pytest.raises(TableDamaged) as e:
        store.read_table("segments")                   # every reader: the table, the file, the command
    assert "\n" not in str(e.value) and lost in str(e.value) and "table segments" in str(e.value)
    with pytest.raises(TableDamaged):
        ensure_healthy(store)
    assert pending(store, refs_of(store), fx.CHASH) == []   # the ledger alone would skip them all

    p = cli("status", out)
    assert_one_line_error(p, out, "table segments", lost, "1 of its 2 data files")
    assert p.stdout == ""
    for args in (["export", out, "--format", "txt", "--to", str(tmp_path / "txt")], ["report", out],
                 ["maintain", out]):
        assert_one_line_error(cli(*args), out, "table segments", lost)
    assert not (tmp_path / "txt").exists() or not any((tmp_path / "txt").rglob("*.txt"))

    p = cli("maintain", out, "--repair")
    assert p.returncode == 0 and "Traceback" not in p.stdout + p.stderr, p.stderr
    assert f"removed 1 reference(s) to missing data files ({lost}); 15 rows were in them" in p.stdout
    assert f"1 file(s) lost rows ({EP06}): marked {ROWS_LOST}" in p.stdout

    after = {r["uri"]: r for r in store.read_table("files").to_pylist()}
    marked = after.pop(EP06)
    assert (marked["status"], marked["error_type"]) == (STATUS_PARTIAL, ROWS_LOST) and ROWS_LOST in RETRYABLE_ERRORS
    assert "segments holds 0 of its 15 rows" in marked["error_message"] and "\n" not in marked["error_message"]
    assert {k: v for k, v in marked.items() if k not in ("status", "error_type", "error_message")} == {
        k: v for k, v in before.pop(EP06).items() if k not in ("status", "error_type", "error_message")}
    assert after == before                                          # nothing else touched
    assert cells(store) == collections.Counter({k: n for k, n in whole.items() if k[0] != EP06})
    # the history shows the repair: FSCK on segments, the marks on files
    assert operations(store, "segments")[0] == ("FSCK", "repair")
    assert ("WRITE", "repair: rows lost") in operations(store, "files")[:2]
    # the next run processes exactly the marked file again
    assert [r.uri for r in pending(store, refs_of(store), fx.CHASH)] == [EP06]
    assert check_tables(store)[1].missing == () and cli("status", out).returncode == 0
    assert repair(store).lines()[0].endswith("nothing to repair")

    # ... and its commit (what that run writes) makes the index whole again: each cell once
    run3 = "20260103T020000Z-cccccc"
    Committer(store, run3).commit(*fx.tables(run3, {"interviews/ep06.mp3": fx.RUN1_FILES["interviews/ep06.mp3"]},
                                             fx.T1, seed=9))
    assert cells(store) == whole == expected_cells(store, fx.TASKS)
    assert pending(store, refs_of(store), fx.CHASH) == []


def test_a_lost_files_file_makes_its_files_unknown_and_their_rows_are_replaced(tmp_path):
    out = str(tmp_path / "out")
    store = fx.build_two_runs(out)
    whole = cells(store)
    (lost,) = [p.rsplit("/", 1)[1] for p in store.data_files("files")]    # every files row is in it
    os.remove(store.path("files", lost))
    empty = tmp_path / "archive"
    empty.mkdir()

    assert_one_line_error(cli("status", out), out, "table files", lost, "(7 rows)")
    assert_one_line_error(cli("plan", str(empty), "--out", out, "--probe", "never"), out, "table files", lost)
    assert_one_line_error(cli("report", out), out, "table files", lost)

    p = cli("maintain", out, "--repair")
    assert p.returncode == 0 and "Traceback" not in p.stdout + p.stderr, p.stderr
    assert f"files: repair commit (version 4) removed 1 reference(s) to missing data files ({lost})" in p.stdout
    assert "unknown again: the next run processes them (their 39 surviving segment rows, of 5 files" in p.stdout
    assert operations(store, "files")[0] == ("FSCK", "repair")
    assert store.read_table("files").num_rows == 0 and cells(store) == whole   # the orphans wait for their files
    assert "(39 segment rows of 5 files that files does not know wait for the next run" in repair(store).lines()[0]

    # the next run processes every file again (none is known); its commits replace the orphans
    run3 = "20260103T020000Z-cccccc"
    c = Committer(store, run3)
    files = {**fx.RUN1_FILES, **fx.RUN2_FILES}
    c.commit(*fx.tables(run3, dict(list(files.items())[:4]), fx.T1, seed=5))
    c.commit(*fx.tables(run3, dict(list(files.items())[4:]), fx.T1, seed=6))
    assert cells(store) == expected_cells(store, fx.TASKS) and set(cells(store).values()) == {1}
    assert store.read_table("files").num_rows == 7 and ensure_healthy(store) is None


def test_run_repair_takes_the_lease_and_spares_worker_crash_files(tmp_path):
    """ensure_healthy(repair=True) (a run with --repair) repairs under the compaction lease; a
    repair refuses while another process holds it; worker_crash files (windows without rows by
    nature) are not taken for lost rows unless a lost data file's id range covers them."""
    out = str(tmp_path / "out")
    store = fx.build_two_runs(out)
    lost = data_file_of(store, "segments", EP06)
    os.remove(store.path("segments", lost))
    assert claim_maintenance(OutputStore(out), "maintain on host-b (pid 7)") is None
    with pytest.raises(Exception, match="maintain on host-b"):
        ensure_healthy(store, repair=True)
    assert check_tables(store)[1].missing == (lost,)               # nothing changed
    release_maintenance(OutputStore(out), "maintain on host-b (pid 7)")
    report = ensure_healthy(store, repair=True)
    assert report is not None and [f.uri for f in report.marked] == [EP06]
    assert report.removed == {"segments": (lost,)} and ensure_healthy(store) is None

    # a worker_crash file with windows that never had rows: complete as far as anyone knows
    run3 = "20260103T020000Z-cccccc"
    f, s, entries = fx.tables(run3, {"crash.mp3": ("partial", "worker_crash", 90.0, "mp3", "mp3")}, fx.T1)
    s = s.filter(pa.compute.not_equal(s["segment_index"], 1))    # window 1 killed its worker
    Committer(store, run3).commit(f, s, entries)
    assert repair(store).lines()[0].endswith("nothing to repair")


# ---------------------------------------------------------------------------------------------
# The real pipeline: local folder and moto S3
# ---------------------------------------------------------------------------------------------

SR = 16000
WINDOW_S = 2.0


def _archive(path: Path) -> dict[str, int]:
    """Four short clips; name -> windows."""
    from pipelines.synth import noise, tone, write_audio

    path.mkdir(parents=True, exist_ok=True)
    seconds = {"a.flac": 3.0, "b.wav": 2.5, "c.flac": 4.5, "d.wav": 1.5}
    for i, (name, s) in enumerate(seconds.items()):
        sig = tone(200.0 + 37 * i, s, SR) if i % 2 else noise(s, SR, seed=i)
        write_audio(path / name, sig, SR, "flac" if name.endswith(".flac") else "wav")
    return {name: -(-int(s * 10) // int(WINDOW_S * 10)) for name, s in seconds.items()}


def _run_args(inp: str, out: str, options: list[str]) -> list[str]:
    return ["run", inp, "--out", out, "--tasks", "transcribe", "--max-new-tokens", "2", "--window-s", str(WINDOW_S),
            "--speech-gate", "off", "--batch-size", "4", "--num-cpus", "2", "--no-progress", "--flush-files", "1",
            "--flush-seconds", "0", *options]


def _cfg(inp: str, out: str, so: dict, out_so: dict | None, **kw):
    from pipelines.config import PipelineConfig
    from pipelines.decode import DecodeOptions
    from salmonn import builtin_task

    t = builtin_task("transcribe")
    task = dataclasses.replace(t, settings=dataclasses.replace(t.settings, max_new_tokens=2))
    return PipelineConfig(input=inp, out=out, tasks=(task,), decode=DecodeOptions(window_s=WINDOW_S),
                          speech_gate=False, progress=False, batch_size=4, flush_files=1, flush_seconds=0.0,
                          storage_options=so, out_storage_options=out_so, **kw)


def _lose_and_refill(inp: str, out: str, so: dict, out_so: dict | None, options: list[str], delete) -> None:
    """The issue's scenarios on one OUT: run; lose a data file of segments (status, run refuse;
    maintain --repair; an ordinary run refills); then one of files (the same)."""
    from pipelines.run import run_pipeline

    store = OutputStore(out, out_so if out_so is not None else so)
    # first run, compaction held off (the lease taken by "another process"), so that its commits'
    # rows stay in data files of their own (--flush-files 1) and one of them can be lost
    assert claim_maintenance(store, "test") is None
    first = run_pipeline(_cfg(inp, out, so, out_so))
    release_maintenance(store, "test")
    assert (first.processed, first.ok) == (4, 4)
    whole = cells(store)
    assert whole == expected_cells(store, ["transcribe"]) and len(store.data_files("segments")) >= 2

    # 1) a data file of segments goes: the first commit's
    path = store.data_files("segments")[0]
    with store.fs.open(path, "rb") as f:
        gone = sorted(set(pq.read_table(f, columns=["uri"])["uri"].to_pylist()))    # whose rows it holds
    assert 0 < len(gone) < 4
    lost = path.rsplit("/", 1)[1]
    delete("segments", lost)
    t0 = time.monotonic()
    damage = check_tables(store)
    check_s = time.monotonic() - t0
    assert [d.missing for d in damage] == [(), (lost,)] and check_s < 5, check_s
    assert_one_line_error(cli("status", out, *options), out, "table segments", lost)
    p = cli(*_run_args(inp, out, options))
    assert "completed" not in p.stdout, "a run over a broken table must not say completed"
    assert_one_line_error(p, out, "table segments", lost)
    assert check_tables(store)[1].missing == (lost,)               # nothing written
    p = cli("maintain", out, "--repair", *options)
    assert p.returncode == 0 and "Traceback" not in p.stdout + p.stderr, p.stderr
    assert f"{len(gone)} file(s) lost rows ({', '.join(gone)}): marked {ROWS_LOST}" in p.stdout
    assert operations(store, "segments")[:3].count(("FSCK", "repair")) == 1
    second = run_pipeline(_cfg(inp, out, so, out_so))               # the nightly command, unchanged
    assert (second.processed, second.skipped, second.ok) == (len(gone), 4 - len(gone), len(gone))
    assert cells(store) == whole                                     # every window x task, once

    # 2) a data file of files goes (after the run's compaction: every files row is in it)
    (lost,) = [p.rsplit("/", 1)[1] for p in store.data_files("files")]
    delete("files", lost)
    assert_one_line_error(cli("status", out, *options), out, "table files", lost)
    p = cli(*_run_args(inp, out, options))
    assert "completed" not in p.stdout
    assert_one_line_error(p, out, "table files", lost)
    p = cli("maintain", out, "--repair", *options)
    assert p.returncode == 0 and "Traceback" not in p.stdout + p.stderr, p.stderr
    assert "unknown again: the next run processes them" in p.stdout
    assert operations(store, "files")[:3].count(("FSCK", "repair")) == 1
    third = run_pipeline(_cfg(inp, out, so, out_so))
    assert (third.processed, third.skipped, third.ok) == (4, 0, 4)
    assert cells(store) == whole == expected_cells(store, ["transcribe"])
    assert cli("status", out, *options).returncode == 0


@pytest.mark.slow
def test_local_output_loses_a_data_file_of_each_table(tmp_path, ray_local):
    windows = _archive(tmp_path / "audio")
    assert sum(windows.values()) == 2 + 2 + 3 + 1
    out = tmp_path / "out"

    def delete(name: str, rel: str) -> None:
        os.remove(out / name / rel)                                  # a careless rm

    _lose_and_refill(str(tmp_path / "audio"), str(out), {}, None, [], delete)

    # a run with --repair repairs and refills in one go
    from pipelines.run import run_pipeline

    store = OutputStore(str(out))
    whole = cells(store)
    rel = store.data_files("segments")[0].rsplit("/", 1)[1]
    delete("segments", rel)                                          # every segments row is in it (compacted)
    summary = run_pipeline(_cfg(str(tmp_path / "audio"), str(out), {}, None, repair=True))
    assert (summary.processed, summary.ok) == (4, 4)
    assert cells(store) == whole and operations(store, "segments").count(("FSCK", "repair")) == 2


@pytest.mark.slow
def test_s3_output_loses_a_data_file_of_each_table(tmp_path, s3_server, s3_storage_options, ray_local):
    fs = s3_server.s3fs()
    _archive(tmp_path / "audio")
    fs.mkdir("arch")
    for p in sorted((tmp_path / "audio").iterdir()):
        fs.pipe_file(f"arch/{p.name}", p.read_bytes())
    fs.mkdir("index")
    out = "s3://index/out"
    so = s3_storage_options
    options = ["--storage-option", f"client_kwargs.endpoint_url={so['client_kwargs']['endpoint_url']}",
               "--storage-option", f"key={so['key']}", "--storage-option", f"secret={so['secret']}"]

    def delete(name: str, rel: str) -> None:
        s3_server.s3fs().rm(f"index/out/{name}/{rel}")            # a lifecycle rule, another tool's vacuum

    _lose_and_refill("s3://arch/", out, so, so, options, delete)
