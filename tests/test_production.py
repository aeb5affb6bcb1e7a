"""Production runs: incremental, resume after SIGKILL, crashing workers, a flaky S3, Ray Jobs,
and secrets kept out of outputs and logs (issue: production runs)."""

from __future__ import annotations

import collections
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipelines.decode import DecodeOptions
from pipelines.output import OutputStore, committed_seq
from pipelines.run import PipelineConfig, run_pipeline
from pipelines.synth import noise, speech_like, tone, write_audio
from schemas.vocabulary import RUN_COMPLETED, RUN_RUNNING
from tests.driver_kill import CLI, kill_driver_when
from tests.faulty_proxy import FaultyProxy

ROOT = Path(__file__).resolve().parents[1]


def make_clips(directory: Path, n: int, seconds: float = 3.0, fmt: str = "flac", start: int = 0) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        sig = [tone(200.0 + 30 * i, seconds, 16000), noise(seconds, 16000), speech_like(seconds, 16000, seed=i)][i % 3]
        p = directory / f"clip{i:02d}.{fmt}"
        write_audio(p, sig, 16000, fmt)
        paths.append(p)
    return paths


def segment_keys(store: OutputStore) -> list[tuple[str, int, str]]:
    segs = store.read_table("segments")
    return list(zip(segs["file_id"].to_pylist(), segs["segment_index"].to_pylist(), segs["task"].to_pylist()))


def assert_exactly_once(store: OutputStore, n_files: int, n_tasks: int = 3) -> None:
    files = store.read_table("files")
    assert sorted(collections.Counter(files["file_id"].to_pylist()).values()) == [1] * n_files
    keys = segment_keys(store)
    assert len(keys) == len(set(keys)), "a (file, segment, task) row is duplicated"
    expected = sum(r["n_segments"] for r in files.to_pylist()) * n_tasks
    assert len(keys) == expected, "a (file, segment, task) row is missing"


def test_incremental_runs(tmp_path, ray_local):
    audio, out = tmp_path / "audio", tmp_path / "out"
    clips = make_clips(audio, 12)
    cfg = PipelineConfig(input=str(audio), out=str(out), progress=False, decode=DecodeOptions(window_s=2.0))
    first = run_pipeline(cfg)
    assert (first.processed, first.skipped, first.ok) == (12, 0, 12)

    again = run_pipeline(cfg)
    assert again.run_id != first.run_id and not again.resumed
    assert (again.processed, again.skipped, again.n_commits) == (0, 12, 0)
    assert again.wall_s < 10, "a no-op run only lists and reads the manifest"

    # change one file (new content: size and mtime change) and add one
    time.sleep(0.01)
    write_audio(clips[4], tone(880.0, 5.0, 16000), 16000, "flac")
    make_clips(audio, 1, start=12)
    third = run_pipeline(cfg)
    assert (third.processed, third.skipped) == (2, 11)

    store = OutputStore(str(out))
    # rows each run wrote (the first run's as of its last commit, through Delta's time travel):
    # 12 + the changed one again + the new one
    written = [store.read_run_rows("files", run).num_rows for run in (first.run_id, third.run_id)]
    assert written == [12, 2]
    latest = store.read_table("files")    # the table holds each file's latest result only
    assert latest.num_rows == 13 and len(set(latest["file_id"].to_pylist())) == 13
    changed = [r for r in latest.to_pylist() if r["uri"].endswith("clip04.flac")][0]
    assert changed["run_id"] == third.run_id and changed["duration_s"] == pytest.approx(5.0, abs=0.03)
    latest_segs = [r for r in store.read_table("segments").to_pylist()
                   if r["uri"].endswith("clip04.flac")]
    assert {r["run_id"] for r in latest_segs} == {third.run_id}
    assert len(latest_segs) == 3 * 3   # 5 s in 2 s windows x 3 tasks: only the new rows


