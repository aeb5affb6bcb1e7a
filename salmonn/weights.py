"""`salmonn-pipeline weights fetch|verify|convert`: the model's part files on disk.

A preset (``salmonn-13b``, ``salmonn-7b``) names four parts (:mod:`salmonn.config`): the Whisper
and LLM directories (hub repos) and two files, BEATs' ``.pt`` and SALMONN's ``.pth``. ``fetch``
downloads them into one directory laid out as a parts directory (``salmonn_parts.json``; usable as
``--model DIR`` or as ``$SALMONN_WEIGHTS_DIR``)::

    DIR/whisper-large-v2/...                           (config.json, *.safetensors)
    DIR/vicuna-13b-v1.1/...                            (config + tokenizer + weights)
    DIR/BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt
    DIR/salmonn_v1.pth
    DIR/salmonn_parts.json                             the parts directory spec
    DIR/salmonn_weights.json                           manifest: size + sha256 of every file

``verify`` checks every file's size against the official sizes known here (:data:`KNOWN_SIZES`)
and its hash against the hub's published metadata (LFS sha256, or the git blob id of small
files) when the hub is reachable, else against the manifest that ``fetch`` or ``verify --record``
wrote. A short file is reported as truncated, a file of another size or hash as the wrong file.
``convert`` turns the pickled official checkpoints into ``.safetensors`` (tensors only).

The hub is reached through ``huggingface_hub`` (its token, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``
settings apply). Without network access every command says so and what to do instead.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .config import BEATS_FILE, PARTS_FILE, SalmonnConfig

log = logging.getLogger(__name__)

__all__ = ["BEATS_FILE", "PARTS_FILE"]  # re-exported: the names of the files fetch writes

PARTS = ("whisper", "beats", "llm", "checkpoint")
MANIFEST = "salmonn_weights.json"

# Official sizes in bytes (the files published by the SALMONN and BEATs authors): a file of
# another size is not the official file.
KNOWN_SIZES: dict[str, int] = {
    "salmonn_v1.pth": 400_466_533,
    BEATS_FILE: 363_145_291,
}

# Where the single-file parts live on the hub: file name -> (repo id, repo type, path in repo,
# revision). BEATs is published by Microsoft outside the hub (unilm README links); the entry below
# is a public third-party mirror pinned to a revision, checked against the official size.
HUB_FILES: dict[str, tuple[str, str, str, str | None]] = {
    "salmonn_v1.pth": ("tsinghua-ee/SALMONN", "model", "salmonn_v1.pth", None),
    "salmonn_7b_v0.pth": ("tsinghua-ee/SALMONN-7B", "model", "salmonn_7b_v0.pth", None),
    BEATS_FILE: ("fffiloni/SALMONN-7B-gradio", "space", f"beats/{BEATS_FILE}",
                 "677c0125de736ab92751385e1e8664cd03c2ce0d"),
}
# Files taken from the directory parts (what salmonn.checkpoint reads); pickled weights only when
# the repo has no safetensors. Whisper's tokenizer (vocab.json, merges.txt, added_tokens.json,
# normalizer.json, tokenizer_config.json, special_tokens_map.json) and generation_config.json are
# for its decoder (salmonn.whisper_text: timed text).
DIR_PATTERNS: dict[str, tuple[str, ...]] = {
    "whisper": ("*.json", "*.safetensors", "merges.txt"),
    "llm": ("*.json", "*.safetensors", "tokenizer.model"),
}
PICKLE_FALLBACK = ("*.bin",)
DIR_EXCLUDE = ("*/*",)  # top-level files only (no onnx/, flax/ subfolders)

OK, UNVERIFIED, MISSING, TRUNCATED, WRONG = "ok", "unverified", "missing", "truncated", "wrong_file"
FAILURES = (MISSING, TRUNCATED, WRONG)


class WeightsError(RuntimeError):
    """A clear, user-facing failure (printed without a traceback by the CLI)."""


class HubUnavailable(WeightsError):
    """The hub cannot be reached (no network, HF_HUB_OFFLINE, DNS...)."""


# ---------------------------------------------------------------------------------------------
# Parts of a preset
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Part:
    name: str                       # whisper | beats | llm | checkpoint
    local: str                      # file or directory name under DIR
    repo_id: str
    repo_type: str = "model"
    filename: str | None = None     # file parts: path inside the repo; None for directory parts
    revision: str | None = None
    patterns: tuple[str, ...] = ()  # directory parts: which repo files

    @property
    def is_file(self) -> bool:
        return self.filename is not None


def parts_for(preset: str) -> list[Part]:
    """The hub sources of a preset's four parts (names from ``salmonn.config``)."""
    if preset == "tiny":
        raise WeightsError("the 'tiny' preset has random weights built in code: there is nothing to fetch")
    try:
        cfg = SalmonnConfig.from_name(preset)
    except ValueError as e:
        raise WeightsError(str(e)) from None
    parts = []
    for name, value in (("whisper", cfg.whisper_path), ("beats", cfg.beats_path), ("llm", cfg.llm_path),
                        ("checkpoint", cfg.checkpoint_path)):
        if not value:
            raise WeightsError(f"preset {preset!r} names no {name} part")
        if name in DIR_PATTERNS:
            parts.append(Part(name, Path(value).name, value, patterns=DIR_PATTERNS[name]))
        else:
            fname = Path(value).name
            if fname not in HUB_FILES:
                raise WeightsError(f"{name} file {fname!r}: no known hub location (HUB_FILES)")
            repo, rtype, path, rev = HUB_FILES[fname]
            parts.append(Part(name, fname, repo, rtype, filename=path, revision=rev))
    return parts


