"""Tables that lost data files: detected, repaired and refilled.

A Parquet data file of ``files`` or ``segments`` can disappear under the Delta log that still
references it: an object-store lifecycle rule, another tool's vacuum with a short retention, a
careless ``rm``. Every read of that table version then fails, and the ledger, which reads
``files`` only, would go on skipping files whose ``segments`` rows are gone.

* **Detect** (:func:`check_tables`): the data files a table's current version references against
  one listing of the table's directory (prefix); no data file is opened. ``status`` shows it,
  a run refuses to plan over a damaged table (:func:`ensure_healthy`, :class:`TableDamaged`: one
  line naming the table, the missing file and the repair command), and every reader that meets a
  missing file says the same (``OutputStore.read_table``). :class:`TableDamage` and
  :class:`TableDamaged` are defined in :mod:`.tables` and the check in ``OutputStore.check_table``
  (the store raises it; this module repairs, and imports the store), both re-exported here.
* **Repair** (:func:`repair`, ``salmonn-pipeline maintain OUT --repair``), under the compaction
  lease (:mod:`.maintenance`):

  1. ``files`` lost a data file: a Delta repair (FSCK) commit drops the references. Those files
     are unknown again, so the next run processes them; their segment rows that survived are
     replaced by that commit (a commit overwrites by ``file_id``).
  2. ``segments`` lost a data file: the files whose rows were lost are found from the rows that
     survive (a ``files`` row says ``n_segments`` windows, and every window has one row per task
     of its config) and their ``files`` rows are rewritten (one Delta commit) with status
     ``partial``, error type ``rows_lost`` (retried: ``schemas.vocabulary``) and a one-line
     message; every other column is kept. The next ordinary run processes them again, like any
     retried error, and its commit replaces whatever rows of them survived.
  3. Then a Delta repair (FSCK) commit on ``segments`` drops the references.

  The steps are ordered so that an interrupted repair is finished by running it again: the lost
  rows are marked while ``segments`` still references the missing files (the marks are computed
  from the rows of the data files that exist), and the references go last.

Status ``partial`` for a marked file: some of its results are in the tables, not all (``ok``
would claim a complete result, ``error`` a file without one); ``n_segments`` keeps the number
of windows its results should have.

Files whose rows are legitimately fewer than windows x tasks (``worker_crash``: the windows that
killed their worker have no rows) are marked only when their ``file_id`` lies in the range the
Delta log's statistics give for a lost data file; processing such a file again only costs time.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, write_deltalake

import schemas
from pipelines.output.maintenance import MaintenanceBusy, claim_maintenance, lease_holder, release_maintenance
from pipelines.output.store import TABLE_NAMES, OutputStore, utcnow
from pipelines.output.tables import (
    WRITER_PROPERTIES,
    TableDamage,
    TableDamaged,
    retry_conflicts,
    sql_str,
    table_schema,
)
from schemas import vocabulary

log = logging.getLogger(__name__)

ROWS_LOST = vocabulary.ROWS_LOST
OPERATION_KEY = "salmonn_pipeline.operation"
OP_REPAIR = "repair"                      # the FSCK commit that drops references to missing files
OP_MARK = "repair: rows lost"             # the files commit that marks files for the next run
REPAIR_ATTEMPTS = 20                      # attempts of a repair commit against concurrent writers
_MAX_LISTED = 50                          # missing paths named in a repair commit's metadata


# ---------------------------------------------------------------------------------------------
# Detect
# ---------------------------------------------------------------------------------------------

def check_table(store: OutputStore, name: str) -> TableDamage | None:
    """The data files table ``name``'s current version references that do not exist (None: no
    such table): its add actions against one listing of the table's directory."""
    return store.check_table(name)


def check_tables(store: OutputStore) -> list[TableDamage]:
    """:func:`check_table` for each table OUT has (``files`` first): one entry per table, its
    ``missing`` empty where nothing is missing."""
    out = []
    for name in TABLE_NAMES[::-1]:
        d = check_table(store, name)
        if d is not None:
            out.append(d)
    return out


def ensure_healthy(store: OutputStore, *, repair: bool = False) -> RepairReport | None:
    """Before a run plans: raise :class:`TableDamaged` when a table references data files that no
    longer exist, or with ``repair`` repair the tables (:func:`repair`) and return what it did.
    None when nothing is missing."""
    damages = [d for d in check_tables(store) if d.damaged]
    if not damages:
        return None
    if not repair:
        raise TableDamaged(store.out, damages, store.repair_command())
    report = _repair(store, holder_what="run --repair")
    for line in report.lines():
        log.warning("%s", line)
    return report


