"""The driver's side of a run between the result stream and the committer: complete files are
buffered (:class:`CommitBuffer`), turned into the rows of one commit (:func:`build_tables`), and
committed through :class:`pipelines.output.Committer`, with the driver's own progress line
(:class:`Progress`).

No Ray here: ``pipelines.run`` feeds the buffer from the Ray Data result stream; tests and
benchmarks feed it directly.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

import pipelines
import schemas
from pipelines import faults, lifecycle
from pipelines.decode import FileInfo
from pipelines.labels import segment_label
from pipelines.output import CommittedFile, Committer, ReuseSource, utcnow
from pipelines.sources import FileRef
from pipelines.stages import CompleteFile, FailedFile, error_info
from schemas.vocabulary import INFERENCE_ERROR, PIPELINE_ERROR, WORKER_CRASH

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Tables for one commit
# ---------------------------------------------------------------------------------------------

def speech_seconds(segments: Sequence[Mapping[str, Any]]) -> float | None:
    """Seconds of speech in a file from its windows' speech ratios: each ratio applies to the part
    of its window before the next window starts (windows overlap when hop < window). None when no
    window has a ratio (the speech gate was off)."""
    spans = {s["segment_index"]: (s["start_s"], s["end_s"], s["speech_ratio"])
             for s in segments if s.get("speech_ratio") is not None}
    if not spans:
        return None
    order = sorted(spans)
    total = 0.0
    for k, i in enumerate(order):
        start, end, ratio = spans[i]
        if k + 1 < len(order):
            end = min(end, spans[order[k + 1]][0])
        total += float(ratio) * max(0.0, end - start)
    return total


def file_status(done: CompleteFile) -> tuple[str, str | None, str | None]:
    """(status, error_type, error_message) of a complete file, inference failures included."""
    info = done.info
    if not done.failed_windows:
        return info.status, info.error_type, info.error_message
    failed = sorted(done.failed_windows)
    first_type, first = done.failed_windows[failed[0]]
    msg = f"inference failed for segments {failed[:20]}{'...' if len(failed) > 20 else ''}: {first}"
    status = schemas.STATUS_ERROR if len(failed) >= info.n_segments else schemas.STATUS_PARTIAL
    types = {t for t, _ in done.failed_windows.values()}
    return status, (WORKER_CRASH if types == {WORKER_CRASH} else INFERENCE_ERROR), msg


def build_tables(done: Sequence[CompleteFile], refs: Mapping[str, FileRef], *, run_id: str, model_id: str,
                 chash: str) -> tuple[pa.Table, pa.Table, list[CommittedFile]]:
    """The files and segments tables of one commit, and the ledger entries of its files.

    Each file's rows are checked against the output schemas on their own: a file whose rows do
    not fit (a bug upstream) becomes a ``pipeline_error`` row instead of failing the commit of
    the files beside it.
    """
    now = utcnow()
    files_parts, seg_parts, entries = [], [], []
    for d in done:
        ref = refs[d.info.file_id]
        try:
            f, s, entry = _file_tables(d, ref, run_id=run_id, model_id=model_id, chash=chash, now=now)
        except Exception as e:  # noqa: BLE001 - one file's bad rows never stop the commit
            log.error("the results of %s do not fit the output schema: %s", ref.uri, e)
            bad = error_file(ref, PIPELINE_ERROR, f"its results did not fit the output schema: "
                                                  f"{type(e).__name__}: {e}"[:2000])
            f, s, entry = _file_tables(bad, ref, run_id=run_id, model_id=model_id, chash=chash, now=now)
        files_parts.append(f)
        seg_parts.append(s)
        entries.append(entry)
    files = pa.concat_tables(files_parts) if files_parts else schemas.FILES.empty_table()
    segs = pa.concat_tables(seg_parts) if seg_parts else schemas.SEGMENTS.empty_table()
    return files, segs, entries


def _file_tables(d: CompleteFile, ref: FileRef, *, run_id: str, model_id: str, chash: str,
                 now: Any) -> tuple[pa.Table, pa.Table, CommittedFile]:
    info = d.info
    status, etype, emsg = file_status(d)
    files = schemas.conform(pa.Table.from_pylist([{
        "file_id": info.file_id, "uri": ref.uri, "size_bytes": ref.size_bytes, "etag": ref.etag,
        "mtime": ref.mtime, "status": status, "error_type": etype, "error_message": emsg,
        "container": info.container, "codec": info.codec, "sample_rate_in": info.sample_rate_in,
        "channels_in": info.channels_in, "duration_s": info.duration_s, "n_segments": info.n_segments,
        "run_id": run_id, "model_id": model_id, "config_hash": chash,
        "pipeline_version": pipelines.__version__, "processed_at": now,
        "speech_s": speech_seconds(d.segments), "audio_stream": info.audio_stream,
        "content_hash": ref.content_key, "reused_from": d.reused_from,
    }], schema=schemas.FILES), schemas.FILES)
    # a reused file's rows keep their label (copied); the predictor's rows get theirs here
    segs = schemas.conform(pa.Table.from_pylist(
        [{**s, "run_id": run_id, "model_id": model_id,
          "label": s["label"] if "label" in s else segment_label(s["task"], s["text"])}
         for s in d.segments], schema=schemas.SEGMENTS), schemas.SEGMENTS)
    schemas.check_values("files", files)
    schemas.check_values("segments", segs)
    entry = CommittedFile(file_id=info.file_id, uri=ref.uri, version=ref.version, config_hash=chash,
                          status=status, error_type=etype, run_id=run_id, seq=0)
    return files, segs, entry


def error_file(ref: FileRef, error_type: str, message: str) -> CompleteFile:
    return CompleteFile(error_info(ref, error_type, message), [], {})


# Reused files per commit (their rows are in memory already; a commit of new files is cheap).
REUSE_BATCH = 1000

# The segments columns a reused file's rows take from its source (file_id, uri, run_id and
# model_id are the commit's).
REUSED_SEGMENT_FIELDS = tuple(f.name for f in schemas.SEGMENTS if f.name not in ("file_id", "uri", "run_id",
                                                                                  "model_id"))


def reused_file(ref: FileRef, source: ReuseSource) -> CompleteFile:
    """A file whose content is indexed under another URI, as a complete file: the source's
    results (what decode found, every segment row with its text, timestamps, task, label,
    speech ratio and, v5, language and word timings: media time of the content, so they hold
    for the copy) under the file's own ``file_id`` and ``uri``; its files row records where they
    came from (``reused_from``). Committed like any other file (:class:`CommitBuffer`).

    The source's status, error type and message carry over (a ``partial`` file's content is as
    partial under its new name); ``pipeline_version`` becomes this pipeline's, like every row a
    run writes; the source's ``model_id`` equals this run's (the config hash covers the model)."""
    f = source.file
    info = FileInfo(file_id=ref.file_id, uri=ref.uri, status=f["status"], error_type=f["error_type"],
                    error_message=f["error_message"], container=f["container"], codec=f["codec"],
                    sample_rate_in=f["sample_rate_in"], channels_in=f["channels_in"], duration_s=f["duration_s"],
                    n_segments=f["n_segments"] or 0, audio_stream=f["audio_stream"])
    segments = [{"file_id": ref.file_id, "uri": ref.uri, **{k: s[k] for k in REUSED_SEGMENT_FIELDS}}
                for s in source.segments]
    return CompleteFile(info, segments, {}, reused_from=f["uri"])


# ---------------------------------------------------------------------------------------------
# Progress and the commit buffer
# ---------------------------------------------------------------------------------------------

class Progress:
    """The driver's own progress line: files done / total, audio hours, throughput, errors."""

    def __init__(self, total: int, enabled: bool, every_s: float = 5.0):
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.t0 = time.monotonic()
        self.last = 0.0
        self.done = 0
        self.audio_s = 0.0
        self.status: collections.Counter[str] = collections.Counter()
        self.error_types: collections.Counter[str] = collections.Counter()

    def add(self, files: pa.Table) -> None:
        for row in files.select(["status", "error_type", "duration_s"]).to_pylist():
            self.done += 1
            self.status[row["status"]] += 1
            if row["error_type"]:
                self.error_types[row["error_type"]] += 1
            self.audio_s += row["duration_s"] or 0.0
        self.tick()

    def line(self) -> str:
        wall = time.monotonic() - self.t0
        rate = (self.audio_s / 3600) / (wall / 3600) if wall > 0 else 0.0
        errs = self.status[schemas.STATUS_ERROR] + self.status[schemas.STATUS_PARTIAL]
        return (f"[salmonn-pipeline] files {self.done}/{self.total} | audio {self.audio_s / 3600:.3f} h | "
                f"{rate:.1f} audio-h/wall-h | errors {errs} | {wall:.0f} s")

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.enabled and (force or now - self.last >= self.every_s):
            self.last = now
            print(self.line(), file=sys.stderr, flush=True)


