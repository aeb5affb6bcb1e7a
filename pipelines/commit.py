"""Commit protocol: Parquet parts + per-run manifest, exactly-once, resumable.

Layout under the output URI ``OUT`` (local path or any fsspec URL)::

    OUT/files/run_id=<RUN>/part-<SEQ>-<TOKEN>.parquet      files rows of one commit
    OUT/segments/run_id=<RUN>/part-<SEQ>-<TOKEN>.parquet   segments rows of the same commit
    OUT/_runs/<RUN>/run.json                               run record (config, status, counts)
    OUT/_runs/<RUN>/commits/<SEQ>.json                     commit record: the manifest entry

A commit writes both parts (on local disks through a temporary name and a rename), and only then
its commit record. The set of commit records *is* the manifest: readers, ``status`` and resume see
only parts a commit record lists, so a crash at any point leaves either a complete, listed commit
or unlisted debris that is ignored and removed when the run resumes. Each record is one object
written once, which is atomic on object stores as well as on POSIX.

No Ray here: the driver calls this module; tests use it directly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import secrets
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from schemas import vocabulary

log = logging.getLogger(__name__)

RUNS_DIR = "_runs"
RUN_RECORD = "run.json"
COMMITS_DIR = "commits"

# Run states and the error types the next run tries again (schemas.vocabulary: transient by
# nature); every other committed file is skipped while its (uri, version, config_hash) is unchanged.
RUN_RUNNING, RUN_COMPLETED, RUN_FAILED = vocabulary.RUN_RUNNING, vocabulary.RUN_COMPLETED, vocabulary.RUN_FAILED
RETRYABLE_ERRORS = vocabulary.RETRYABLE_ERRORS

# Storage-option keys whose values are secrets: never written to run records or logs.
_SECRET_HINTS = ("secret", "key", "token", "password", "credential", "session", "auth")
_PUBLIC_KEYS = frozenset({"endpoint_url", "anon", "region_name", "profile", "use_ssl", "block_size"})


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def redact(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of storage options safe to record: secret-looking values are replaced by '***'."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, Mapping):
            out[k] = redact(v)
        elif k in _PUBLIC_KEYS or not any(h in k.lower() for h in _SECRET_HINTS):
            out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else repr(type(v).__name__)
        else:
            out[k] = "***"
    return out


def config_hash(parts: Mapping[str, Any]) -> str:
    """Stable short hash of everything that changes a file's results (model, tasks, windowing)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def new_run_id(now: dt.datetime | None = None) -> str:
    now = now or utcnow()
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


@dataclasses.dataclass(frozen=True)
class CommittedFile:
    """What the manifest says about one committed file (enough to decide skips without Parquet)."""

    file_id: str
    uri: str
    version: str
    config_hash: str
    status: str
    error_type: str | None
    run_id: str
    seq: int


@dataclasses.dataclass(frozen=True)
class CommitRecord:
    run_id: str
    seq: int
    files_part: str        # path relative to OUT
    segments_part: str     # path relative to OUT
    n_files: int
    n_segments: int
    committed_at: str
    files: tuple[CommittedFile, ...]

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["files"] = [dataclasses.asdict(f) for f in self.files]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CommitRecord":
        d = json.loads(text)
        d["files"] = tuple(CommittedFile(**f) for f in d["files"])
        return cls(**d)