@pytest.mark.slow
def test_resume_after_sigkill_of_the_driver(tmp_path):
    audio, out = tmp_path / "audio", tmp_path / "out"
    make_clips(audio, 10, seconds=4.0)
    cmd = [*CLI, "run", str(audio), "--out", str(out), "--window-s", "2", "--flush-files", "1",
           "--flush-seconds", "0", "--num-cpus", "2", "--no-progress", "--batch-size", "2"]
    # slow inference down so that the kill lands mid-run, after the first commits
    env = {**os.environ, "SALMONN_PIPELINE_FAULTS": json.dumps([{"stage": "infer", "sleep_s": 0.4}])}
    # the files table's version 0 creates it; version 1 is the first complete commit
    first_commit = str(out / "files" / "_delta_log" / f"{1:020d}.json")
    kill_driver_when(cmd, lambda: bool(glob.glob(first_commit)), env=env, timeout_s=240,
                     what="its first commit", poll_s=0.2)
    store = OutputStore(str(out))
    (run_id,) = store.list_runs()
    assert store.read_run(run_id).status == RUN_RUNNING, "the kill landed after the run had finished"
    committed_before = set(store.read_table("files")["file_id"].to_pylist())
    assert 0 < len(committed_before) < 10
    assert 1 <= committed_seq(store, run_id) <= len(committed_before)

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(resumed)" in done.stdout
    rec = store.read_run(run_id)
    assert rec.status == RUN_COMPLETED and len(rec.resumes) == 1
    assert store.list_runs() == [run_id]
    assert_exactly_once(store, 10)
    # only the files not committed before the kill were processed again, or took the rows of the
    # same content (clip01, 04 and 07 are the same noise: one committed before the kill is the
    # others' source)
    assert rec.counts.processed + rec.counts.reused == 10 - len(committed_before)


def test_worker_crashes_are_survived(tmp_path, ray_local):
    audio, out = tmp_path / "audio", tmp_path / "out"
    make_clips(audio, 8, seconds=4.0)
    write_audio(audio / "poison.flac", tone(300.0, 3.0, 16000), 16000, "flac")
    markers = str(tmp_path / "markers")
    rules = [
        {"stage": "decode", "uri_contains": "clip02", "times": 1, "marker_dir": markers},
        {"stage": "infer", "uri_contains": "clip05", "times": 1, "marker_dir": markers},
        {"stage": "decode", "uri_contains": "poison", "times": -1},
    ]
    os.environ["SALMONN_PIPELINE_FAULTS"] = json.dumps(rules)
    try:
        summary = run_pipeline(PipelineConfig(input=str(audio), out=str(out), progress=False,
                                              decode=DecodeOptions(window_s=2.0), batch_size=2))
    finally:
        del os.environ["SALMONN_PIPELINE_FAULTS"]
    assert sorted(os.listdir(markers)) == sorted(os.listdir(markers))  # both one-shot faults fired:
    assert sorted(n.split("-")[0] for n in os.listdir(markers)) == ["decode", "infer"]
    assert summary.status == "completed"
    assert (summary.ok, summary.error) == (8, 1)
    store = OutputStore(str(out))
    files = {r["uri"].rsplit("/", 1)[-1]: r for r in store.read_table("files").to_pylist()}
    assert files["poison.flac"]["status"] == "error"
    assert files["poison.flac"]["error_type"] == "worker_crash"
    assert "died" in files["poison.flac"]["error_message"]
    assert all(files[f"clip{i:02d}.flac"]["status"] == "ok" for i in range(8))
    assert_exactly_once(store, 9)


