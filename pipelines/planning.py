"""What a run will do, decided once: the :class:`WorkPlan`.

``run`` applies a plan and ``plan`` (the dry run) formats the same plan and adds its estimates,
so the two cannot disagree: every decision below is made here and nowhere else.

    prepare(cfg)   the run's settings as the run uses them: storage options with their production
                   defaults, the output store, the tasks, the config hash
    make_plan(p)   one listing, one read of ``files`` (every column), and from them, per listed file,
                   its action; the files gone from the scope and whether the guard refuses them;
                   the files whose content is already indexed under another URI and what they reuse

Actions (:func:`classify`, the skip rule, decided in one Arrow join of the listing with ``files``):

* ``new``            never committed;
* ``changed``        committed, but the file's version (ETag, or size + mtime) differs;
* ``config_changed`` same version, committed under another config (model, tasks, windowing...);
* ``retry``          same version and config, but its last result was a transient error
                     (``schemas.vocabulary.RETRYABLE_ERRORS``, ``rows_lost`` among them);
* ``unchanged``      nothing to do: the run skips it.

A file to process may instead **reuse** the results of the same content indexed under another URI
(``pipelines.output.mirror``): its content key comes from the listing on object stores and is
computed for local files only when an indexed file has their size (and the file is not over
``--max-bytes``, which the run would not decode). A file over ``--max-bytes`` is marked
``too_large``: the run writes its error row without decoding it.

No Ray here.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import storage
from pipelines.config import PipelineConfig, check_output, config_hash_of, model_id_for, resolve_tasks
from pipelines.output import OutputStore
from pipelines.output.ledger import RETRYABLE_ERRORS, with_versions
from pipelines.output.mirror import (
    NO_REMOVALS,
    Removals,
    ReuseSource,
    TooManyRemovals,
    check_removals,
    find_removals,
    find_sources,
    reusable_sizes,
)
from pipelines.sources import ContentHasher, FileRef, Listing, is_local_uri, list_archive

log = logging.getLogger(__name__)

NEW, CHANGED, CONFIG_CHANGED, RETRY, UNCHANGED = "new", "changed", "config_changed", "retry", "unchanged"
ACTIONS = (NEW, CHANGED, CONFIG_CHANGED, RETRY, UNCHANGED)
TO_PROCESS = (NEW, CHANGED, CONFIG_CHANGED, RETRY)
TOO_LARGE = "too_large"


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A run's settings as the run uses them (``cfg`` with its storage defaults applied)."""

    cfg: PipelineConfig
    store: OutputStore
    tasks: tuple[Any, ...]         # salmonn.prompts.Task, resolved
    config_hash: str
    model_id: str

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def prepare(cfg: PipelineConfig, *, check_out: bool = True) -> Prepared:
    """The settings a run (or the dry run of it) works with: input and output storage options with
    their production defaults (``pipelines.storage``), the output store, the tasks and the config
    hash. ``check_out``: the checks on the output location (``--out`` not a regular file, the run
    of ``--resume`` exists)."""
    tasks = tuple(resolve_tasks(cfg.tasks))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique: {names}")
    out_so = cfg.out_storage_options if cfg.out_storage_options is not None else cfg.storage_options
    out_so = storage.with_defaults(cfg.out, out_so)
    if check_out:
        check_output(cfg, out_so)
    in_so = storage.with_defaults(cfg.input, cfg.storage_options)
    cfg = dataclasses.replace(cfg, storage_options=in_so)
    return Prepared(cfg, OutputStore(cfg.out, out_so), tasks, config_hash_of(cfg), model_id_for(cfg.model))


# ---------------------------------------------------------------------------------------------
# The skip rule
# ---------------------------------------------------------------------------------------------

def classify(files: pa.Table, refs: Sequence[Any], chash: str) -> list[str]:
    """Each listed file's action under config ``chash`` (``refs``: ``FileRef``-like with ``uri``
    and ``version``; ``files``: the files table with at least uri, version, etag, size_bytes,
    mtime, config_hash, error_type). One Arrow join, no Python object per table row."""
    actions = [NEW] * len(refs)
    if files.num_rows == 0 or not refs:
        return actions
    t = with_versions(files.select(["uri", "version", "etag", "size_bytes", "mtime", "config_hash", "error_type"]))
    listed = pa.table({"uri": pa.array([r.uri for r in refs], pa.string()),
                       "listed_version": pa.array([r.version for r in refs], pa.string()),
                       "i": pa.array(range(len(refs)), pa.int64())})
    joined = listed.join(t.select(["uri", "version", "config_hash", "error_type"]), "uri", join_type="inner")
    same_version = pc.fill_null(pc.equal(joined["version"], joined["listed_version"]), False)
    same_config = pc.fill_null(pc.equal(joined["config_hash"], pa.scalar(chash, pa.string())), False)
    retried = pc.fill_null(pc.is_in(joined["error_type"], pa.array(sorted(RETRYABLE_ERRORS), pa.string())), False)
    action = pc.if_else(pc.invert(same_version), CHANGED,
                        pc.if_else(pc.invert(same_config), CONFIG_CHANGED,
                                   pc.if_else(retried, RETRY, UNCHANGED)))
    for i, a in zip(joined["i"].to_pylist(), action.to_pylist()):
        actions[i] = a
    return actions