class OutputStore:
    """Reads and writes one output location (``OUT``) through fsspec."""

    def __init__(self, out: str, storage_options: Mapping[str, Any] | None = None):
        self.out = out.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.out, **dict(storage_options or {}))
        self.root = root.rstrip("/")
        self.is_local = "file" in _protocols(self.fs)

    # -- paths -------------------------------------------------------------------------------
    def path(self, *rel: str) -> str:
        return posixpath.join(self.root, *rel)

    def run_dir(self, run_id: str) -> str:
        return self.path(RUNS_DIR, run_id)

    def uri(self, rel: str) -> str:
        """A user-facing URI for a path relative to OUT (for messages and queries)."""
        return f"{self.out}/{rel}"

    # -- low-level writes --------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        parent = posixpath.dirname(path)
        if self.is_local:
            self.fs.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.fs.mv(tmp, path)
        else:
            # Object stores make an object visible only once its upload completes.
            with self.fs.open(path, "wb") as f:
                f.write(data)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, (json.dumps(obj, sort_keys=True, indent=1, default=str) + "\n").encode())

    def write_table(self, path: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(path, sink.getvalue().to_pybytes())

    def read_json(self, path: str) -> Any:
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    # -- runs --------------------------------------------------------------------------------
    def list_runs(self) -> list[str]:
        base = self.path(RUNS_DIR)
        self.fs.invalidate_cache(base)  # s3fs caches listings; other writers may have added runs
        try:
            entries = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        runs = [posixpath.basename(e.rstrip("/")) for e in entries]
        return sorted(r for r in runs if not r.startswith((".", "_")))

    def read_run(self, run_id: str) -> dict[str, Any] | None:
        p = posixpath.join(self.run_dir(run_id), RUN_RECORD)
        try:
            return self.read_json(p)
        except FileNotFoundError:
            return None

    def write_run(self, record: Mapping[str, Any]) -> None:
        self.write_json(posixpath.join(self.run_dir(record["run_id"]), RUN_RECORD), dict(record))

    def commits(self, run_id: str) -> list[CommitRecord]:
        base = posixpath.join(self.run_dir(run_id), COMMITS_DIR)
        self.fs.invalidate_cache(base)
        try:
            names = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        records = []
        for name in sorted(names):
            if not name.endswith(".json") or posixpath.basename(name).startswith("."):
                continue
            with self.fs.open(name, "rb") as f:
                records.append(CommitRecord.from_json(f.read().decode()))
        return sorted(records, key=lambda r: r.seq)

    def all_commits(self) -> list[CommitRecord]:
        out: list[CommitRecord] = []
        for run_id in self.list_runs():
            out.extend(self.commits(run_id))
        return out

    # -- reading tables ----------------------------------------------------------------------
    def read_parts(self, name: str, commits: Iterable[CommitRecord]) -> pa.Table:
        """Concatenate the listed parts of table ``name`` ('files' or 'segments')."""
        schema = schemas.TABLES[name]
        tables = []
        for c in commits:
            rel = c.files_part if name == "files" else c.segments_part
            with self.fs.open(self.path(rel), "rb") as f:
                t = pq.read_table(f)
            tables.append(schemas.conform(t, schema))
        if not tables:
            return schema.empty_table()
        return pa.concat_tables(tables)

    def read_table(self, name: str, *, run_id: str | None = None, latest: bool = False) -> pa.Table:
        """A table from manifest-listed parts only.

        ``run_id`` restricts to one run; ``latest`` keeps, for each file, only the rows of its most
        recent commit (so a changed file's new rows supersede the old ones).
        """
        commits = self.commits(run_id) if run_id else self.all_commits()
        if latest:
            keep = latest_commit_of_files(commits)
            wanted = {(fid, run, seq) for fid, (run, seq) in keep.items()}
            table = self._read_with_origin(name, commits)
            if table.num_rows == 0:
                return schemas.TABLES[name].empty_table()
            mask = [
                (fid, run, seq) in wanted
                for fid, run, seq in zip(
                    table["file_id"].to_pylist(), table["__run"].to_pylist(), table["__seq"].to_pylist()
                )
            ]
            table = table.filter(pa.array(mask)).drop_columns(["__run", "__seq"])
            return table.replace_schema_metadata(schemas.TABLES[name].metadata)
        return self.read_parts(name, commits)

    def _read_with_origin(self, name: str, commits: list[CommitRecord]) -> pa.Table:
        tables = []
        for c in commits:
            t = self.read_parts(name, [c])
            t = t.append_column("__run", pa.array([c.run_id] * t.num_rows, pa.string()))
            t = t.append_column("__seq", pa.array([c.seq] * t.num_rows, pa.int64()))
            tables.append(t)
        return pa.concat_tables(tables) if tables else pa.table({})

    # -- housekeeping ------------------------------------------------------------------------
    def orphan_parts(self, run_id: str) -> list[str]:
        """Part files of ``run_id`` that no commit record lists (debris of a crash)."""
        listed = set()
        for c in self.commits(run_id):
            listed.add(self.path(c.files_part))
            listed.add(self.path(c.segments_part))
        orphans = []
        for table in ("files", "segments"):
            d = self.path(table, f"run_id={run_id}")
            self.fs.invalidate_cache(d)
            try:
                names = self.fs.ls(d, detail=False)
            except FileNotFoundError:
                continue
            orphans.extend(n for n in names if n not in listed)
        return sorted(orphans)

    def remove_orphans(self, run_id: str) -> list[str]:
        orphans = self.orphan_parts(run_id)
        for p in orphans:
            log.info("removing unlisted part %s (left by an interrupted commit)", p)
            self.fs.rm(p)
        return orphans


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def latest_commit_of_files(commits: Iterable[CommitRecord]) -> dict[str, tuple[str, int]]:
    """file_id -> (run_id, seq) of the most recent commit that holds it.

    Runs are ordered by run id (which starts with its UTC start time), commits within a run by seq.
    """
    best: dict[str, tuple[str, int]] = {}
    for c in sorted(commits, key=lambda c: (c.run_id, c.seq)):
        for f in c.files:
            best[f.file_id] = (c.run_id, c.seq)
    return best


def committed_ledger(commits: Iterable[CommitRecord]) -> dict[str, CommittedFile]:
    """uri -> the most recent committed entry for that uri."""
    ledger: dict[str, CommittedFile] = {}
    for c in sorted(commits, key=lambda c: (c.run_id, c.seq)):
        for f in c.files:
            ledger[f.uri] = f
    return ledger


def is_done(entry: CommittedFile | None, version: str, cfg_hash: str) -> bool:
    """Whether a file at ``version`` under config ``cfg_hash`` needs no processing."""
    if entry is None:
        return False
    if entry.version != version or entry.config_hash != cfg_hash:
        return False
    # a transient failure (whole file, or some windows of a partial one) is tried again
    return entry.error_type not in RETRYABLE_ERRORS


class Committer:
    """Writes commits for one run: both parts, then the commit record (the manifest entry)."""

    def __init__(self, store: OutputStore, run_id: str, *, start_seq: int | None = None):
        self.store = store
        self.run_id = run_id
        if start_seq is None:
            existing = store.commits(run_id)
            start_seq = (existing[-1].seq + 1) if existing else 1
        self.next_seq = start_seq
        self.n_commits = 0

    def commit(self, files: pa.Table, segments: pa.Table, entries: Iterable[CommittedFile]) -> CommitRecord:
        files = schemas.conform(files, schemas.FILES)
        segments = schemas.conform(segments, schemas.SEGMENTS)
        schemas.check_values("files", files)
        schemas.check_values("segments", segments)
        seq = self.next_seq
        token = secrets.token_hex(4)
        files_rel = f"files/run_id={self.run_id}/part-{seq:06d}-{token}.parquet"
        segs_rel = f"segments/run_id={self.run_id}/part-{seq:06d}-{token}.parquet"
        self.store.write_table(self.store.path(files_rel), files)
        self.store.write_table(self.store.path(segs_rel), segments)
        entries = tuple(dataclasses.replace(e, run_id=self.run_id, seq=seq) for e in entries)
        record = CommitRecord(
            run_id=self.run_id,
            seq=seq,
            files_part=files_rel,
            segments_part=segs_rel,
            n_files=files.num_rows,
            n_segments=segments.num_rows,
            committed_at=utcnow().isoformat(),
            files=entries,
        )
        rec_path = posixpath.join(self.store.run_dir(self.run_id), COMMITS_DIR, f"{seq:06d}.json")
        self.store.write_bytes(rec_path, record.to_json().encode())
        self.next_seq += 1
        self.n_commits += 1
        log.debug("committed seq %d: %d files, %d segment rows", seq, files.num_rows, segments.num_rows)
        return record


def iter_runs(store: OutputStore) -> Iterator[dict[str, Any]]:
    for run_id in store.list_runs():
        rec = store.read_run(run_id)
        if rec is not None:
            yield rec