# ---------------------------------------------------------------------------------------------
# Repair and refill
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LostFile:
    """A file whose segment rows were lost (fewer than its windows x tasks survive)."""

    file_id: str
    uri: str
    run_id: str           # the run that wrote its files row (a file processed again since is left alone)
    rows: int             # its segment rows that survive
    expected: int         # windows x tasks


@dataclasses.dataclass
class RepairReport:
    """What :func:`repair` did."""

    out: str
    removed: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # table -> references dropped
    versions: dict[str, int] = dataclasses.field(default_factory=dict)   # table -> its repair commit's version
    lost_rows: dict[str, int | None] = dataclasses.field(default_factory=dict)  # table -> rows the files held
    marked: list[LostFile] = dataclasses.field(default_factory=list)     # files rows marked rows_lost
    mark_version: int | None = None        # the files version of the marking commit
    orphan_rows: int = 0                   # segment rows of files no files row knows (replaced when processed)
    orphan_files: int = 0
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.removed or self.marked)

    def lines(self) -> list[str]:
        if not self.changed:
            waiting = (f" ({self.orphan_rows} segment rows of {self.orphan_files} files that files does not know "
                       f"wait for the next run to process those files)" if self.orphan_rows else "")
            return [f"{self.out}: every data file the tables reference exists and every file's segment rows are "
                    f"complete{waiting}; nothing to repair"]
        out = []
        for name, paths in self.removed.items():
            rows = self.lost_rows.get(name)
            out.append(f"{name}: repair commit (version {self.versions[name]}) removed {len(paths)} reference(s) "
                       f"to missing data files ({paths[0]}{f', and {len(paths) - 1} more' if len(paths) > 1 else ''})"
                       + (f"; {rows} rows were in them" if rows is not None else ""))
        if "files" in self.removed:
            out.append("files: the files whose rows were in them are unknown again: the next run processes them"
                       + (f" (their {self.orphan_rows} surviving segment rows, of {self.orphan_files} files, are "
                          f"replaced then)" if self.orphan_rows else ""))
        if self.marked:
            names = ", ".join(f.uri for f in self.marked[:3]) + (f", ... ({len(self.marked)} files)"
                                                                 if len(self.marked) > 3 else "")
            out.append(f"segments: {len(self.marked)} file(s) lost rows ({names}): marked {ROWS_LOST} in files "
                       f"(version {self.mark_version}); the next run processes them again")
        return out


def repair(store: OutputStore, *, holder_what: str = "maintain --repair") -> RepairReport:
    """Repair OUT's tables (see the module docstring) under the compaction lease; raises
    :class:`MaintenanceBusy` when another process holds it."""
    t0 = time.monotonic()
    holder = lease_holder(holder_what)
    busy = claim_maintenance(store, holder)
    if busy is not None:
        raise MaintenanceBusy(f"{busy} is compacting {store.out}; repair when it is done (a lease left by a "
                              f"process that died ends by itself)")
    report = RepairReport(store.out)
    try:
        damage = {d.table: d for d in check_tables(store)}
        files_damage = damage.get("files")
        if files_damage is not None and files_damage.damaged:
            _fsck(store, files_damage, report)
        seg_damage = damage.get("segments")
        if "files" in damage and seg_damage is not None:
            lost, orphans = find_lost_rows(store, seg_damage)
            report.orphan_rows, report.orphan_files = orphans
            if lost:
                report.mark_version = mark_rows_lost(store, lost, seg_damage)
                report.marked = lost
            if seg_damage.damaged:
                _fsck(store, seg_damage, report)
    finally:
        release_maintenance(store, holder)
    report.seconds = time.monotonic() - t0
    return report


def _fsck(store: OutputStore, damage: TableDamage, report: RepairReport) -> None:
    """A Delta repair (FSCK) commit on ``damage.table``: its references to missing files go."""
    dt_ = store.table(damage.table)
    assert dt_ is not None
    listed = list(damage.missing[:_MAX_LISTED])
    props = CommitProperties(custom_metadata={
        OPERATION_KEY: OP_REPAIR, "missing_files": ",".join(listed)
        + (f",... ({len(damage.missing)} in all)" if len(damage.missing) > len(listed) else ""),
        "lost_rows": str(damage.lost_rows) if damage.lost_rows is not None else "unknown"})
    metrics = retry_conflicts(f"repair {damage.table}", lambda: dt_.repair(dry_run=False, commit_properties=props),
                              dt_.update_incremental, REPAIR_ATTEMPTS)
    removed = tuple(sorted(metrics.get("files_removed", [])))
    dt_.update_incremental()
    report.removed[damage.table] = removed or damage.missing
    report.versions[damage.table] = dt_.version()
    report.lost_rows[damage.table] = damage.lost_rows
    log.info("table %s: repair commit (version %d) removed %d reference(s) to missing data files",
                damage.table, dt_.version(), len(removed))


