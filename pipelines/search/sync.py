"""Where the index lives, and moving it between a local directory and object storage.

* A local ``OUT``: the index is ``OUT/_search/``, written in place (tantivy's commit replaces
  ``meta.json`` atomically).
* ``OUT`` on object storage: tantivy works on a local directory only, so the index is built in a
  local working copy and *published* to ``OUT/_search/``. tantivy writes every segment file once,
  under a unique name (``<segment uuid>.<component>``, deletes as ``<uuid>.<opstamp>.del``), and
  ``meta.json`` names the live ones. Publishing uploads the live files the store lacks and then
  ``meta.json``, last: that upload is the commit point. A reader (:func:`pull`) reads
  ``meta.json``, downloads the live files its copy lacks, then replaces its own ``meta.json``.
  A publisher that dies part-way leaves new, unreferenced files beside the previous index, which
  readers keep using; :func:`clean_dir` (``maintain``) deletes files no ``meta.json`` names once
  they are older than an hour (a publish or a reader's pull in progress is not cut short).

Local copies are under ``$SALMONN_SEARCH_CACHE`` (default ``~/.cache/salmonn-pipeline/search``),
one folder per output URI: ``work/`` (the updater's) and ``read/`` (readers'), each guarded by a
file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pipelines.output.store import OutputStore

log = logging.getLogger(__name__)

INDEX_DIR = "_search"
META = "meta.json"
MANAGED = ".managed.json"          # tantivy's list of the files it created (its garbage collector's)
LOCK = ".salmonn-index.lock"       # one updater at a time (an flock; released when its process dies)
KEEP = frozenset({MANAGED, LOCK, ".tantivy-meta.lock", ".tantivy-writer.lock"})
CACHE_ENV = "SALMONN_SEARCH_CACHE"
CLEAN_AFTER_S = 3600.0             # unreferenced files younger than this may be a publish in progress
LOCK_TIMEOUT_S = 600.0


class IndexBusy(RuntimeError):
    """Another process is updating this index."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "salmonn-pipeline" / "search")


