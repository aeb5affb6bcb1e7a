"""The CLI with ``--engine vllm`` against ``--engine hf``: the same rows, from the same archive.

Runs in ``.venv-vllm`` (vLLM's CPU build; ``bash scripts/make_vllm_venv.sh``), on the tiny preset
in fp32, where greedy vLLM from prompt embeddings gives HF's tokens exactly (shared/VLLM_NOTES.md):

* windows of different lengths, the speech gate on (real voices, music, silence), and the three
  built-in tasks at LoRA scales 4.0, 2.0 and 0 in one run: every row's text, token count and
  finish reason equal (token ids are compared per request in tests/test_vllm_engine.py; the
  tables hold the decoded text and the count);
* an hour-long file beside a broken and a silent one, the driver SIGKILLed while the hour-long
  file is in flight: the resumed vLLM run ends with every row once and the HF run's tables.

In the main venv (no vLLM) the module is skipped with that reason.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: run in .venv-vllm (bash scripts/make_vllm_venv.sh)")

from pipelines import faults, voices  # noqa: E402
from pipelines.output import OutputStore  # noqa: E402
from pipelines.synth import music_like, silence, speech_like, write_audio  # noqa: E402
from tests.driver_kill import CLI, kill_driver_when  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# vLLM's CPU build with the product's own settings (the engine core in the actor's process, the KV
# cache sized by salmonn.engines.memory): none of vLLM's memory variables; no hub.
ENV = {**{k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")},
       "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
MIXED = ["--task-setting", "caption.lora_scale=4.0", "--task-setting", "transcribe.lora_scale=2.0",
         "--task-setting", "emotion.lora_scale=0"]


def run_cli(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, "run", *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def rows(out: Path) -> tuple[list[tuple], list[tuple]]:
    """The files and segments rows that do not depend on the run (ids, times, run id), sorted."""
    store = OutputStore(str(out))
    files = sorted((Path(r["uri"]).name, r["status"], r["error_type"], r["n_segments"], r["duration_s"], r["speech_s"])
                   for r in store.read_table("files").to_pylist())
    segs = sorted((Path(r["uri"]).name, r["segment_index"], r["task"], r["start_s"], r["end_s"], r["text"],
                   r["n_output_tokens"], r["finish_reason"], r["lora_scale"], r["label"], r["speech_ratio"])
                  for r in store.read_table("segments").to_pylist())
    return files, segs


@pytest.fixture(scope="module")
def mixed_archive(tmp_path_factory) -> Path:
    """Talk in three lengths (47 s: a full and a partial window; 7 s; 0.6 s), music, digital
    silence and a broken file."""
    d = tmp_path_factory.mktemp("vllm-archive")
    talk, _ = voices.talk(47.0, seed=4)
    write_audio(d / "talk47.flac", talk[None], 16000, "flac")
    write_audio(d / "talk7.mp3", voices.talk(7.0, seed=5)[0][None], 16000, "mp3")
    write_audio(d / "word.wav", voices.announcement("Rear_Left")[None][:, :9600], 16000, "wav")
    write_audio(d / "music.m4a", music_like(40.0, 44100, channels=2), 44100, "m4a")
    write_audio(d / "quiet.opus", silence(12.0, 48000), 48000, "opus")
    (d / "broken.mp3").write_bytes(b"ID3 not an mp3" * 200)
    return d


def test_vllm_rows_equal_hf_rows_mixed_lora_scales_speech_gate_on(mixed_archive, tmp_path):
    common = [str(mixed_archive), "--max-new-tokens", "12", "--no-progress", "--num-cpus", "2", *MIXED]
    run_cli([*common, "--out", str(tmp_path / "hf"), "--engine", "hf"])
    done = run_cli([*common, "--out", str(tmp_path / "vllm"), "--engine", "vllm"])
    assert "completed" in done.stdout
    hf_files, hf_segs = rows(tmp_path / "hf")
    vl_files, vl_segs = rows(tmp_path / "vllm")
    assert vl_files == hf_files
    assert len(vl_segs) == len(hf_segs) and vl_segs == hf_segs
    # what the comparison covers: every scale, generated and gated rows, both finish reasons' counts
    assert {s[8] for s in vl_segs} == {4.0, 2.0, 0.0}
    generated = [s for s in vl_segs if s[7] in ("stop", "length")]
    assert {s[2] for s in generated} == {"caption", "transcribe", "emotion"}
    assert any(s[7] == "no_speech" for s in vl_segs) and any(s[7] == "silence" for s in vl_segs)
    assert len({s[4] - s[3] for s in generated}) >= 3                       # windows of different lengths
    # the run record says which engine ran
    store = OutputStore(str(tmp_path / "vllm"))
    (run_id,) = store.list_runs()
    assert store.read_run(run_id).resources["engine"] == "vllm"


@pytest.fixture(scope="module")
def long_archive(tmp_path_factory) -> tuple[Path, float]:
    """A one-hour MP3 (a 47 s chunk of talk-like audio and pause, muxed 77 times), a silent
    file, a short one and a broken one (named so that they are listed, and decoded, first)."""
    d = tmp_path_factory.mktemp("vllm-long")
    chunk = np.concatenate([speech_like(38.0, 16000, seed=3), silence(9.0, 16000)], axis=1)
    write_audio(d / "z_one_hour.mp3", chunk, 16000, "mp3", bit_rate=16000, repeats=77,
                muxer_options={"write_xing": "0"})
    write_audio(d / "a_silent.wav", silence(60.0, 16000), 16000, "wav")
    write_audio(d / "a_short.flac", speech_like(20.0, 16000, seed=1), 16000, "flac")
    (d / "a_broken.mp3").write_bytes(b"ID3 not an mp3" * 200)
    return d, 77 * 47.0


def _committed(out: Path) -> set[str]:
    try:
        return {Path(u).name for u in OutputStore(str(out)).read_table("files")["uri"].to_pylist()}
    except Exception:  # noqa: BLE001 - not written yet, or mid-commit
        return set()


def test_vllm_hour_long_file_resumes_after_sigkill_to_the_hf_rows(long_archive, tmp_path):
    audio, seconds = long_archive
    args = [str(audio), "--tasks", "transcribe", "--max-new-tokens", "2", "--no-progress", "--num-cpus", "2",
            "--flush-files", "1", "--flush-seconds", "0", "--speech-gate", "off"]
    run_cli([*args, "--out", str(tmp_path / "hf"), "--engine", "hf"])
    out = tmp_path / "vllm"
    cmd = [*CLI, "run", *args, "--out", str(out), "--engine", "vllm"]
    # The tiny model is quick: the hour-long file's windows are slowed down (0.3 s each, the fault
    # hook's sleep: 36 s for the file) so that the kill lands while it is in flight. (Results
    # reach the driver one inference task at a time, and a task holds many batches, so the short
    # files may or may not be committed by then.)
    slow = {**ENV, faults.ENV: json.dumps([{"stage": "infer", "uri_contains": "one_hour", "sleep_s": 0.3}])}
    kill_driver_when(cmd, lambda: bool(list(out.glob("_runs/*/run.json"))), env=slow, timeout_s=300,
                     what="the run started", after_s=15)
    assert "z_one_hour.mp3" not in _committed(out), "the kill landed after the hour-long file was committed"
    done = run_cli([*args, "--out", str(out), "--engine", "vllm"])
    assert "(resumed)" in done.stdout
    store = OutputStore(str(out))
    (run_id,) = store.list_runs()
    assert store.read_run(run_id).status == "completed"
    files, segs = rows(out)
    assert (files, segs) == rows(tmp_path / "hf")
    hour = next(f for f in files if f[0] == "z_one_hour.mp3")
    assert hour[1] == "ok" and hour[3] == math.ceil(hour[4] / 30.0) and hour[4] >= seconds
    # exactly once: one row per (file, window, task)
    keys = [(s[0], s[1], s[2]) for s in segs]
    assert len(keys) == len(set(keys)) == sum(f[3] or 0 for f in files)


def test_engine_throughput_benchmark_prints_its_ratio():
    """benchmarks/engine_throughput.py with vLLM installed: both engines generate the same tokens and
    the last line is the vLLM / HF ratio (gpu_session.sh runs it on a GPU at 13B and 7B)."""
    import re
    import sys

    from tests.test_benchmarks_smoke import FINAL_LINES

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "engine_throughput.py"), "--smoke"], env=ENV,
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.match(FINAL_LINES["engine_throughput.py"], last) and "vllm / hf" in last, last
