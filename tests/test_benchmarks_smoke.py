"""Each benchmark of benchmarks/ runs end to end at tiny sizes (``--smoke``) and ends with its ratio line.

The figures themselves are not checked here (they depend on the machine); see benchmarks/README.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script -> the pattern its last line must match
FINAL_LINES = {
    "long_file_memory.py": r"^long_file_memory: peak RSS \S+/\S+ = \d+\.\d+x .*\(goal <= 1\.2x\)$",
    "pipeline_overlap.py": r"^pipeline_overlap: slowest stage alone \(\w+\) / end-to-end = \d+\.\d+ "
                           r".*\(goal >= 0\.8\)$",
    "multitask.py": r"^multitask: 3 tasks / 1 task = \d+\.\d+x the 1-task time \(goal <= 2\.2x\); "
                    r"encoder share of the 1-task time \d+%$",
    "gpu_throughput.py": r"^gpu_throughput: smoke run, .*best / official-style loop = \d+\.\d+x .*\(goal >= 20x.*\)$",
    "commit_scale.py": r"^commit_scale: reprocessing 100 of 500 files: every 32 files \d+\.\d+ s / spaced \d+\.\d+ s "
                       r"= \d+\.\d+x wall; committing .* = \d+\.\dx$",
    "content_hash.py": r"^content_hash: sha256 / read of a [\d.]+ GiB file = \d+\.\d+x warm \(.*\)(; \d+\.\d+x cold "
                       r"\(.*\))?$",
    "timed_text.py": r"^timed_text: CPU, tiny random model: not a GPU figure; separate Whisper pass / timed text "
                     r"on the shared encoder output = \d+\.\d\dx at batch \d+ \(.*\); encoder pass \d+\.\d ms/window, "
                     r"timed text \d+\.\d ms/window = \d+% of SALMONN's encode$",
    "search_scale.py": r"^search_scale: [\d,]+ windows: DuckDB ILIKE \d+ ms / index phrase p50 \d+\.\d+ ms = \d+x; "
                       r"full build \d+\.\d s / one night's update \d+\.\d\d s = \d+\.\dx$",
    # in the main venv vLLM is absent: the HF half runs and the line says skipped; in .venv-vllm
    # (tests/test_vllm_engine.py) the ratio line
    "engine_throughput.py": r"^engine_throughput: (skipped, vLLM is not installed here \(CPU, tiny random model: "
                            r"no goal; hf [\d,]+ tokens/s|CPU, tiny random model: no goal; tiny, batch 3 x 3 tasks: "
                            r"vllm / hf = \d+\.\d+x generated tokens/s)",
}


def run_script(name: str, *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{name} printed nothing"
    return lines[-1]


# gpu_session.sh's dry run runs these two with --smoke (twice each) and checks the same last lines
# (it runs timed_text.py --smoke too, which is also tested on its own below: it is quick)
IN_GPU_SESSION = ("gpu_throughput.py", "engine_throughput.py")


# pipeline_overlap's smoke run starts a local Ray and runs the pipeline end to end (~25 s): slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "pipeline_overlap.py" else n
                                  for n in sorted(FINAL_LINES) if n not in IN_GPU_SESSION])
def test_benchmark_smoke(name, tmp_path):
    extra = (["--dir", str(tmp_path)] if name in ("long_file_memory.py", "pipeline_overlap.py", "commit_scale.py",
                                                  "search_scale.py") else [])
    last = run_script(name, "--smoke", *extra)
    assert re.match(FINAL_LINES[name], last), f"unexpected final line of {name}: {last!r}"


def test_gpu_throughput_skips_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full benchmark would run")
    last = run_script("gpu_throughput.py")
    assert last.startswith("gpu_throughput: skipped, no GPU"), last


# five benchmark processes (gpu_throughput and engine_throughput for two models, then timed_text),
# each importing torch and building tiny models (~50 s): slow
@pytest.mark.slow
def test_gpu_session_script_dry_run(tmp_path):
    """benchmarks/gpu_session.sh, the prepared command for a lent GPU machine, runs both models'
    benchmarks under their limits, then timed text, and leaves one log per run in $OUT (--smoke:
    the CPU dry run)."""
    import os

    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine_13b.txt", "engine_7b.txt", "gpu_13b.txt",
                                                          "gpu_7b.txt", "nvidia-smi.txt", "timed_text.txt",
                                                          "versions.txt"]
    for log in ("gpu_13b.txt", "gpu_7b.txt"):
        last = (tmp_path / log).read_text().strip().splitlines()[-1]
        assert re.match(FINAL_LINES["gpu_throughput.py"], last), last
    for log in ("engine_13b.txt", "engine_7b.txt"):
        last = (tmp_path / log).read_text().strip().splitlines()[-1]
        assert re.match(FINAL_LINES["engine_throughput.py"], last), last
    last = (tmp_path / "timed_text.txt").read_text().strip().splitlines()[-1]
    assert re.match(FINAL_LINES["timed_text.py"], last), last
    assert "torch" in (tmp_path / "versions.txt").read_text()