def to_process(files: pa.Table, refs: Sequence[Any], chash: str) -> list[Any]:
    """The listed files :func:`classify` does not skip (in listing order)."""
    return [r for r, a in zip(refs, classify(files, refs, chash)) if a in TO_PROCESS]


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PlannedFile:
    ref: FileRef
    action: str                          # one of ACTIONS
    reuse: ReuseSource | None = None     # the results of the same content it copies (no work)
    over_limit: str | None = None        # TOO_LARGE: the run writes an error row without decoding

    @property
    def processed(self) -> bool:
        """Sent through the graph (decode + inference)."""
        return self.action in TO_PROCESS and self.reuse is None


@dataclasses.dataclass(frozen=True)
class WorkPlan:
    """What a run does: each listed file's action, the removals, the reuse, the guard's verdict."""

    config_hash: str
    listing: Listing
    files: tuple[PlannedFile, ...]
    removals: Removals
    refusal: str | None          # why the removal guard stops the run; None: it does not
    indexed: pa.Table            # the files table as read for this plan (every column)
    hasher: ContentHasher        # content keys: asked for while planning, the rest while processing
    reuse_checked: str = "all"   # "all", or which files' reuse was not checked and why
    list_s: float = 0.0
    read_s: float = 0.0          # the files table
    reuse_s: float = 0.0         # content keys of possible copies, and their sources (0: there were none)

    @property
    def refs(self) -> list[FileRef]:
        return self.listing.refs

    def count(self, action: str) -> int:
        return sum(1 for f in self.files if f.action == action)

    @property
    def todo(self) -> list[PlannedFile]:
        """Files to process or to fill by reuse (every action but ``unchanged``)."""
        return [f for f in self.files if f.action in TO_PROCESS]

    @property
    def to_process(self) -> list[PlannedFile]:
        """Files sent through the graph."""
        return [f for f in self.files if f.processed]

    @property
    def reused(self) -> list[PlannedFile]:
        return [f for f in self.files if f.reuse is not None]

    @property
    def skipped(self) -> int:
        return self.count(UNCHANGED)

    def check(self) -> None:
        """Raise :class:`TooManyRemovals` when the removal guard refuses the listing."""
        if self.refusal:
            raise TooManyRemovals(self.refusal)

    def close(self) -> None:
        self.hasher.close()

    def __enter__(self) -> WorkPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_plan(prep: Prepared, *, hash_local: bool = True) -> WorkPlan:
    """The :class:`WorkPlan` of the run ``prep`` describes. ``hash_local=False`` (``plan
    --probe never``): local files are never read, so their reuse is not checked (the plan says so).

    Close the plan (or use it in a ``with`` block): it holds the content hasher's threads."""
    cfg, store = prep.cfg, prep.store
    t0 = time.monotonic()
    listing = list_archive(cfg.input, dict(cfg.storage_options), extensions=cfg.extensions)
    refs = listing.refs
    t1 = time.monotonic()
    files = store.read_table("files")              # the one read: every column planning needs
    actions = classify(files, refs, prep.config_hash)
    removals = NO_REMOVALS if cfg.keep_removed else find_removals(store, listing.scope, refs, files=files)
    refusal = None
    try:
        check_removals(removals, cfg.max_removed, cfg.max_removed_files)
    except TooManyRemovals as e:
        refusal = str(e)
    t2 = time.monotonic()

    max_bytes = cfg.decode.max_bytes
    hasher = ContentHasher(max_bytes=max_bytes)
    over = {r.file_id for r, a in zip(refs, actions)
            if a in TO_PROCESS and max_bytes is not None and r.size_bytes is not None and r.size_bytes > max_bytes}
    todo = [r for r, a in zip(refs, actions) if a in TO_PROCESS and r.file_id not in over]
    sizes = reusable_sizes(files, prep.config_hash) if todo else set()
    maybe = [r for r in todo if r.size_bytes in sizes]
    reuse_checked = "all"
    if not hash_local:
        local = [r for r in maybe if r.content_key is None and is_local_uri(r.uri)]
        if local:
            reuse_checked = f"{len(local):,} local files of an indexed size (not read with --probe never)"
            unread = {r.file_id for r in local}
            maybe = [r for r in maybe if r.file_id not in unread]
    sources: dict[str, ReuseSource] = {}
    if maybe:
        hasher.submit(maybe)
        sources = find_sources(store, [hasher.keyed(r) for r in maybe], prep.config_hash, files=files,
                               n_tasks=len(prep.tasks))
    t3 = time.monotonic()
    planned = tuple(PlannedFile(r, a, sources.get(r.file_id), TOO_LARGE if r.file_id in over else None)
                    for r, a in zip(refs, actions))
    plan = WorkPlan(prep.config_hash, listing, planned, removals, refusal, files, hasher, reuse_checked,
                    list_s=t1 - t0, read_s=t2 - t1, reuse_s=t3 - t2 if maybe else 0.0)
    log.info("plan: %d listed, %d to process, %d reuse, %d unchanged, %d to remove%s", len(refs),
             len(plan.to_process), len(sources), plan.skipped, len(removals),
             " (refused: --max-removed)" if refusal else "")
    return plan