@pytest.mark.slow
def test_flaky_s3_endpoint(tmp_path, s3_server, ray_local):
    local = tmp_path / "audio"
    make_clips(local, 6, seconds=3.0, fmt="mp3")
    fs = s3_server.s3fs()
    fs.mkdir("flaky")
    for p in sorted(local.iterdir()):
        fs.put_file(str(p), f"flaky/{p.name}")
    proxy = FaultyProxy(s3_server.endpoint_url, fail_every=2, max_failures=40, stall_every=7,
                        stall_s=3.0, max_stalls=3).start()
    try:
        opts = {**s3_server.storage_options, "client_kwargs": {"endpoint_url": proxy.endpoint_url},
                "config_kwargs": {"read_timeout": 1.5, "connect_timeout": 2}}
        summary = run_pipeline(PipelineConfig(input="s3://flaky/", out=str(tmp_path / "out"), progress=False,
                                              storage_options=opts, out_storage_options={},
                                              decode=DecodeOptions(window_s=2.0)))
    finally:
        proxy.stop()
    # a third or more of all requests were answered 503 or stalled past the read timeout
    assert proxy.failures >= 5 and proxy.stalls >= 1, (proxy.requests, proxy.failures, proxy.stalls)
    assert (summary.ok, summary.error) == (6, 0), summary.format()
    assert_exactly_once(OutputStore(str(tmp_path / "out")), 6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "ray start --head exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"the Ray dashboard did not open port {port} in {timeout} s")


@pytest.mark.slow
def test_ray_job_submit_on_a_local_cluster(tmp_path):
    audio, out = tmp_path / "audio", tmp_path / "out"
    make_clips(audio, 4, seconds=3.0)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port, dash, agent = _free_port(), _free_port(), _free_port()
    # the cluster's `python` is this environment's (as a cluster image would provide it)
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # `--block` keeps the head in this process group, so the test stops exactly this cluster
    # (`ray stop` would stop every Ray on the machine, the test session's own included).
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             "--include-dashboard=true", f"--dashboard-agent-listen-port={agent}",
                             "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        _wait_for_port(dash, head, timeout=180)
        deadline = time.time() + 120
        while True:  # the dashboard answers before its job agent is up: "No available agent"
            sub = subprocess.run(
                [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--submission-id", "nightly-test",
                 "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "jobs" / "runtime_env.yaml"), "--",
                 "python", "-m", "jobs.index_archive", str(audio), "--out", str(out), "--window-s", "2",
                 "--no-progress"],
                capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
            if "No available agent" not in sub.stdout + sub.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert sub.returncode == 0, sub.stdout[-4000:] + sub.stderr[-2000:]
        status = subprocess.run([ray_bin, "job", "status", "--address", f"http://127.0.0.1:{dash}", "nightly-test"],
                                capture_output=True, text=True, timeout=60, env=env)
        assert "succeeded" in (status.stdout + status.stderr).lower()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
    store = OutputStore(str(out))
    (run_id,) = store.list_runs()
    assert store.read_run(run_id).status == RUN_COMPLETED
    assert_exactly_once(store, 4)
    assert store.read_table("files")["status"].to_pylist() == ["ok"] * 4


SENTINEL = "SENTINEL-SECRET-d41d8cd98f00b204"


@pytest.mark.slow
def test_secret_never_written(tmp_path, s3_server):
    local = tmp_path / "audio"
    make_clips(local, 3, seconds=2.0)
    fs = s3_server.s3fs()
    fs.mkdir("private")
    for p in sorted(local.iterdir()):
        fs.put_file(str(p), f"private/{p.name}")
    fs.pipe_file("private/broken.mp3", b"not audio" * 100)
    out = tmp_path / "out"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # AF_UNIX socket paths are <= 107 bytes
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    cmd = [*CLI, "-v", "run", "s3://private/", "--out", str(out), "--num-cpus", "2", "--no-progress",
           "--storage-option", f"client_kwargs.endpoint_url={s3_server.endpoint_url}",
           "--storage-option", "key=testing", "--storage-option", f"secret={SENTINEL}",
           "--out-storage-option", "auto_mkdir=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = OutputStore(str(out))
    assert store.read_table("files").num_rows == 4
    assert SENTINEL not in proc.stdout + proc.stderr
    scanned = 0
    for root in (out, ray_tmp):
        for dirpath, _, names in os.walk(root):
            for name in names:
                p = Path(dirpath) / name
                if p.is_symlink() or not p.is_file():
                    continue
                scanned += 1
                assert SENTINEL.encode() not in p.read_bytes(), f"secret found in {p}"
    assert scanned > 10
    rec = store.read_run(store.list_runs()[0])
    assert rec.storage_options["secret"] == "***"
    shutil.rmtree(ray_tmp, ignore_errors=True)