def parts_spec(preset: str, parts: Sequence[Part]) -> dict[str, str]:
    """The salmonn_parts.json of a fetched directory (read by salmonn.config.config_from_parts_dir)."""
    spec = {"preset": preset, "model_id": SalmonnConfig.from_name(preset).model_id}
    spec.update({p.name: p.local for p in parts})
    return spec


# ---------------------------------------------------------------------------------------------
# The hub
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RemoteFile:
    path: str                   # inside the repo
    size: int
    sha256: str | None          # LFS files: the published sha256
    git_oid: str | None         # small files: the git blob id (sha1 of "blob <size>\0" + content)


class Hub(Protocol):
    def list_files(self, repo_id: str, repo_type: str, revision: str | None) -> dict[str, RemoteFile]: ...

    def file_info(self, repo_id: str, repo_type: str, revision: str | None, path: str) -> RemoteFile: ...

    def download(self, repo_id: str, repo_type: str, revision: str | None, path: str, dest: Path) -> Path: ...


def _network_cause(err: BaseException) -> BaseException | None:
    """The network-level failure inside ``err``'s chain, if that is what it is."""
    import socket

    try:
        import httpx

        transport: tuple[type[BaseException], ...] = (httpx.TransportError,)
    except ImportError:  # pragma: no cover
        transport = ()
    from huggingface_hub import errors as hf_errors

    seen = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (hf_errors.OfflineModeIsEnabled, ConnectionError, socket.gaierror, TimeoutError,
                          *transport)):
            return e
        e = e.__cause__ or e.__context__
    return None