def local_copy(store: OutputStore, role: str) -> Path:
    """The local directory for ``store``'s index: ``OUT/_search`` itself for a local OUT; for an
    object-store OUT the cache folder's ``work`` (``role='work'``) or ``read`` copy."""
    if store.is_local:
        return Path(store.path(INDEX_DIR))
    key = hashlib.sha256(store.out.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", store.out.split("://", 1)[-1])[-60:]
    return cache_root() / f"{name}-{key}" / role


@contextlib.contextmanager
def locked(directory: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the flock of ``directory`` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise IndexBusy(f"another process has been updating the search index in {directory} for "
                                    f"{timeout_s:.0f} s") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def live_files(meta: dict[str, Any], names: Iterable[str]) -> set[str]:
    """Of ``names`` (file names in an index directory), those the index of ``meta`` uses,
    ``meta.json`` included."""
    segments = {s["segment_id"].replace("-", ""): s.get("deletes") for s in meta.get("segments", [])}
    live = {META}
    for name in names:
        stem, _, rest = name.partition(".")
        if stem not in segments:
            continue
        if rest.endswith(".del"):
            deletes = segments[stem]
            if deletes and rest == f"{deletes['opstamp']}.del":
                live.add(name)
        elif rest and not rest.endswith(".temp"):
            live.add(name)
    return live


# The files every segment of this project's index has (its fields have positions, a fast field,
# stored values); a segment's deletes add ``<uuid>.<opstamp>.del``.
COMPONENTS = ("idx", "pos", "term", "store", "fast", "fieldnorm")


def _check_complete(meta: dict[str, Any], live: set[str], where: str) -> None:
    lost = [s["segment_id"] for s in meta.get("segments", [])
            if any(f"{s['segment_id'].replace('-', '')}.{ext}" not in live for ext in COMPONENTS)
            or (s.get("deletes") and f"{s['segment_id'].replace('-', '')}.{s['deletes']['opstamp']}.del" not in live)]
    if lost:
        raise FileNotFoundError(f"the search index in {where} names segments whose files are missing: {lost[:3]}")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remote(store: OutputStore) -> str:
    return store.path(INDEX_DIR)


def pull(store: OutputStore, local: Path) -> bool:
    """Make ``local`` a copy of the index published in ``store`` (object storage): download the
    live files it lacks, replace its ``meta.json`` last, drop files no longer live. False when
    nothing is published (``local`` is then left as it is)."""
    remote = _remote(store)
    store.fs.invalidate_cache(remote)
    try:
        meta_bytes = store.fs.cat_file(posixpath.join(remote, META))
    except FileNotFoundError:
        return False
    local.mkdir(parents=True, exist_ok=True)
    mine = local / META
    if mine.exists() and mine.read_bytes() == meta_bytes:
        return True      # meta.json is replaced last, so the files it names are all here
    meta = json.loads(meta_bytes)
    listed = [posixpath.basename(p.rstrip("/")) for p in store.fs.ls(remote, detail=False)]
    live = live_files(meta, listed)
    _check_complete(meta, live, store.uri(INDEX_DIR))
    have = set(os.listdir(local))
    fetched = 0
    for name in sorted(live - have - {META}):
        tmp = local / f".tmp-{uuid.uuid4().hex}-{name}"
        store.fs.get_file(posixpath.join(remote, name), str(tmp))
        os.replace(tmp, local / name)
        fetched += 1
    _atomic_write(local / MANAGED, json.dumps(sorted(live)).encode())
    _atomic_write(mine, meta_bytes)
    for name in set(os.listdir(local)) - live - KEEP:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(local / name)
    log.info("pulled the search index of %s: %d file(s) fetched", store.out, fetched)
    return True


def publish(store: OutputStore, local: Path) -> tuple[int, int]:
    """Upload the live files of the index in ``local`` that ``store`` lacks, then ``meta.json``
    (the commit point). Returns (files uploaded, bytes)."""
    from pipelines import faults

    meta_bytes = (local / META).read_bytes()
    live = live_files(json.loads(meta_bytes), os.listdir(local))
    _check_complete(json.loads(meta_bytes), live, str(local))
    remote = _remote(store)
    store.fs.invalidate_cache(remote)
    try:
        there = {posixpath.basename(p.rstrip("/")) for p in store.fs.ls(remote, detail=False)}
    except FileNotFoundError:
        there = set()
    n = size = 0
    for name in sorted(live - there - {META}):
        store.fs.put_file(str(local / name), posixpath.join(remote, name))
        n += 1
        size += (local / name).stat().st_size
    faults.maybe_crash("search-publish", store.out)   # test hook: die between the files and meta.json
    store.fs.pipe_file(posixpath.join(remote, META), meta_bytes)
    store.fs.invalidate_cache(remote)
    return n + 1, size + len(meta_bytes)


def install(built: Path, target: Path) -> None:
    """Make the index built in ``built`` the index in ``target`` (local, under the caller's lock):
    move its segment files in (new, unique names), then replace ``meta.json`` (the commit point).
    The old index's files stay listed in ``.managed.json``, so tantivy deletes them once unused."""
    meta_bytes = (built / META).read_bytes()
    live = live_files(json.loads(meta_bytes), os.listdir(built))
    target.mkdir(parents=True, exist_ok=True)
    for name in sorted(live - {META}):
        os.replace(built / name, target / name)
    managed: set[str] = set()
    with contextlib.suppress(FileNotFoundError, ValueError):
        managed = set(json.loads((target / MANAGED).read_text()))
    _atomic_write(target / MANAGED, json.dumps(sorted(managed | live)).encode())
    _atomic_write(target / META, meta_bytes)


def _clean_local(target: Path, now: float, older_than_s: float) -> int:
    removed = 0
    live = live_files(json.loads((target / META).read_bytes()), os.listdir(target))
    for name in set(os.listdir(target)) - live - KEEP:
        path = target / name
        if path.is_file() and now - path.stat().st_mtime > older_than_s:
            path.unlink()
            removed += 1
    with contextlib.suppress(FileNotFoundError, ValueError):
        managed = set(json.loads((target / MANAGED).read_text()))
        _atomic_write(target / MANAGED, json.dumps(sorted(managed & set(os.listdir(target)))).encode())
    return removed


def clean_dir(store: OutputStore, older_than_s: float = CLEAN_AFTER_S) -> int:
    """Delete the files of ``OUT/_search`` that its ``meta.json`` does not name and that are
    older than ``older_than_s`` (debris of an interrupted update or publish, files of earlier
    index versions), and interrupted rebuilds' folders beside it. Returns the files deleted."""
    now = time.time()
    if store.is_local:
        target = Path(store.path(INDEX_DIR))
        removed = 0
        for stale in target.parent.glob(f"{INDEX_DIR}.build-*"):
            if now - stale.stat().st_mtime > older_than_s:
                import shutil

                removed += sum(1 for p in stale.rglob("*") if p.is_file())
                shutil.rmtree(stale, ignore_errors=True)
        if not (target / META).exists():
            return removed
        try:
            with locked(target, timeout_s=5.0):
                return removed + _clean_local(target, now, older_than_s)
        except IndexBusy:
            log.info("the search index of %s is being updated: not cleaned this time", store.out)
            return removed
    remote = _remote(store)
    store.fs.invalidate_cache(remote)
    try:
        meta = json.loads(store.fs.cat_file(posixpath.join(remote, META)))
        entries = store.fs.ls(remote, detail=True)
    except FileNotFoundError:
        return 0
    live = live_files(meta, [posixpath.basename(e["name"].rstrip("/")) for e in entries])
    doomed = []
    for e in entries:
        name = posixpath.basename(e["name"].rstrip("/"))
        if name in live or e.get("type") == "directory":
            continue
        modified = e.get("LastModified") or e.get("mtime")
        age = now - modified.timestamp() if hasattr(modified, "timestamp") else older_than_s + 1
        if age > older_than_s:
            doomed.append(e["name"])
    if doomed:
        store.fs.rm(doomed)
    store.fs.invalidate_cache(remote)
    return len(doomed)
