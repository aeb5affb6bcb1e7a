"""The conversion of an output of the earlier layout into Delta tables (:func:`migrate`,
``salmonn-pipeline migrate OUT``), and the reading of that layout it needs; on an output that
already is Delta tables, ``migrate`` brings tables of an earlier schema version to this one (the
new columns added, null in the existing rows: what the next run's first write would do).

The earlier layout wrote Parquet parts (``OUT/<table>/run_id=<RUN>/``, schema v1/v2) and one JSON
commit record per driver commit (``OUT/_runs/<RUN>/commits/<seq>.json``). It is converted once, in
place: the latest rows into the Delta tables, each run's commit history into its ``run.json``
(``legacy_commits``), the old parts and records kept under ``OUT/_legacy/``. Until then reading
it raises :class:`~pipelines.output.store.OldLayoutError` (the store recognises the layout).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

import schemas
from pipelines.output.commit import with_ledger_columns
from pipelines.output.ledger import CommittedFile
from pipelines.output.runs import RunRecord
from pipelines.output.store import (
    COMMITS_DIR,
    LEGACY_DIR,
    TABLE_NAMES,
    OutputStore,
    legacy_parts,
    legacy_record_names,
)
from pipelines.output.tables import WRITER_PROPERTIES, open_table, table_schema, table_schema_version

log = logging.getLogger(__name__)

MIGRATE_APP_ID = "salmonn-pipeline-migrate"


@dataclasses.dataclass(frozen=True)
class CommitRecord:
    """A commit record of the earlier layout (``_runs/<run>/commits/<seq>.json``); read by
    :func:`migrate`."""

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
        d["files"] = [f._asdict() for f in self.files]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CommitRecord:
        d = json.loads(text)
        d["files"] = tuple(CommittedFile(**f) for f in d["files"])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Migration:
    runs: int
    commits: int
    files: int            # latest rows written to the files table
    segments: int
    parts_moved: int
    already_done: bool
    evolved: tuple[tuple[str, str | None], ...] = ()   # (table, its schema version before) brought up to date

    def format(self, out: str) -> str:
        if self.evolved and not self.commits:
            return "; ".join(f"{out}: table {name} brought from schema version {before or '?'} to "
                             f"{schemas.SCHEMA_VERSION} (new columns null in its rows)"
                             for name, before in self.evolved)
        if self.already_done and not self.parts_moved:
            return f"{out}: already Delta tables of schema version {schemas.SCHEMA_VERSION}, nothing to migrate"
        return (f"{out}: migrated {self.commits} commits of {self.runs} run(s): {self.files} files and "
                f"{self.segments} segment rows (the latest result of each file) into Delta tables; "
                f"{self.parts_moved} old parts kept under {out}/{LEGACY_DIR}/, commit history in each "
                f"run's run.json")


def legacy_commits(store: OutputStore, run_id: str | None = None) -> list[CommitRecord]:
    """The earlier layout's commit records (of ``run_id``, or of every run), oldest first."""
    records = []
    for run in [run_id] if run_id else store.list_runs():
        for name in legacy_record_names(store, run):
            with store.fs.open(name, "rb") as f:
                records.append(CommitRecord.from_json(f.read().decode()))
    return sorted(records, key=lambda r: (r.run_id, r.seq))


def _latest_commit_of_files(commits: Iterable[CommitRecord]) -> dict[str, tuple[str, int]]:
    """file_id -> (run_id, seq) of the most recent commit that holds it (runs ordered by run id,
    which starts with its UTC start time; commits within a run by seq)."""
    best: dict[str, tuple[str, int]] = {}
    for c in sorted(commits, key=lambda c: (c.run_id, c.seq)):
        for f in c.files:
            best[f.file_id] = (c.run_id, c.seq)
    return best


def _read_legacy_part(store: OutputStore, rel: str) -> pa.Table:
    for candidate in (rel, posixpath.join(LEGACY_DIR, rel)):
        try:
            with store.fs.open(store.path(candidate), "rb") as f:
                return pq.read_table(f, pre_buffer=False)   # see pipelines.output.tables.scan
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"{store.uri(rel)}: a part its commit record lists is missing")


def _evolve_tables(store: OutputStore, tables: Mapping[str, DeltaTable | None]) -> tuple[tuple[str, str | None], ...]:
    """Bring the existing tables of an earlier schema version (or lacking a column) to this one
    (:func:`pipelines.output.tables.evolve`); returns (table, version before) of those changed."""
    done = []
    for name, dt_ in tables.items():
        if dt_ is None:
            continue
        before = table_schema_version(dt_)
        have = {f.name for f in dt_.schema().fields}
        if before == schemas.SCHEMA_VERSION and set(schemas.TABLES[name].names) <= have:
            continue
        store.open_for_write(name)   # evolves it (and refuses a table of a newer pipeline)
        log.info("table %s: schema version %s -> %s", name, before, schemas.SCHEMA_VERSION)
        done.append((name, before))
    return tuple(done)