# The files columns the refill check reads.
_FILES_COLUMNS = ["file_id", "uri", "n_segments", "status", "error_type", "config_hash", "run_id"]
_SEGMENT_COLUMNS = ["file_id", "segment_index", "task"]


def find_lost_rows(store: OutputStore, damage: TableDamage | None) -> tuple[list[LostFile], tuple[int, int]]:
    """The files whose segment rows were lost, and (rows, files) of segment rows no files row
    knows. Reads the ``segments`` rows of the data files that exist (``damage.missing`` left
    out) and a few columns of ``files``."""
    segs = _surviving_rows(store, "segments", damage.missing if damage is not None else (), _SEGMENT_COLUMNS)
    files = store.read_table("files", columns=_FILES_COLUMNS)
    known = pc.is_in(segs["file_id"], files["file_id"])
    orphan = segs.filter(pc.invert(known))
    orphans = (orphan.num_rows, len(pc.unique(orphan["file_id"])) if orphan.num_rows else 0)
    # the tasks of each config: the run records' (one per config), and the tasks its rows show
    cells = segs.filter(known).group_by(_SEGMENT_COLUMNS).aggregate([])
    cells = cells.join(files.select(["file_id", "config_hash", "n_segments"]), "file_id", join_type="inner")
    tasks = _tasks_by_config(store, files, cells)
    task_table = pa.table({"config_hash": pa.array([c for c, ts in tasks.items() for _ in ts], pa.string()),
                           "task": pa.array([t for ts in tasks.values() for t in sorted(ts)], pa.string())})
    valid = cells.filter(pc.less(cells["segment_index"], pc.fill_null(cells["n_segments"], 0)))
    valid = valid.join(task_table, ["config_hash", "task"], join_type="inner")
    counted = valid.group_by("file_id").aggregate([("task", "count")])
    have = dict(zip(counted["file_id"].to_pylist(), counted["task_count"].to_pylist()))
    ranges = damage.id_ranges if damage is not None and damage.damaged else ()
    cols = files.to_pydict()
    out = []
    for i, fid in enumerate(cols["file_id"]):
        n = cols["n_segments"][i] or 0
        etype = cols["error_type"][i]
        if n <= 0 or etype in vocabulary.RETRYABLE_ERRORS:   # nothing to lose, or retried anyway
            continue
        expected = n * max(1, len(tasks.get(cols["config_hash"][i], ())))
        rows = int(have.get(fid, 0))
        if rows >= expected:
            continue
        if etype == vocabulary.WORKER_CRASH and not _in_ranges(fid, ranges):
            continue      # its crashed windows never had rows; nothing says it lost any
        out.append(LostFile(fid, cols["uri"][i], cols["run_id"][i], rows, expected))
    out.sort(key=lambda f: f.uri)
    return out, orphans


def _in_ranges(fid: str, ranges: Iterable[tuple[str | None, str | None]]) -> bool:
    for lo, hi in ranges:
        if (lo is None or fid[:len(lo)] >= lo) and (hi is None or fid[:len(hi)] <= hi):
            return True
    return False


def _tasks_by_config(store: OutputStore, files: pa.Table, cells: pa.Table) -> dict[str, set[str]]:
    """config_hash -> its task names: those of a run record of that config (every run record
    lists its tasks), and every task its surviving rows show."""
    out: dict[str, set[str]] = {}
    for chash, task in zip(cells["config_hash"].to_pylist(), cells["task"].to_pylist()):
        out.setdefault(chash, set()).add(task)
    runs: dict[str, list[str]] = {}
    for chash, run_id in zip(files["config_hash"].to_pylist(), files["run_id"].to_pylist()):
        if run_id not in runs.setdefault(chash, []):
            runs[chash].append(run_id)
    for chash, run_ids in runs.items():
        for run_id in run_ids[:3]:        # a record of a run of this config (any: same config, same tasks)
            try:
                rec = store.read_run(run_id)
            except (OSError, ValueError) as e:
                log.debug("run record %s unreadable: %s", run_id, e)
                rec = None
            names = [t.get("name") for t in (rec.tasks if rec is not None else []) if isinstance(t, Mapping)]
            if names and rec is not None and rec.config_hash in (None, chash):
                out.setdefault(chash, set()).update(n for n in names if isinstance(n, str))
                break
    return out