class HfHub:
    """:class:`Hub` on ``huggingface_hub``; failures become clear :class:`WeightsError` s."""

    def __init__(self, endpoint: str | None = None, token: str | None = None):
        from huggingface_hub import HfApi, constants

        self.endpoint = endpoint or constants.ENDPOINT
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self.token = token

    def _fail(self, err: Exception, what: str) -> WeightsError:
        from huggingface_hub import errors as hf_errors

        cause = _network_cause(err)
        if cause is not None:
            offline = isinstance(cause, hf_errors.OfflineModeIsEnabled)
            return HubUnavailable(
                f"cannot reach the model hub at {self.endpoint} for {what}"
                f" ({'HF_HUB_OFFLINE is set' if offline else f'{type(cause).__name__}: {cause}'}). "
                "This machine seems to have no network access to the hub. Fetch the weights on a "
                "machine that has (`salmonn-pipeline weights fetch PRESET --to DIR` also records a "
                f"manifest, {MANIFEST}), copy DIR here, and `weights verify PRESET DIR` checks it offline.")
        if isinstance(err, hf_errors.GatedRepoError):
            return WeightsError(f"{what}: the repository is gated; accept its terms on the hub and log in "
                                f"(`hf auth login` or HF_TOKEN): {err}")
        if isinstance(err, hf_errors.RepositoryNotFoundError):
            return WeightsError(f"{what}: repository not found on {self.endpoint}: {err}")
        if isinstance(err, (hf_errors.EntryNotFoundError, hf_errors.RemoteEntryNotFoundError)):
            return WeightsError(f"{what}: file not found in the repository: {err}")
        if isinstance(err, hf_errors.RevisionNotFoundError):
            return WeightsError(f"{what}: revision not found: {err}")
        return WeightsError(f"{what}: hub request failed: {type(err).__name__}: {err}")

    @staticmethod
    def _remote(entry: Any) -> RemoteFile:
        lfs = getattr(entry, "lfs", None)
        return RemoteFile(path=entry.path, size=int(entry.size),
                          sha256=getattr(lfs, "sha256", None) if lfs is not None else None,
                          git_oid=None if lfs is not None else getattr(entry, "blob_id", None))

    def list_files(self, repo_id: str, repo_type: str, revision: str | None) -> dict[str, RemoteFile]:
        # repo_info fails at once without network (list_repo_tree retries with backoff for ~25 s)
        try:
            info = self.api.repo_info(repo_id, repo_type=repo_type, revision=revision, files_metadata=True)
        except Exception as e:  # noqa: BLE001 - translated into a clear message
            raise self._fail(e, f"listing {repo_type} {repo_id}") from e
        out = {}
        for sib in getattr(info, "siblings", None) or []:
            lfs = sib.lfs
            out[sib.rfilename] = RemoteFile(path=sib.rfilename, size=int(sib.size or 0),
                                            sha256=lfs.sha256 if lfs is not None else None,
                                            git_oid=None if lfs is not None else sib.blob_id)
        return out

    def file_info(self, repo_id: str, repo_type: str, revision: str | None, path: str) -> RemoteFile:
        from huggingface_hub.hf_api import RepoFile

        try:
            infos = self.api.get_paths_info(repo_id, [path], repo_type=repo_type, revision=revision)
        except Exception as e:  # noqa: BLE001
            raise self._fail(e, f"{repo_type} {repo_id}/{path}") from e
        files = [i for i in infos if isinstance(i, RepoFile)]
        if not files:
            raise WeightsError(f"{repo_type} {repo_id}: no file {path!r}")
        return self._remote(files[0])

    def download(self, repo_id: str, repo_type: str, revision: str | None, path: str, dest: Path) -> Path:
        from huggingface_hub import hf_hub_download

        staging = dest.parent / f".download-{dest.name}"
        try:
            got = hf_hub_download(repo_id, path, repo_type=repo_type, revision=revision, local_dir=staging,
                                  endpoint=self.endpoint, token=self.token)
        except Exception as e:  # noqa: BLE001
            raise self._fail(e, f"downloading {repo_type} {repo_id}/{path}") from e
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, dest)
        shutil.rmtree(staging, ignore_errors=True)
        return dest


# ---------------------------------------------------------------------------------------------
# Hashes and the manifest
# ---------------------------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def git_blob_oid(path: Path) -> str:
    h = hashlib.sha1()
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(directory: Path) -> dict[str, Any] | None:
    p = directory / MANIFEST
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def write_manifest(directory: Path, preset: str, files: Mapping[str, Mapping[str, Any]], source: str) -> Path:
    p = directory / MANIFEST
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({
        "preset": preset, "recorded_at": dt.datetime.now(dt.UTC).isoformat(), "checked_against": source,
        "files": {k: dict(v) for k, v in sorted(files.items())},
    }, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, p)
    return p


# ---------------------------------------------------------------------------------------------
# Verify
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Expected:
    rel: str                        # path relative to DIR
    part: str
    size: int | None
    sha256: str | None = None
    git_oid: str | None = None
    source: str = ""                # hub | manifest | official size


@dataclasses.dataclass(frozen=True)
class FileCheck:
    rel: str
    part: str
    status: str                     # ok | unverified | missing | truncated | wrong_file
    message: str
    size: int | None = None
    sha256: str | None = None

    @property
    def failed(self) -> bool:
        return self.status in FAILURES


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)


