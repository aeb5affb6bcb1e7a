"""The output location: Delta Lake tables (deltalake / delta-rs) written exactly-once, resumably
and incrementally, and the run records beside them.

``OUT/files/`` holds one row per input file (its latest result), ``OUT/segments/`` one row per
(file, segment, task) of each file's latest result, ``OUT/_runs/<RUN>/run.json`` each run's record.
The driver commits a batch of complete files to both tables, ``segments`` first, ``files`` last,
each replacing the batch's files' earlier rows; a commit is complete when ``files`` has it, and
resume and the incremental ledger read it from there.

The parts: :mod:`.store` (:class:`OutputStore`: paths, run records, opening and reading the
tables, recognising the earlier layout), :mod:`.runs` (the typed run record), :mod:`.tables` (the
Delta schemas and their evolution, scans, retries against concurrent writers), :mod:`.ledger`
(what is done), :mod:`.commit` (:class:`Committer`: the commit protocol), :mod:`.mirror` (files
gone from the archive, and files whose content is already indexed), :mod:`.maintenance`
(compaction under a lease, checkpoints, vacuum) and :mod:`.migrate` (the earlier layout -> Delta
tables). What a run does with each listed file is decided in ``pipelines.planning``.

No Ray here: the driver calls this package; tests use it directly.
"""

from pipelines.output.commit import Commit, Committer
from pipelines.output.ledger import CommittedFile, committed_ledger, committed_seq, with_versions
from pipelines.output.maintenance import MaintenanceBusy, maintain
from pipelines.output.migrate import Migration, migrate
from pipelines.output.mirror import (
    Removals,
    ReuseSource,
    TooManyRemovals,
    check_removals,
    find_removals,
    find_sources,
    reusable_sizes,
)
from pipelines.output.runs import RunCounts, RunRecord
from pipelines.output.store import RUNS_DIR, TABLE_NAMES, OldLayoutError, OutputStore, new_run_id, redact, utcnow
from pipelines.output.tables import data_file_schema_version, table_schema_version

__all__ = ["RUNS_DIR", "TABLE_NAMES", "Commit", "CommittedFile", "Committer", "MaintenanceBusy", "Migration",
           "OldLayoutError", "OutputStore", "Removals", "ReuseSource", "TooManyRemovals", "check_removals",
           "committed_ledger", "committed_seq", "data_file_schema_version", "find_removals", "find_sources",
           "maintain", "migrate", "new_run_id", "redact", "reusable_sizes", "RunCounts", "RunRecord",
           "table_schema_version", "utcnow", "with_versions"]
