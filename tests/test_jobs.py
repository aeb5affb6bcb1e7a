"""The nightly schedule files name the same entrypoint and runtime env as the job files."""

from __future__ import annotations

import pathlib
import re
import shlex

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
NIGHTLY = ROOT / "jobs" / "nightly"
ENTRYPOINT = "python -m jobs.index_archive"


def runtime_env() -> dict:
    return yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())


def check_job_spec(spec: dict) -> None:
    assert spec["entrypoint"].startswith(ENTRYPOINT + " "), spec["entrypoint"]
    argv = shlex.split(spec["entrypoint"])
    assert "--out" in argv
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    working_dir = env.pop("working_dir")
    assert working_dir.startswith("/")
    assert env == runtime_env()
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["rayVersion"] == "2.60.0"


def test_runtime_env_is_plain_and_secret_free():
    env = runtime_env()
    assert set(env) <= {"env_vars", "excludes", "pip", "working_dir", "py_modules"}
    assert ".venv" in env["excludes"]
    text = (ROOT / "jobs" / "runtime_env.yaml").read_text().lower()
    assert not re.search(r"(secret|access_key|token)\s*:", text)


def test_rayjob_manifest():
    doc = yaml.safe_load((NIGHTLY / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    check_job_spec(doc["spec"])
    gpu_groups = [g for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, "a GPU worker group runs SALMONN"


def test_raycronjob_manifest():
    doc = yaml.safe_load((NIGHTLY / "raycronjob.yaml").read_text())
    assert doc["kind"] == "RayCronJob"
    assert len(doc["spec"]["schedule"].split()) == 5
    check_job_spec(doc["spec"]["jobTemplate"])
    rayjob = yaml.safe_load((NIGHTLY / "rayjob.yaml").read_text())
    assert doc["spec"]["jobTemplate"]["entrypoint"] == rayjob["spec"]["entrypoint"]


def test_cronjob_creates_the_rayjob_once_per_day():
    doc = yaml.safe_load((NIGHTLY / "cronjob.yaml").read_text())
    assert doc["apiVersion"] == "batch/v1" and doc["kind"] == "CronJob"
    assert doc["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(doc["spec"]["schedule"].split()) == 5
    args = " ".join(doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "rayjob.yaml" in args and "kubectl create" in args and "date" in args


def test_crontab_and_wrapper_use_the_job_files():
    lines = [ln for ln in (NIGHTLY / "crontab").read_text().splitlines() if ln and not ln.startswith("#")]
    entries = [ln for ln in lines if not re.match(r"^[A-Z_]+=", ln)]
    assert len(entries) == 1 and len(entries[0].split()[:5]) == 5
    assert "submit_nightly.sh" in entries[0]
    wrapper = (NIGHTLY / "submit_nightly.sh").read_text()
    assert "--runtime-env jobs/runtime_env.yaml" in wrapper
    assert ENTRYPOINT in wrapper and "--submission-id" in wrapper


def test_entrypoint_help_lists_run_options(capsys):
    from jobs import index_archive

    try:
        index_archive.main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--tasks", "--prompt", "--model", "--lora-scale", "--resume", "--fresh"):
        assert flag in out