def dir_files(part: Part, listing: Mapping[str, RemoteFile]) -> list[RemoteFile]:
    """The repo files a directory part needs (pickled weights only without safetensors)."""
    top = {p: f for p, f in listing.items() if not _matches(p, DIR_EXCLUDE)}
    chosen = [f for p, f in top.items() if _matches(p, part.patterns)]
    if not any(f.path.endswith(".safetensors") for f in chosen):
        chosen += [f for p, f in top.items() if _matches(p, PICKLE_FALLBACK)]
    return sorted(chosen, key=lambda f: f.path)


def expected_from_hub(parts: Sequence[Part], hub: Hub) -> list[Expected]:
    out = []
    for part in parts:
        if part.is_file:
            assert part.filename is not None  # is_file
            rf = hub.file_info(part.repo_id, part.repo_type, part.revision, part.filename)
            out.append(Expected(part.local, part.name, rf.size, rf.sha256, rf.git_oid, "hub"))
        else:
            for rf in dir_files(part, hub.list_files(part.repo_id, part.repo_type, part.revision)):
                out.append(Expected(f"{part.local}/{rf.path}", part.name, rf.size, rf.sha256, rf.git_oid, "hub"))
    return out


def expected_from_manifest(parts: Sequence[Part], manifest: Mapping[str, Any]) -> list[Expected]:
    prefixes = {p.local: p.name for p in parts}
    out = []
    for rel, meta in sorted(manifest.get("files", {}).items()):
        head = rel.split("/", 1)[0]
        if head in prefixes:
            out.append(Expected(rel, prefixes[head], meta.get("size"), meta.get("sha256"), None, "manifest"))
    return out


def check_file(directory: Path, exp: Expected, known_sizes: Mapping[str, int] | None = None) -> FileCheck:
    """One file against its expected size (official size first) and hash."""
    known_sizes = KNOWN_SIZES if known_sizes is None else known_sizes
    path = directory / exp.rel
    name = Path(exp.rel).name
    official = known_sizes.get(name) if "/" not in exp.rel else None
    want_size = official if official is not None else exp.size
    size_src = "official size" if official is not None else exp.source
    if not path.is_file():
        return FileCheck(exp.rel, exp.part, MISSING,
                         f"MISSING {exp.rel}: expected {_n(want_size)} bytes at {path}; "
                         f"run `salmonn-pipeline weights fetch` (or copy it there)")
    size = path.stat().st_size
    if want_size is not None and size < want_size:
        return FileCheck(exp.rel, exp.part, TRUNCATED,
                         f"TRUNCATED {exp.rel}: {_n(size)} bytes, expected {_n(want_size)} ({size_src}); only "
                         f"{size / want_size:.1%} of the file is there - an interrupted download or copy; "
                         f"fetch it again", size)
    if want_size is not None and size > want_size:
        return FileCheck(exp.rel, exp.part, WRONG,
                         f"WRONG FILE {exp.rel}: {_n(size)} bytes, expected {_n(want_size)} ({size_src}); "
                         f"this is not the official {name}", size)
    if official is not None and exp.size is not None and exp.size != official:
        log.warning("%s: the %s lists %s bytes, the official size is %s", exp.rel, exp.source, _n(exp.size),
                    _n(official))
    if exp.sha256:
        digest = sha256_of(path)
        if digest != exp.sha256:
            return FileCheck(exp.rel, exp.part, WRONG,
                             f"WRONG FILE {exp.rel}: sha256 {digest[:16]}... differs from the {exp.source}'s "
                             f"{exp.sha256[:16]}... (same size, different content: another file or corrupted); "
                             f"fetch it again", size, digest)
        return FileCheck(exp.rel, exp.part, OK, f"ok {exp.rel}: {_n(size)} bytes, sha256 matches the {exp.source}",
                         size, digest)
    if exp.git_oid:
        oid = git_blob_oid(path)
        if oid != exp.git_oid:
            return FileCheck(exp.rel, exp.part, WRONG,
                             f"WRONG FILE {exp.rel}: git blob id {oid[:12]}... differs from the hub's "
                             f"{exp.git_oid[:12]}...", size)
        return FileCheck(exp.rel, exp.part, OK, f"ok {exp.rel}: {_n(size)} bytes, git blob id matches the hub", size)
    if want_size is not None:
        return FileCheck(exp.rel, exp.part, UNVERIFIED,
                         f"size ok {exp.rel}: {_n(size)} bytes ({size_src}); sha256 NOT verified (no hub access and "
                         f"no {MANIFEST})", size)
    return FileCheck(exp.rel, exp.part, UNVERIFIED, f"present {exp.rel}: {_n(size)} bytes; NOT verified", size)


