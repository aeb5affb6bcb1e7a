"""`salmonn-pipeline plan`: what a run would do, without decoding anything or writing anything.

The plan lists the input exactly as a run does (``pipelines.sources.list_inputs``: metadata only),
compares every file with the output's committed ledger under the config hash the run would use
(``pipelines.run.config_hash_of``), and sorts it into:

* ``new``            never committed;
* ``changed``        committed, but the file's version (ETag, or size + mtime) differs;
* ``config_changed`` same version, committed under another config (model, tasks, windowing...);
* ``retry``          same version and config, but its last result was a transient error;
* ``unchanged``      nothing to do (the run skips it).

Like the run, it shows how the tables would follow the archive (``pipelines.output.mirror``): the
indexed files of the input's scope the listing no longer returns ("would remove N", and whether
``--max-removed`` would stop the run), and the files to process whose content is already indexed
under another URI ("would reuse M": their results are copied, they cost no GPU time and are left
out of the hours below). Content keys come from the listing on object stores; local files are
hashed only when an indexed file has their size (and never with ``probe="never"``: then local
reuse is not checked, and the plan says so).

For the files to process it gives the audio hours, the windows x tasks and a GPU-hours estimate.
Each file's duration comes from, in this order:

1. ``measured``   an earlier run decoded this very version (config changes, retries);
2. ``header``     the container says so in its first bytes, read by mutagen: WAV, AIFF, FLAC
                  STREAMINFO, MP3 Xing/Info/VBRI (or a CBR bitrate), MP4/M4A/MOV (the audio
                  track's ``mdhd``, else ``mvhd``). At most
                  :data:`PROBE_MAX_BYTES` are read per file, never audio samples. Probing is on by
                  default for local inputs only (``probe="auto"``): on object storage it costs one
                  request per file, so ask for it with ``probe="always"``;
3. ``estimate``   size / bytes-per-second, calibrated from this output's earlier ``ok`` files of
                  the same extension, else from :data:`DEFAULT_KBPS`. Estimates are marked ``~``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import statistics
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import mutagen.aiff
import mutagen.flac
import mutagen.mp3
import mutagen.mp4
import mutagen.wave
from fsspec.core import url_to_fs

from pipelines import planning
from pipelines.output.health import ensure_healthy
from pipelines.planning import ACTIONS, CHANGED, CONFIG_CHANGED, NEW, RETRY, TO_PROCESS, UNCHANGED
from pipelines.sources import extension

log = logging.getLogger(__name__)

__all__ = ["ACTIONS", "CHANGED", "CONFIG_CHANGED", "NEW", "RETRY", "TO_PROCESS", "UNCHANGED", "FilePlan", "Plan",
           "describe", "plan_json", "plan_run", "probe_file"]

SRC_MEASURED, SRC_HEADER, SRC_ESTIMATE = "measured", "header", "estimate"

PROBE_MAX_BYTES = 64 * 2**10   # header bytes read per file, at most
PROBE_BLOCK = 16 * 2**10       # fsspec block size for probing (one small ranged GET on S3)
PROBE_THREADS = 16

# Throughput of the SALMONN stage in audio hours per GPU hour, with the number of tasks the figure
# was measured with (generation dominates, so the cost scales with the task count).
# Placeholders, not measurements: benchmarks/ has no throughput figure for these models yet, and
# THROUGHPUT_SOURCE says so in every plan. --throughput overrides per run.
THROUGHPUT_AUDIO_H_PER_GPU_H: dict[str, tuple[float, int]] = {
    "salmonn-13b": (40.0, 3),
    "salmonn-7b": (70.0, 3),
    "tiny": (2000.0, 3),
}
THROUGHPUT_SOURCE = "placeholder default, not yet measured by benchmarks/"
FALLBACK_MODEL = "salmonn-13b"  # a directory of parts is costed like the 13B model

# Typical bitrates (kbit/s) to estimate durations from sizes when nothing better is known.
DEFAULT_KBPS: dict[str, float] = {
    ".wav": 1411.2, ".wave": 1411.2, ".w64": 1411.2, ".aif": 1411.2, ".aiff": 1411.2, ".aifc": 1411.2,
    ".au": 1411.2, ".snd": 1411.2, ".caf": 1411.2,
    ".flac": 800.0, ".alac": 800.0, ".ape": 700.0, ".wv": 700.0, ".tta": 700.0,
    ".mp3": 128.0, ".mp2": 192.0, ".m4a": 128.0, ".m4b": 64.0, ".aac": 128.0, ".ogg": 112.0,
    ".oga": 112.0, ".opus": 64.0, ".spx": 24.0, ".wma": 128.0, ".amr": 12.2, ".3ga": 12.2,
    ".ac3": 384.0, ".eac3": 384.0, ".dts": 768.0, ".mka": 192.0,
    # video containers: the video stream dominates the size
    ".mp4": 2500.0, ".m4v": 2500.0, ".mkv": 4000.0, ".mov": 4000.0, ".webm": 1500.0, ".avi": 2500.0,
    ".flv": 1000.0, ".wmv": 2000.0, ".asf": 2000.0, ".mpg": 4000.0, ".mpeg": 4000.0, ".ts": 4000.0,
    ".mts": 8000.0, ".m2ts": 8000.0, ".3gp": 500.0, ".3g2": 500.0, ".ogv": 1500.0, ".vob": 5000.0,
}
DEFAULT_KBPS_OTHER = 128.0


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FilePlan:
    uri: str
    size_bytes: int | None
    action: str
    duration_s: float | None        # None for unchanged files (not needed) and over-limit files
    duration_source: str | None     # measured | header | estimate
    windows: int
    over_limit: str | None = None   # "too_large" / "too_long": the run will write an error row
    reused_from: str | None = None  # the uri whose results the run would copy (same content): no work


@dataclasses.dataclass(frozen=True)
class Plan:
    input: str
    out: str
    model: str
    tasks: tuple[str, ...]
    config_hash: str
    window_s: float
    hop_s: float
    files: tuple[FilePlan, ...]
    throughput: float               # audio-h per GPU-h for this run's task set
    throughput_source: str
    list_s: float
    probe_files: int
    probe_bytes: int
    speech_gate: bool = False            # --speech-gate on: tasks that need speech skip windows without it
    speech_tasks: tuple[str, ...] = ()   # the tasks the gate can skip
    speech_measured: tuple[float, float] | None = None   # earlier runs here: (speech h, audio h) of their files
    removed: tuple[str, ...] = ()        # indexed files of the input's scope the listing no longer returns
    indexed_in_scope: int = 0            # indexed files inside the input's scope
    keep_removed: bool = False
    max_removed: float = 0.1
    max_removed_files: int = 3
    removal_refused: str | None = None   # why the run would stop (--max-removed), None: it would not
    reuse_checked: str = "all"           # "all", or which files' reuse was not checked and why
    hashed_files: int = 0                # local files hashed to recognise copies
    hashed_bytes: int = 0

    def count(self, action: str) -> int:
        return sum(1 for f in self.files if f.action == action)

    @property
    def todo(self) -> list[FilePlan]:
        """The files the run would process (reused ones cost nothing and are not among them)."""
        return [f for f in self.files if f.action in TO_PROCESS and f.reused_from is None]

    @property
    def reused(self) -> list[FilePlan]:
        return [f for f in self.files if f.reused_from is not None]

    def audio_hours(self, source: str | None = None) -> float:
        return sum((f.duration_s or 0.0) for f in self.todo
                   if source is None or f.duration_source == source) / 3600

    @property
    def windows(self) -> int:
        return sum(f.windows for f in self.todo)

    @property
    def rows(self) -> int:
        return self.windows * len(self.tasks)

    @property
    def gpu_hours(self) -> float:
        return self.audio_hours() / self.throughput if self.throughput > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input, "out": self.out, "model": self.model, "tasks": list(self.tasks),
            "config_hash": self.config_hash, "window_s": self.window_s, "hop_s": self.hop_s,
            "counts": {a: self.count(a) for a in ACTIONS},
            "would_remove": len(self.removed), "would_reuse": len(self.reused),
            "indexed_in_scope": self.indexed_in_scope, "keep_removed": self.keep_removed,
            "max_removed": self.max_removed, "max_removed_files": self.max_removed_files,
            "removal_refused": self.removal_refused,
            "reuse_checked": self.reuse_checked, "hashed_files": self.hashed_files, "hashed_bytes": self.hashed_bytes,
            "removed": list(self.removed),
            "files_listed": len(self.files),
            "bytes_listed": sum(f.size_bytes or 0 for f in self.files),
            "bytes_to_process": sum(f.size_bytes or 0 for f in self.todo),
            "over_limits": sum(1 for f in self.todo if f.over_limit),
            "audio_hours": self.audio_hours(),
            "audio_hours_by_source": {s: self.audio_hours(s) for s in (SRC_MEASURED, SRC_HEADER, SRC_ESTIMATE)},
            "audio_hours_is_estimate": self.audio_hours(SRC_ESTIMATE) > 0,
            "windows": self.windows, "result_rows": self.rows,
            "throughput_audio_h_per_gpu_h": self.throughput, "throughput_source": self.throughput_source,
            "gpu_hours": self.gpu_hours,
            "list_s": self.list_s, "probe_files": self.probe_files, "probe_bytes": self.probe_bytes,
            "speech_gate": self.speech_gate, "speech_tasks": list(self.speech_tasks),
            "speech_hours_measured": self.speech_measured[0] if self.speech_measured else None,
            "audio_hours_measured": self.speech_measured[1] if self.speech_measured else None,
            "files": [dataclasses.asdict(f) for f in self.files],
        }

    def format(self, *, show_files: bool = False) -> str:
        todo = self.todo
        est = self.audio_hours(SRC_ESTIMATE)
        lines = [
            f"plan: {self.input} -> {self.out}   (dry run: nothing written, no audio decoded)",
            f"model {self.model} | tasks {', '.join(self.tasks)} ({len(self.tasks)}) | config hash "
            f"{self.config_hash} | window {self.window_s:g} s, hop {self.hop_s:g} s",
            f"listed {len(self.files):,} files ({_bytes(sum(f.size_bytes or 0 for f in self.files))}) "
            f"in {self.list_s:.2f} s",
        ]
        labels = {NEW: "new", CHANGED: "changed (new version)", CONFIG_CHANGED: "config changed",
                  RETRY: "retry (transient error)", UNCHANGED: "unchanged (skipped)"}
        for a in ACTIONS:
            lines.append(f"  {labels[a]:<26}{self.count(a):>10,}")
        lines.append(self._removal_line())
        reuse = (f"would reuse {len(self.reused):,} (moved or copied: the results of the same content are copied, "
                 f"no decode, no GPU)")
        if self.hashed_files:
            reuse += f"; hashed {_bytes(self.hashed_bytes)} of {self.hashed_files:,} local files to recognise them"
        if self.reuse_checked != "all":
            reuse += f"; not checked for {self.reuse_checked}"
        lines.append(reuse)
        over = collections.Counter(f.over_limit for f in todo if f.over_limit)
        over_text = ", ".join(f"{v} {k}" for k, v in sorted(over.items()))
        lines.append(f"to process: {len(todo):,} files, {_bytes(sum(f.size_bytes or 0 for f in todo))}"
                     + (f" ({over_text} over the limits: error rows, or cut at max duration)" if over else ""))
        sources = [(h, what) for h, what in ((self.audio_hours(SRC_MEASURED), "measured by earlier runs"),
                                             (self.audio_hours(SRC_HEADER), "from container headers"),
                                             (est, "ESTIMATED from bytes")) if h > 0]
        if len(sources) > 1:
            detail = " = " + " + ".join(f"{'~' if what.startswith('EST') else ''}{_hours(h)} {what}"
                                        for h, what in sources)
        else:
            detail = f" ({sources[0][1]})" if sources else ""
        lines.append(f"audio to process: {'~' if est else ''}{_hours(self.audio_hours())}{detail}")
        lines.append(f"windows: {self.windows:,} x {len(self.tasks)} tasks = {self.rows:,} result rows")
        lines.append(self._speech_line())
        lines.append(f"GPU estimate: ~{_hours(self.gpu_hours, 'GPU-h')} at {self.throughput:g} audio-h per GPU-h "
                     f"({self.throughput_source}; set --throughput to change)")
        if self.probe_files:
            lines.append(f"header probe: read {_bytes(self.probe_bytes)} from {self.probe_files:,} files "
                         f"(at most {_bytes(PROBE_MAX_BYTES)} each; no audio content)")
        else:
            lines.append("header probe: no file was opened")
        if show_files:
            lines.append("files:")
            for f in self.files:
                dur = "-" if f.duration_s is None else (
                    f"{'~' if f.duration_source == SRC_ESTIMATE else ''}{f.duration_s:.1f} s ({f.duration_source})")
                lines.append(f"  {f.action:<15}{dur:<28}{f.windows:>6} win  {f.uri}"
                             + (f"  [{f.over_limit}]" if f.over_limit else "")
                             + (f"  [reuses {f.reused_from}]" if f.reused_from else ""))
            for uri in self.removed:
                lines.append(f"  {'remove':<15}{'-':<28}{0:>6} win  {uri}")
        return "\n".join(lines)

    def _removal_line(self) -> str:
        if self.keep_removed:
            return "would remove 0 (--keep-removed: rows of files gone from the listing stay)"
        line = (f"would remove {len(self.removed):,} of {self.indexed_in_scope:,} indexed files in the input's scope "
                f"(gone from the listing)")
        if self.removal_refused:
            line += f"; THE RUN WOULD STOP: {self.removal_refused}"
        return line


    def _speech_line(self) -> str:
        if not self.speech_gate:
            return "speech gate: off (every task generated on every window)"
        line = (f"speech gate: on; {', '.join(self.speech_tasks) or 'no task'} skip windows without speech, "
                f"every task skips digital silence (speech is measured while decoding: the rows above are "
                f"an upper bound)")
        if self.speech_measured and self.speech_measured[1] > 0:
            speech_h, audio_h = self.speech_measured
            line += (f"; files already processed here: {_hours(speech_h)} of speech in {_hours(audio_h)} of "
                     f"audio ({speech_h / audio_h:.0%})")
        return line


def _hours(h: float, unit: str = "h") -> str:
    """Hours for people: '1,234.5 h', '0.278 h', '19 s' (unit 'GPU-h' -> 'GPU-s' for tiny values)."""
    if h != h:  # nan
        return f"? {unit}"
    if 0 < h < 0.01:
        return f"{h * 3600:.2g} {unit[:-1]}s"
    return f"{h:,.1f} {unit}" if h >= 10 else f"{h:.3g} {unit}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------

def n_windows(duration_s: float | None, window_s: float, hop_s: float) -> int:
    """Windows the decoder cuts from ``duration_s`` seconds (the last one may be shorter)."""
    if not duration_s or duration_s <= 0:
        return 0
    return 1 + max(0, math.ceil((duration_s - window_s) / hop_s - 1e-9))


def default_throughput(model: str, n_tasks: int) -> tuple[float, str]:
    """(audio-h per GPU-h for ``n_tasks`` tasks, where the figure comes from)."""
    key = model if model in THROUGHPUT_AUDIO_H_PER_GPU_H else FALLBACK_MODEL
    per_h, bench_tasks = THROUGHPUT_AUDIO_H_PER_GPU_H[key]
    scaled = per_h * bench_tasks / max(1, n_tasks)
    note = f"{THROUGHPUT_SOURCE}: {per_h:g} for {key} with {bench_tasks} tasks"
    if n_tasks != bench_tasks:
        note += f", scaled to {n_tasks}"
    return scaled, note


def plan_run(cfg: Any, *, throughput: float | None = None, probe: str = "auto") -> Plan:
    """The plan the run ``cfg`` (a :class:`pipelines.config.PipelineConfig`) would make, with its
    estimates. The decisions (each file's action, removals, reuse, the guard) are the run's own
    :class:`pipelines.planning.WorkPlan`; this adds the durations and the GPU estimate.
    (With ``cfg.tasks`` empty this needs ``salmonn.default_tasks()``.)"""
    if probe not in ("auto", "always", "never"):
        raise ValueError(f"probe must be auto, always or never, got {probe!r}")
    prep = planning.prepare(cfg, check_out=False)
    ensure_healthy(prep.store)   # the run would refuse a table that lost data files: so does its plan
    with planning.make_plan(prep, hash_local=probe != "never") as work:
        return describe(prep, work, throughput=throughput, probe=probe)


def describe(prep: planning.Prepared, work: planning.WorkPlan, *, throughput: float | None = None,
             probe: str = "auto") -> Plan:
    """The :class:`Plan` of ``work``: its decisions, with durations, windows and GPU hours."""
    cfg = prep.cfg
    indexed = work.indexed
    previous = {row["uri"]: row for row in indexed.select(["uri", "size_bytes", "duration_s", "status"]).to_pylist()}
    kbps = calibrate_kbps(previous.values())
    d = cfg.decode
    window = d.window_s
    hop = d.hop_s if d.hop_s is not None else d.window_s

    # measured durations first; then the header probe for what is left
    durations: dict[str, tuple[float, str]] = {}
    for f in work.files:
        if f.action in (CONFIG_CHANGED, RETRY):
            prev = previous.get(f.ref.uri)
            if prev and prev.get("duration_s") and prev.get("size_bytes") == f.ref.size_bytes:
                durations[f.ref.uri] = (float(prev["duration_s"]), SRC_MEASURED)
    to_probe = [f.ref for f in work.to_process if f.ref.uri not in durations and f.over_limit is None
                and _probe_wanted(f.ref.uri, probe) and extension(f.ref.uri) in HEADER_PARSERS
                and f.ref.size_bytes]
    probe_bytes = 0
    if to_probe:
        with ThreadPoolExecutor(max_workers=min(PROBE_THREADS, len(to_probe))) as pool:
            for r, (dur, nbytes) in zip(to_probe, pool.map(lambda r: probe_file(r.uri, r.size_bytes,
                                                                                 dict(cfg.storage_options)),
                                                           to_probe)):
                probe_bytes += nbytes
                if dur is not None and dur > 0:
                    durations[r.uri] = (dur, SRC_HEADER)

    files = []
    for f in work.files:
        r, a = f.ref, f.action
        if a == UNCHANGED:
            files.append(FilePlan(r.uri, r.size_bytes, a, None, None, 0))
        elif f.reuse is not None:
            source = f.reuse.file
            files.append(FilePlan(r.uri, r.size_bytes, a, source["duration_s"], SRC_MEASURED, 0,
                                  reused_from=source["uri"]))
        elif f.over_limit is not None:
            files.append(FilePlan(r.uri, r.size_bytes, a, None, None, 0, over_limit=f.over_limit))
        else:
            if r.uri in durations:
                dur, src = durations[r.uri]
            else:
                dur, src = estimate_duration(r.uri, r.size_bytes, kbps), SRC_ESTIMATE
            over = None
            if dur is not None and dur > d.max_duration_s:
                # decode never trusts a header: it decodes up to the sample cap (a partial row)
                dur, over = d.max_duration_s, "too_long"
            files.append(FilePlan(r.uri, r.size_bytes, a, dur, src, n_windows(dur, window, hop), over_limit=over))

    names = prep.task_names
    if throughput is None:
        throughput_value, source = default_throughput(cfg.model, len(names))
    else:
        if throughput <= 0:
            raise ValueError(f"throughput must be > 0 audio-h per GPU-h, got {throughput}")
        throughput_value, source = throughput, "set with --throughput"
    plan = Plan(
        input=cfg.input if isinstance(cfg.input, str) else " ".join(cfg.input), out=cfg.out,
        model=cfg.model, tasks=tuple(names), config_hash=prep.config_hash, window_s=window, hop_s=hop,
        files=tuple(files), throughput=throughput_value, throughput_source=source, list_s=work.list_s,
        probe_files=len(to_probe), probe_bytes=probe_bytes,
        speech_gate=bool(cfg.speech_gate), speech_tasks=tuple(t.name for t in prep.tasks if t.needs_speech),
        speech_measured=_speech_measured(indexed),
        removed=work.removals.uris, indexed_in_scope=work.removals.indexed, keep_removed=cfg.keep_removed,
        max_removed=cfg.max_removed, max_removed_files=cfg.max_removed_files, removal_refused=work.refusal,
        reuse_checked=work.reuse_checked, hashed_files=work.hasher.files, hashed_bytes=work.hasher.bytes,
    )
    log.info("plan: %d files listed, %d to process, %.2f audio h", len(files), len(plan.todo), plan.audio_hours())
    return plan


def _speech_measured(files: Any) -> tuple[float, float] | None:
    """(speech h, audio h) of the committed files whose speech was measured (speech gate on)."""
    if files.num_rows == 0:
        return None
    rows = files.select(["speech_s", "duration_s"]).to_pylist()
    measured = [(r["speech_s"], r["duration_s"] or 0.0) for r in rows if r["speech_s"] is not None]
    if not measured:
        return None
    return sum(s for s, _ in measured) / 3600, sum(d for _, d in measured) / 3600


def calibrate_kbps(rows: Any) -> dict[str, float]:
    """Per-extension median bitrate (kbit/s) of earlier ``ok`` files: better than any default."""
    by_ext: dict[str, list[float]] = collections.defaultdict(list)
    for row in rows:
        size, dur = row.get("size_bytes"), row.get("duration_s")
        if row.get("status") == "ok" and size and dur and dur > 0:
            by_ext[extension(row["uri"])].append(size * 8 / 1000 / dur)
    return {ext: statistics.median(v) for ext, v in by_ext.items() if v}


def estimate_duration(uri: str, size_bytes: int | None, kbps: Mapping[str, float] | None = None) -> float | None:
    if not size_bytes:
        return None
    ext = extension(uri)
    rate = (kbps or {}).get(ext) or DEFAULT_KBPS.get(ext, DEFAULT_KBPS_OTHER)
    return size_bytes * 8 / 1000 / rate


def _probe_wanted(uri: str, probe: str) -> bool:
    if probe == "never":
        return False
    if probe == "always":
        return True
    return "://" not in uri or uri.startswith("file://")  # auto: local files only


# ---------------------------------------------------------------------------------------------
# Header probing: durations the container states in its first bytes
# ---------------------------------------------------------------------------------------------

class _Budget(Exception):
    """The header probe would read more than PROBE_MAX_BYTES."""


class CappedReader:
    """A read-only view of a file object that counts and caps the bytes read (seeks are free)."""

    def __init__(self, f: BinaryIO, size: int, cap: int = PROBE_MAX_BYTES):
        self.f, self.size, self.cap, self.nread = f, size, cap, 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = max(0, self.size - self.f.tell())
        if self.nread + n > self.cap:
            raise _Budget(f"header probe would read more than {self.cap} bytes")
        data = self.f.read(n)
        self.nread += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()


def probe_file(uri: str, size: int | None,
               storage_options: Mapping[str, Any] | None = None) -> tuple[float | None, int]:
    """(duration in seconds the header states or None, bytes read). Never raises."""
    parser = HEADER_PARSERS.get(extension(uri))
    if parser is None or not size:
        return None, 0
    reader = None
    try:
        fs, path = url_to_fs(uri, **dict(storage_options or {}))
        with fs.open(path, "rb", block_size=PROBE_BLOCK, cache_type="readahead") as f:
            reader = CappedReader(f, size)
            dur = parser(reader)
        return (dur if dur is not None and math.isfinite(dur) and dur > 0 else None), reader.nread
    except Exception as e:  # noqa: BLE001 - a header we cannot read is estimated from bytes instead
        log.debug("header probe of %s: %s: %s", uri, type(e).__name__, e)
        return None, reader.nread if reader is not None else 0


# Each parser hands the capped reader to mutagen's stream-info reader for its format (never the
# full file types: those also load tags, whose cover art can be megabytes).

def _pcm_length(info: Any, r: CappedReader) -> float:
    """A PCM header's length, cut to what the file can hold (a truncated file keeps its header)."""
    return min(info.length, r.size * 8 / info.bitrate) if info.bitrate else info.length


def _wav(r: CappedReader) -> float | None:
    return _pcm_length(mutagen.wave.WaveStreamInfo(r), r)


def _aiff(r: CappedReader) -> float | None:
    return _pcm_length(mutagen.aiff.AIFFInfo(r), r)


def _flac(r: CappedReader) -> float | None:
    # mutagen.flac.FLAC reads every metadata block (pictures included); STREAMINFO is always the
    # first block, so read just that one: b"fLaC", a 4-byte block header, 34 bytes of STREAMINFO.
    mutagen.mp3.skip_id3(r)  # some taggers put an ID3v2 tag before b"fLaC"
    if r.read(4) != b"fLaC" or r.read(4)[:1] not in (b"\x00", b"\x80"):
        return None
    return mutagen.flac.StreamInfo(r.read(34)).length


def _mp3(r: CappedReader) -> float | None:
    # skips ID3v2 tags by seeking; the frame count of a Xing/Info/VBRI header, else the first
    # frames' bit rate over the file's size
    return mutagen.mp3.MPEGInfo(r).length


def _mp4(r: CappedReader) -> float | None:
    # the atom tree is walked by seeking (mdat is never read); the audio track's mdhd duration,
    # else the movie's mvhd
    return mutagen.mp4.MP4Info(mutagen.mp4.Atoms(r), r).length


HEADER_PARSERS = {
    ".wav": _wav, ".wave": _wav, ".aif": _aiff, ".aiff": _aiff, ".aifc": _aiff, ".flac": _flac,
    ".mp3": _mp3, ".mp2": _mp3, ".m4a": _mp4, ".m4b": _mp4, ".mp4": _mp4, ".m4v": _mp4,
    ".mov": _mp4, ".3gp": _mp4, ".3g2": _mp4,
}


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=1, default=str)