def _surviving_rows(store: OutputStore, name: str, missing: Iterable[str], columns: Sequence[str]) -> pa.Table:
    """``columns`` of table ``name``'s current version, read from the data files that exist
    (``missing`` left out). Read as ``pipelines.output.tables.scan`` reads (a local table through
    Arrow's own file system; any other store without pre-buffering)."""
    from pyarrow import dataset as pa_ds
    from pyarrow import fs as pa_fs

    dt_ = store.table(name)
    if dt_ is None:
        return pa.schema([schemas.TABLES[name].field(c) for c in columns]).empty_table()
    gone = set(missing) | {urllib.parse.unquote(m) for m in missing}
    if store.is_local:
        ds = dt_.to_pyarrow_dataset(filesystem=pa_fs.SubTreeFileSystem(store.path(name), pa_fs.LocalFileSystem()))
        options = None
    else:
        ds = dt_.to_pyarrow_dataset()
        options = pa_ds.ParquetFragmentScanOptions(pre_buffer=False)
    assert isinstance(ds, pa_ds.FileSystemDataset)
    keep = [f for f in ds.get_fragments() if f.path not in gone and f.path.lstrip("/") not in gone
            and posixpath.basename(f.path) not in gone]
    kept = pa_ds.FileSystemDataset(keep, ds.schema, ds.format, ds.filesystem)
    table = kept.to_table(columns=[c for c in columns if c in ds.schema.names], fragment_scan_options=options)
    return schemas.conform(table, pa.schema([schemas.TABLES[name].field(c) for c in columns]))


def mark_rows_lost(store: OutputStore, lost: Sequence[LostFile], damage: TableDamage | None) -> int:
    """Rewrite the ``files`` rows of ``lost`` (one Delta commit, every other column kept): status
    ``partial``, error type ``rows_lost`` and a one-line message, so that the next run processes
    them again. Returns the files table's version after the commit."""
    dt_ = store.table("files")
    assert dt_ is not None
    by_id = {f.file_id: f for f in lost}
    ids = sorted(by_id)
    when = utcnow().isoformat(timespec="seconds")
    missing = ", ".join(damage.missing[:3]) if damage is not None and damage.damaged else "none still referenced"

    def write() -> int:
        rows = store.read_table("files", file_ids=ids)
        same = [by_id[i].run_id == r for i, r in zip(rows["file_id"].to_pylist(), rows["run_id"].to_pylist())]
        rows = rows.filter(pa.array(same, pa.bool_()))     # not processed again meanwhile
        if rows.num_rows == 0:
            return dt_.version()
        kept = sorted(rows["file_id"].to_pylist())
        predicate = "file_id IN (" + ",".join(sql_str(i) for i in kept) + ")"
        props = CommitProperties(custom_metadata={OPERATION_KEY: OP_MARK, "file_ids": ",".join(kept)})
        messages = [f"rows lost: segments holds {by_id[i].rows} of its {by_id[i].expected} rows after data "
                    f"files of segments went missing ({missing}); marked by a repair at {when}"
                    f"; the next run processes it again" for i in rows["file_id"].to_pylist()]
        for col, values in (("status", [vocabulary.STATUS_PARTIAL] * rows.num_rows),
                            ("error_type", [ROWS_LOST] * rows.num_rows), ("error_message", messages)):
            idx = rows.schema.get_field_index(col)
            rows = rows.set_column(idx, rows.schema.field(col), pa.array(values, pa.string()))
        write_deltalake(dt_, rows.cast(table_schema("files")), mode="overwrite", predicate=predicate,
                        writer_properties=WRITER_PROPERTIES, commit_properties=props)
        return dt_.version()

    version = retry_conflicts("mark rows lost", write, dt_.update_incremental, REPAIR_ATTEMPTS)
    log.info("files: %d file(s) lost segment rows; marked %s (version %d), the next run processes them again",
                len(lost), ROWS_LOST, version)
    return int(version)


__all__ = ["ROWS_LOST", "LostFile", "RepairReport", "TableDamage", "TableDamaged", "check_table", "check_tables",
           "ensure_healthy", "find_lost_rows", "mark_rows_lost", "repair"]


_repair = repair     # ensure_healthy's ``repair`` argument hides the function's name there