def _n(x: int | None) -> str:
    return "?" if x is None else f"{x:,}"


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    checks: tuple[FileCheck, ...]
    reference: str                  # what the files were checked against
    note: str = ""

    @property
    def ok(self) -> bool:
        return not any(c.failed for c in self.checks)

    def format(self) -> str:
        lines = [f"checked against: {self.reference}"] + ([self.note] if self.note else [])
        lines += [c.message for c in self.checks]
        bad = [c for c in self.checks if c.failed]
        unver = [c for c in self.checks if c.status == UNVERIFIED]
        lines.append(f"{len(self.checks) - len(bad)} of {len(self.checks)} files ok"
                     + (f", {len(bad)} FAILED" if bad else "")
                     + (f" ({len(unver)} by size only or presence: not hash-verified)" if unver else ""))
        return "\n".join(lines)


def _offline_expected(parts: Sequence[Part], directory: Path) -> list[Expected]:
    """Without hub or manifest: the file parts (official sizes where known) and the directories'
    local files (presence only)."""
    out = []
    for part in parts:
        if part.is_file:
            out.append(Expected(part.local, part.name, None, source="nothing"))
        else:
            d = directory / part.local
            files = sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []
            if not files:
                out.append(Expected(f"{part.local}/config.json", part.name, None, source="nothing"))
            out += [Expected(f"{part.local}/{p.name}", part.name, None, source="nothing") for p in files]
    return out


