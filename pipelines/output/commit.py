"""The commit protocol (:class:`Committer`): exactly-once, resumable, concurrent-safe.

One driver commit (a batch of complete files) is two Delta commits, ``segments`` first, then
``files``. Each is an overwrite with the predicate ``file_id IN (<the batch's files>)``: the
batch's files' earlier rows are removed and its new rows added in one atomic table version, so a
reprocessed file's new result replaces the old one and an error result removes the old segments.
Each carries an application transaction (app id = run id, version = commit seq) and commit
metadata (``run_id``, ``seq``, ``file_ids``). Earlier results stay reachable through Delta's time
travel until ``vacuum`` removes their data files.

* A commit is complete when ``files`` has it (:mod:`.ledger` reads what is done from it).
* Resume: ``files``' transaction version for the run id is the last complete seq; the next commit
  continues after it. A crash between the two table commits leaves ``segments`` one seq ahead:
  those files are not in ``files``, so they are processed again, and the redo's predicate
  replaces the segment rows the interrupted commit wrote (never duplicates them).
* Concurrent writers (two runs on one OUT): Delta's optimistic concurrency rejects a commit when a
  concurrent commit added rows its predicate covers (``CommitFailedError``); the commit is
  retried on the new table version, where the predicate now removes the other run's rows. So
  each file's rows are in each table exactly once.

Removals (:meth:`Committer.remove`: files gone from the archive, ``pipelines.output.mirror``) are
driver commits too: per batch of files one seq, a Delta delete on ``segments`` then on ``files``
(predicate ``file_id IN (...)``), with the same application transaction and commit metadata
(operation ``remove``), retried on conflicts like the writes. A delete that matches no row makes no
table version (delta-rs commits nothing then), so such a seq may be missing from a table's
transaction. Interrupted between its two deletes, a removal leaves the files rows of files whose
segments are gone: the resumed run removes them again (the listing still lacks them), and one
that the listing returns again is processed again (:meth:`Committer.in_flight_removal`), never
skipped with its segments missing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
from deltalake import CommitProperties, Transaction, write_deltalake

import schemas
from pipelines.output.ledger import CommittedFile
from pipelines.output.maintenance import compact_under_lease, lease_holder
from pipelines.output.store import TABLE_NAMES, OutputStore
from pipelines.output.tables import WRITER_PROPERTIES, retry_conflicts, sql_str, table_schema

log = logging.getLogger(__name__)

# Attempts of one table commit that keeps losing to concurrent writers.
COMMIT_ATTEMPTS = 60
# Files per removal commit (the predicate lists their ids, and so does the commit metadata).
REMOVE_BATCH = 5000
OPERATION_KEY = "salmonn_pipeline.operation"
OP_REMOVE = "remove"


@dataclasses.dataclass(frozen=True)
class Commit:
    """One driver commit, as :meth:`Committer.commit` made it."""

    run_id: str
    seq: int
    n_files: int
    n_segments: int
    versions: dict[str, int]   # table name -> the Delta table version this commit created


def with_ledger_columns(files: pa.Table, entries: Sequence[CommittedFile]) -> pa.Table:
    """``files`` with ``version`` (and a missing ``config_hash``) from the ledger entries."""
    by_id = {e.file_id: e for e in entries}
    ids = files["file_id"].to_pylist()
    if set(ids) != set(by_id) or len(ids) != len(set(ids)):
        raise ValueError("a commit needs exactly one files row and one ledger entry per file")
    version = pa.array([by_id[i].version for i in ids], pa.string())
    files = files.set_column(files.schema.get_field_index("version"), files.schema.field("version"), version)
    chash = pa.array([c if c is not None else by_id[i].config_hash
                      for i, c in zip(ids, files["config_hash"].to_pylist())], pa.string())
    return files.set_column(files.schema.get_field_index("config_hash"), files.schema.field("config_hash"), chash)


class Committer:
    """Writes the commits of one run: ``segments`` then ``files``, each replacing the batch's
    files' earlier rows, each with the application transaction (run id, seq)."""

    def __init__(self, store: OutputStore, run_id: str, *, start_seq: int | None = None):
        self.store = store
        self.run_id = run_id
        self.tables = {name: store.open_for_write(name) for name in TABLE_NAMES}
        done = self.tables["files"].transaction_version(run_id) or 0
        written = self.tables["segments"].transaction_version(run_id) or 0
        # a segments commit whose files commit never landed: its files are not done, so they are
        # processed again and the redo replaces these segment rows
        self.in_flight_seq = written if written > done else None
        self.next_seq = start_seq if start_seq is not None else max(done, written) + 1
        self.n_commits = 0

    def in_flight_file_ids(self) -> list[str]:
        """The files of the interrupted commit (segments written, files not), from its metadata."""
        info = self._in_flight_info()
        return [i for i in str(info.get("file_ids", "")).split(",") if i] if info else []

    def in_flight_removal(self) -> list[str]:
        """The files of an interrupted removal (their segments deleted, their files rows not):
        processed again if the listing returns them (the ledger would skip them otherwise)."""
        info = self._in_flight_info()
        return self.in_flight_file_ids() if info and info.get(OPERATION_KEY) == OP_REMOVE else []

    def _in_flight_info(self) -> dict[str, Any] | None:
        if self.in_flight_seq is None:
            return None
        for _, info in self.store.commit_infos("segments"):
            if info.get("run_id") == self.run_id and str(info.get("seq")) == str(self.in_flight_seq):
                return info
        return None

    def settle_in_flight(self, redo_ids: Iterable[str]) -> list[str]:
        """After a crash between the two table commits: remove the interrupted commit's segment
        rows of files this attempt will not process again (their input vanished or another run
        committed them); the others are replaced when their redo commits. Returns the ids removed."""
        stale = sorted(set(self.in_flight_file_ids()) - set(redo_ids))
        if stale and self.in_flight_seq is not None:   # (stale implies an in-flight commit)
            pred = f"run_id = {sql_str(self.run_id)} AND {_id_predicate(stale)}"
            props = CommitProperties(custom_metadata={"run_id": self.run_id, "seq": str(self.in_flight_seq),
                                                      "salmonn_pipeline.operation": "settle interrupted commit"},
                                     app_transactions=[Transaction(self.run_id, self.in_flight_seq)])
            dt_ = self.tables["segments"]
            retry_conflicts("settle segments", lambda: dt_.delete(pred, commit_properties=props),
                            dt_.update_incremental, COMMIT_ATTEMPTS)
            log.info("removed the segment rows of %d file(s) of interrupted commit %d", len(stale), self.in_flight_seq)
        return stale

    def commit(self, files: pa.Table, segments: pa.Table, entries: Iterable[CommittedFile]) -> Commit:
        entries = list(entries)
        files = with_ledger_columns(schemas.conform(files, schemas.FILES), entries)
        segments = schemas.conform(segments, schemas.SEGMENTS)
        schemas.check_values("files", files)
        schemas.check_values("segments", segments)
        ids = sorted(files["file_id"].to_pylist())
        stray = set(segments["file_id"].to_pylist()) - set(ids)
        if stray:
            raise ValueError(f"segments rows of files not in this commit: {sorted(stray)[:5]}")
        # rows in URI order: data files cover narrow URI ranges, which the Delta log's statistics
        # let readers skip
        files = files.sort_by([("uri", "ascending")])
        segments = segments.sort_by([("uri", "ascending"), ("segment_index", "ascending"), ("task", "ascending")])
        seq = self.next_seq
        versions = {}
        for name, data in (("segments", segments), ("files", files)):
            versions[name] = self._write(name, data, ids, seq)
        self.next_seq += 1
        self.n_commits += 1
        log.debug("committed seq %d: %d files, %d segment rows (versions %s)", seq, files.num_rows,
                  segments.num_rows, versions)
        return Commit(self.run_id, seq, files.num_rows, segments.num_rows, versions)

    def remove(self, file_ids: Sequence[str]) -> list[Commit]:
        """Delete the rows of ``file_ids`` from both tables (files gone from the archive): per
        :data:`REMOVE_BATCH` files one driver commit, ``segments`` first, then ``files``. Earlier
        versions keep the rows (time travel) until ``vacuum``."""
        out = []
        ids = sorted(set(file_ids))
        for start in range(0, len(ids), REMOVE_BATCH):
            batch = ids[start:start + REMOVE_BATCH]
            seq = self.next_seq
            versions, deleted = {}, {}
            for name in TABLE_NAMES:
                versions[name], deleted[name] = self._delete(name, batch, seq)
            self.next_seq += 1
            self.n_commits += 1
            log.info("removed %d file(s) gone from the archive (seq %d: %d files rows, %d segment rows)",
                     len(batch), seq, deleted["files"], deleted["segments"])
            out.append(Commit(self.run_id, seq, deleted["files"], deleted["segments"], versions))
        return out

    def _delete(self, name: str, ids: Sequence[str], seq: int) -> tuple[int, int]:
        """(table version after, rows deleted) of one removal's delete on table ``name``."""
        dt_ = self.tables[name]
        props = CommitProperties(
            custom_metadata={"run_id": self.run_id, "seq": str(seq), "file_ids": ",".join(ids),
                             OPERATION_KEY: OP_REMOVE},
            app_transactions=[Transaction(self.run_id, seq)])

        def delete() -> tuple[int, int]:
            metrics = dt_.delete(_id_predicate(ids), commit_properties=props)
            return dt_.version(), int(metrics.get("num_deleted_rows", 0))

        return retry_conflicts(f"removal {seq} from {name}", delete, dt_.update_incremental, COMMIT_ATTEMPTS)

    def _write(self, name: str, data: pa.Table, ids: Sequence[str], seq: int) -> int:
        dt_ = self.tables[name]
        props = CommitProperties(
            custom_metadata={"run_id": self.run_id, "seq": str(seq), "file_ids": ",".join(ids)},
            app_transactions=[Transaction(self.run_id, seq)])
        data = data.cast(table_schema(name))

        def write() -> int:
            write_deltalake(dt_, data, mode="overwrite", predicate=_id_predicate(ids),
                            writer_properties=WRITER_PROPERTIES, commit_properties=props)
            return dt_.version()

        return retry_conflicts(f"commit {seq} to {name}", write, dt_.update_incremental, COMMIT_ATTEMPTS)

    def finish(self) -> dict[str, Any]:
        """End of a run that committed something: compact the tables and write checkpoints. When
        another process holds the compaction lease (a concurrent run finishing, ``maintain``),
        this run only writes checkpoints: the next compaction takes its files too."""
        if not self.n_commits:
            return {}
        report, busy = compact_under_lease(self.store, self.tables, lease_holder(f"run {self.run_id}"), lenient=True)
        if busy is not None:
            log.warning("compaction skipped: %s is compacting this output (the next run or `salmonn-pipeline "
                        "maintain` compacts the files this run wrote)", busy)
            for name, dt_ in self.tables.items():
                if name not in report:
                    dt_.update_incremental()
                    dt_.create_checkpoint()
                    report[name] = {"version": dt_.version(), "skipped": busy}
        return report


def _id_predicate(ids: Iterable[str]) -> str:
    return "file_id IN (" + ",".join(sql_str(i) for i in ids) + ")"