def migrate(out: str, storage_options: Mapping[str, Any] | None = None) -> Migration:
    """Convert an output of the earlier layout into Delta tables, in place.

    1. read every commit record and keep, for each file, the rows of its latest commit (schema
       v1/v2 rows are conformed: missing columns null; ``version`` from the record);
    2. copy each part to ``OUT/_legacy/<table>/run_id=<RUN>/`` (nothing is lost);
    3. write the latest rows as the first version of both tables (application transaction
       ``salmonn-pipeline-migrate``, so a second attempt does not write them again);
    4. record each run's commit history in its run.json (``legacy_commits``);
    5. delete the parts from their old place (Delta would treat them as debris), then move the
       commit records to ``OUT/_legacy/_runs/<RUN>/commits/``.

    Every step can be repeated: an interrupted migration is finished by running it again.

    An output that already is Delta tables (no parts, no records) has its tables of an earlier
    schema version brought to this one (``Migration.evolved``).
    """
    store = OutputStore(out, storage_options)
    records = legacy_commits(store)
    parts = legacy_parts(store)
    # opened without the earlier-layout check: this is that layout's reader
    tables = {name: open_table(store.table_uri(name), store.delta_options) for name in TABLE_NAMES}
    files_dt = tables["files"]
    done = files_dt is not None and (files_dt.transaction_version(MIGRATE_APP_ID) or 0) >= 1
    if not records and not parts:
        return Migration(0, 0, 0, 0, 0, already_done=any(t is not None for t in tables.values()),
                         evolved=_evolve_tables(store, tables))
    if not done:
        for name, table in tables.items():
            if table is not None and table.version() > 0 and (table.transaction_version(MIGRATE_APP_ID) or 0) < 1:
                raise RuntimeError(f"{store.uri(name)} already is a Delta table with data: migrate "
                                   f"converts an output of the earlier layout only")

    best = _latest_commit_of_files(records)
    entries = {f.file_id: f for c in records for f in c.files if best.get(f.file_id) == (c.run_id, c.seq)}
    latest: dict[str, list[pa.Table]] = {"files": [], "segments": []}
    for c in records:
        keep = pa.array(sorted(f for f, (run, seq) in best.items() if (run, seq) == (c.run_id, c.seq)), pa.string())
        for name, rel in (("files", c.files_part), ("segments", c.segments_part)):
            raw = _read_legacy_part(store, rel)
            t = schemas.conform(raw.select([n for n in raw.column_names if n in schemas.TABLES[name].names]),
                                schemas.TABLES[name])
            latest[name].append(t.filter(pc.is_in(t["file_id"], keep)))
    files = pa.concat_tables(latest["files"]) if latest["files"] else schemas.FILES.empty_table()
    segments = pa.concat_tables(latest["segments"]) if latest["segments"] else schemas.SEGMENTS.empty_table()
    if files.num_rows:
        files = with_ledger_columns(files, [entries[i] for i in files["file_id"].to_pylist()])

    moved = 0
    for c in records:
        for rel in (c.files_part, c.segments_part):
            src, dst = store.path(rel), store.path(LEGACY_DIR, rel)
            if store.fs.exists(src) and not store.fs.exists(dst):
                store.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
                store.fs.copy(src, dst)
                moved += 1

    for name, data in (("segments", segments), ("files", files)):
        dt_ = store.open_for_write(name, migrating=True)
        if (dt_.transaction_version(MIGRATE_APP_ID) or 0) < 1:   # not written by an earlier attempt
            meta = {"run_id": MIGRATE_APP_ID, "seq": "1",
                    "salmonn_pipeline.operation": "migrate from parts + commit records"}
            props = CommitProperties(custom_metadata=meta, app_transactions=[Transaction(MIGRATE_APP_ID, 1)])
            write_deltalake(dt_, data.sort_by([("uri", "ascending")]).cast(table_schema(name)), mode="append",
                            writer_properties=WRITER_PROPERTIES, commit_properties=props)
            dt_.create_checkpoint()

    by_run: dict[str, list[CommitRecord]] = {}
    for c in records:
        by_run.setdefault(c.run_id, []).append(c)
    for run_id, commits in by_run.items():
        rec = store.read_run(run_id) or RunRecord(run_id=run_id, status="unknown")
        if rec.legacy_commits is None:
            rec.legacy_commits = [{
                "seq": c.seq, "committed_at": c.committed_at, "n_files": c.n_files, "n_segments": c.n_segments,
                "files_part": posixpath.join(LEGACY_DIR, c.files_part),
                "segments_part": posixpath.join(LEGACY_DIR, c.segments_part),
                "files": [{"uri": f.uri, "version": f.version, "config_hash": f.config_hash, "status": f.status,
                           "error_type": f.error_type} for f in c.files],
            } for c in commits]
            store.write_run(rec)

    for p in legacy_parts(store):
        store.fs.rm(p, recursive=True)
    for run_id in by_run:   # the records last: until then a second attempt can read them
        for name in legacy_record_names(store, run_id):
            dst = store.path(LEGACY_DIR, posixpath.relpath(name, store.root))
            store.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            store.fs.copy(name, dst)
            store.fs.rm(name)
        base = posixpath.join(store.run_dir(run_id), COMMITS_DIR)
        if store.is_local and store.fs.exists(base):
            store.fs.rm(base, recursive=True)   # the empty directory (object stores have none)
    log.info("migrated %s: %d commits, %d files, %d segment rows", out, len(records), files.num_rows,
             segments.num_rows)
    return Migration(runs=len(by_run), commits=len(records), files=files.num_rows, segments=segments.num_rows,
                     parts_moved=moved, already_done=done)