def verify(preset: str, directory: str | Path, *, hub: Hub | None = None, mode: str = "auto",
           record: bool = False, parts: Sequence[str] | None = None,
           known_sizes: Mapping[str, int] | None = None) -> VerifyResult:
    """Check the part files under ``directory``.

    mode ``auto``: the hub's metadata when reachable, else the manifest, else sizes only;
    ``online``: the hub or fail; ``offline``: never contact the hub. ``record`` (re)writes the
    manifest from the files on disk once they pass.
    """
    if mode not in ("auto", "online", "offline"):
        raise ValueError(f"mode must be auto, online or offline, got {mode!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"{directory}: no such directory")
    selected = _select(parts_for(preset), parts)
    manifest = read_manifest(directory)
    note, expected, reference = "", None, ""
    if mode != "offline":
        try:
            expected = expected_from_hub(selected, hub or HfHub())
            reference = "the hub's published file metadata (sizes, sha256 / git blob ids)"
        except HubUnavailable as e:
            if mode == "online":
                raise
            note = f"NOTE: {e}"
    if expected is None:
        if manifest is not None:
            expected = expected_from_manifest(selected, manifest)
            reference = (f"the manifest {directory / MANIFEST} recorded {manifest.get('recorded_at', '?')} "
                         f"(checked then against {manifest.get('checked_against', '?')})")
            have = {e.rel.split("/", 1)[0] for e in expected}
            for part in selected:
                if part.local not in have:
                    expected += [e for e in _offline_expected([part], directory)]
        else:
            expected = _offline_expected(selected, directory)
            reference = "official sizes only (no hub access, no manifest: run `weights verify --record` once " \
                        "the files are known good)"
    checks = tuple(check_file(directory, e, known_sizes) for e in expected)
    result = VerifyResult(checks, reference, note)
    if record:
        if not result.ok:
            raise WeightsError("not recording a manifest: some files failed verification\n" + result.format())
        _record(preset, directory, selected, checks, reference)
    return result


def _select(parts: list[Part], names: Sequence[str] | None) -> list[Part]:
    if not names:
        return parts
    unknown = set(names) - {p.name for p in parts}
    if unknown:
        raise WeightsError(f"unknown part(s) {sorted(unknown)}; parts are {list(PARTS)}")
    return [p for p in parts if p.name in names]


def _record(preset: str, directory: Path, parts: Sequence[Part], checks: Sequence[FileCheck], reference: str) -> Path:
    files: dict[str, dict[str, Any]] = {}
    old = read_manifest(directory) or {}
    keep = {p.local for p in parts}
    for rel, meta in (old.get("files") or {}).items():  # parts not checked now stay as recorded
        if rel.split("/", 1)[0] not in keep:
            files[rel] = meta
    for c in checks:
        path = directory / c.rel
        log.info("hashing %s", path)
        files[c.rel] = {"size": path.stat().st_size, "sha256": c.sha256 or sha256_of(path)}
    p = write_manifest(directory, preset, files, reference)
    log.info("recorded %d files in %s", len(files), p)
    return p


# ---------------------------------------------------------------------------------------------
# Fetch
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FetchResult:
    directory: Path
    downloaded: tuple[str, ...]
    kept: tuple[str, ...]           # already present and verified
    verify: VerifyResult


def fetch(preset: str, directory: str | Path, *, hub: Hub | None = None, parts: Sequence[str] | None = None,
          known_sizes: Mapping[str, int] | None = None) -> FetchResult:
    """Download a preset's parts into ``directory``, verify them and record the manifest."""
    hub = hub or HfHub()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    all_parts = parts_for(preset)
    selected = _select(all_parts, parts)
    expected = expected_from_hub(selected, hub)  # fails early and clearly without network
    by_rel = {e.rel: e for e in expected}
    downloaded, kept = [], []
    for part in selected:
        for rel, exp in by_rel.items():
            if exp.part != part.name:
                continue
            path = directory / rel
            if path.is_file() and check_file(directory, exp, known_sizes).status == OK:
                kept.append(rel)
                continue
            repo_path = part.filename if part.filename is not None else rel.split("/", 1)[1]
            log.info("downloading %s %s/%s -> %s (%s bytes)", part.repo_type, part.repo_id, repo_path, path,
                     _n(exp.size))
            hub.download(part.repo_id, part.repo_type, part.revision, repo_path, path)
            downloaded.append(rel)
    spec_path = directory / PARTS_FILE
    spec = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
    spec.update(parts_spec(preset, all_parts))
    spec_path.write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n")
    checks = tuple(check_file(directory, e, known_sizes) for e in expected)
    result = VerifyResult(checks, "the hub's published file metadata (sizes, sha256 / git blob ids)")
    if result.ok:
        _record(preset, directory, selected, checks, result.reference)
    return FetchResult(directory, tuple(downloaded), tuple(kept), result)


# ---------------------------------------------------------------------------------------------
# Convert
# ---------------------------------------------------------------------------------------------

def convert(src: str | Path, dst: str | Path | None = None, *, check: bool = True) -> tuple[Path, int]:
    """Official pickle (``{'model': tensors, 'optimizer': ..., ...}`` or a bare state dict) ->
    ``.safetensors`` with the same tensors; returns (dst, number of tensors)."""
    src = Path(src)
    if not src.is_file():
        raise WeightsError(f"{src}: no such file")
    dst = Path(dst) if dst else src.with_suffix(".safetensors")
    if dst.resolve() == src.resolve():
        raise WeightsError(f"{dst}: the destination is the source")
    from .checkpoint import convert_to_safetensors  # imports torch: only when converting

    convert_to_safetensors(src, dst)
    n = _check_same(src, dst) if check else -1
    return dst, n


def _load_pickle_tensors(src: Path) -> dict[str, Any]:
    import torch

    obj = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "model" in obj:
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{src}: expected a state dict or a dict with a 'model' state dict")
    return dict(obj)


def _check_same(src: Path, dst: Path) -> int:
    import torch
    from safetensors.torch import load_file

    a = _load_pickle_tensors(src)
    b = load_file(str(dst))
    if set(a) != set(b):
        raise WeightsError(f"{dst}: keys differ from {src}: {sorted(set(a) ^ set(b))[:10]}")
    for k in a:
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
            raise WeightsError(f"{dst}: tensor {k!r} differs from {src}")
    return len(a)