# A driver commits for at most about this share of its wall time. A commit that replaces earlier
# rows rewrites every data file holding any of them (Delta is copy-on-write here); file ids are
# hashes, so when a run reprocesses files of a large table (a new model or config), each commit
# touches most of its data files: 4.2 s per 32-file commit against an 18M-row segments table on
# a local disk, where a commit of new files takes 0.08 s. Such commits are spaced out, and each
# carries the files completed meanwhile, instead of rewriting the table every 32 files.
COMMIT_SHARE = 0.1


class CommitBuffer:
    """Complete files waiting for the next commit; flushes by count or age, and no sooner than
    the last commit's duration x (1 / ``commit_share`` - 1) after it ended (None: no spacing)."""

    def __init__(self, committer: Committer, refs: Mapping[str, FileRef], progress: Progress, *,
                 run_id: str, model_id: str, chash: str, flush_files: int, flush_seconds: float,
                 commit_share: float | None = COMMIT_SHARE):
        self.committer, self.refs, self.progress = committer, refs, progress
        self.run_id, self.model_id, self.chash = run_id, model_id, chash
        self.flush_files, self.flush_seconds = flush_files, flush_seconds
        self.commit_share = commit_share
        self.buffer: dict[str, CompleteFile] = {}   # file_id -> the file, in completion order
        self.last_flush = time.monotonic()
        self.last_commit_s = 0.0     # how long the last commit took ...
        self.last_commit_end = 0.0   # ... and when it ended (monotonic)
        self.spaced = False          # commits are being spaced out (logged once)
        self.committed_ids: set[str] = set()
        self.commit_s = 0.0   # driver time spent writing parts and commit records

    @property
    def n_commits(self) -> int:
        return self.committer.n_commits

    def add(self, done: Sequence[CompleteFile]) -> None:
        for d in done:
            if d.info.file_id in self.committed_ids or d.info.file_id in self.buffer:
                continue  # delivered again by a retried task
            self.buffer[d.info.file_id] = d
        if self.due():
            self.flush()

    def due(self) -> bool:
        """Whether the buffered files should be committed now."""
        if not self.buffer:
            return False
        now = time.monotonic()
        if not (len(self.buffer) >= self.flush_files or now - self.last_flush >= self.flush_seconds):
            return False
        if self.commit_share:
            wait = self.last_commit_s * (1 / self.commit_share - 1)
            if now - self.last_commit_end < wait:
                if not self.spaced:
                    self.spaced = True
                    log.warning("a commit took %.1f s (it rewrites the table's data files that hold earlier rows "
                                "of the files it replaces): the next ones wait %.0f s after it, so committing "
                                "stays under %.0f%% of the driver's time", self.last_commit_s, wait,
                                100 * self.commit_share)
                return False
        return True

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.buffer:
            return
        t0 = time.monotonic()
        for d in self.buffer.values():
            faults.maybe_crash("commit", d.info.uri)
        files, segs, entries = build_tables(list(self.buffer.values()), self.refs, run_id=self.run_id,
                                            model_id=self.model_id, chash=self.chash)
        with lifecycle.critical():   # a stop signal waits until both tables have the commit
            self.committer.commit(files, segs, entries)
            self.last_commit_end = time.monotonic()
            self.last_commit_s = self.last_commit_end - t0
            self.commit_s += self.last_commit_s
            self.committed_ids.update(self.buffer)
            self.progress.add(files)
            self.buffer = {}

    def add_failed(self, failed: Sequence[FailedFile]) -> None:
        """Files whose result rows the driver could not use: a ``pipeline_error`` row each."""
        self.add([error_file(self.refs[f.file_id], PIPELINE_ERROR, f.reason) for f in failed
                  if f.file_id in self.refs])
