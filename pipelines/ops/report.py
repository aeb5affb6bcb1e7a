"""`salmonn-pipeline report OUT [--run RUN_ID] [--html FILE]`: look at one run.

Everything comes from the output location itself: the run record (``_runs/<run>/run.json``), the
``files`` and ``segments`` Delta tables (the run's rows as of its last commit, through Delta's
time travel, so files a later run processed again still count for this run), and the time per
stage the driver recorded in the run record from Ray Data's structured stats
(:mod:`pipelines.stage_times`). Nothing is recomputed and no audio is read.

The HTML page is self-contained: plots are matplotlib figures inlined as SVG (text drawn as
paths, so no font is fetched), styles are inline, there is no script and no external reference,
so it opens anywhere without a network. Without ``--html`` the same summary is printed as text.

Per-file wall time is not recorded by the pipeline (files are processed in batches of windows
from many files), so "slowest files" ranks files by the work they cost: generated tokens (the
dominant cost of the SALMONN stage), then windows.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import html
import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import schemas
from pipelines import stage_times
from pipelines.labels import segment_label
from pipelines.output import RUNS_DIR, OutputStore, RunCounts, RunRecord, utcnow
from pipelines.stage_times import StageTime
from schemas.vocabulary import FINISH_SKIPPED

log = logging.getLogger(__name__)

SAMPLE_FILES = 5
SLOWEST_FILES = 10
SAMPLE_TEXT_CHARS = 600
SAMPLE_SEGMENTS = 4           # caption/emotion segments shown per sample file
TINY_MODEL_ID = "tiny-random"
SAMPLE_TASKS = ("transcribe", "caption", "emotion")

STATUS_COLORS = {"ok": "#3a923a", "partial": "#e0a030", "error": "#c83c3c"}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Interval:
    t_h: float             # hours since the run (or its resume) started, at the end of the interval
    audio_h: float         # audio hours committed in the interval
    wall_h: float          # the interval's length

    @property
    def rate(self) -> float:
        return self.audio_h / self.wall_h if self.wall_h > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class Sample:
    uri: str
    status: str
    duration_s: float | None
    run_id: str                    # the run whose results these are (the file's latest)
    transcript: str | None         # transcribe segments joined in time order, shortened
    segments: dict[str, list[tuple[float, float, str, str | None]]]  # other task -> (start, end, text, label)


@dataclasses.dataclass(frozen=True)
class ReportData:
    out: str
    run_id: str
    record: RunRecord
    runs: tuple[str, ...]
    status_counts: dict[str, int]
    error_types: dict[str, int]
    durations_s: tuple[float, ...]
    audio_hours: float
    wall_s: float | None
    segment_rows: int
    tasks: dict[str, int]                  # task -> segment rows in this run
    label_counts: dict[str, int]           # emotion label -> segment rows in this run
    intervals: tuple[Interval, ...]
    stages: tuple[StageTime, ...]
    slowest: tuple[dict[str, Any], ...]
    samples: tuple[Sample, ...]
    latest_counts: dict[str, int]          # archive-wide latest view: status -> files
    model_ids: tuple[str, ...]
    speech_hours: float | None = None      # files.speech_s summed (None: the speech gate was off)
    skipped_rows: dict[str, int] = dataclasses.field(default_factory=dict)   # no_speech / silence -> rows

    @property
    def generations_saved(self) -> float | None:
        """Share of the segment rows the speech gate answered without generating."""
        if not self.segment_rows or self.speech_hours is None:
            return None
        return sum(self.skipped_rows.values()) / self.segment_rows

    @property
    def n_files(self) -> int:
        return sum(self.status_counts.values())

    @property
    def throughput(self) -> float | None:
        """Audio hours per wall hour over the whole run."""
        if not self.wall_s:
            return None
        return self.audio_hours / (self.wall_s / 3600)

    @property
    def is_tiny(self) -> bool:
        return TINY_MODEL_ID in self.model_ids


def collect(out: str, run_id: str | None = None, storage_options: Mapping[str, Any] | None = None, *,
            n_samples: int = SAMPLE_FILES, n_slowest: int = SLOWEST_FILES) -> ReportData:
    """Everything the report shows, for ``run_id`` (default: the newest run under ``out``)."""
    store = OutputStore(out, storage_options)
    runs = store.list_runs()
    if not runs:
        raise FileNotFoundError(f"{out}: no runs (no {RUNS_DIR}/<run>/ here)")
    if run_id is None:
        run_id = runs[-1]
    elif run_id not in runs:
        raise FileNotFoundError(f"{out}: no run {run_id!r}; runs: {', '.join(runs)}")
    record = store.read_run(run_id) or RunRecord(run_id=run_id, status="unknown")
    files = store.read_run_rows("files", run_id)       # as of the run's last commit (time travel)
    segs = store.read_run_rows("segments", run_id)
    frows = files.to_pylist()

    status_counts = collections.Counter(r["status"] for r in frows)
    error_types = collections.Counter(r["error_type"] for r in frows if r["error_type"])
    durations = tuple(float(r["duration_s"]) for r in frows if r["duration_s"])
    audio_h = sum(durations) / 3600
    wall_s = record.counts.wall_s if record.counts is not None else None
    if not wall_s and record.started_at and record.finished_at:
        wall_s = (_ts(record.finished_at) - _ts(record.started_at)).total_seconds()

    seg_cols = segs.select(["file_id", "task", "text", "label", "n_output_tokens", "finish_reason"]).to_pydict()
    speech = [r["speech_s"] for r in frows if r.get("speech_s") is not None]
    skipped = collections.Counter(f for f in seg_cols["finish_reason"] if f in FINISH_SKIPPED)
    tasks = collections.Counter(seg_cols["task"])
    labels = collections.Counter(
        lb for lb in map(_label, seg_cols["task"], seg_cols["text"], seg_cols["label"]) if lb)
    tokens: dict[str, int] = collections.Counter()
    for fid, n in zip(seg_cols["file_id"], seg_cols["n_output_tokens"]):
        tokens[fid] += n or 0

    latest_files = store.read_table("files", columns=["status"])
    return ReportData(
        out=out, run_id=run_id, record=record, runs=tuple(runs),
        status_counts=dict(status_counts), error_types=dict(error_types), durations_s=durations,
        audio_hours=audio_h, wall_s=wall_s, segment_rows=segs.num_rows, tasks=dict(tasks),
        label_counts=dict(labels), intervals=tuple(throughput_intervals(frows, record)),
        stages=tuple(stage_times.from_record(record.stage_times)),
        slowest=tuple(_slowest(frows, tokens, n_slowest)),
        samples=tuple(_samples(store, frows, n_samples)),
        latest_counts=dict(collections.Counter(latest_files["status"].to_pylist())),
        model_ids=tuple(sorted({r["model_id"] for r in frows if r["model_id"]} | (
            {record.model_id} if record.model_id else set()))),
        speech_hours=sum(speech) / 3600 if speech else None, skipped_rows=dict(skipped),
    )


def _label(task: str, text: str | None, label: str | None) -> str | None:
    """The stored label; for rows written before schema version 2 (label null), the same mapping."""
    return label if label is not None else segment_label(task, text)


def _ts(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def throughput_intervals(frows: Sequence[Mapping[str, Any]], record: RunRecord) -> list[Interval]:
    """Audio-h per wall-h between consecutive commits (files of one commit share processed_at).

    The clock starts at the run's start and restarts at each resume, so the hours a run spent
    stopped do not count against it.
    """
    by_commit: dict[dt.datetime, float] = collections.defaultdict(float)
    for r in frows:
        if r["processed_at"] is not None:
            by_commit[_ts(r["processed_at"])] += (r["duration_s"] or 0.0) / 3600
    if not by_commit:
        return []
    starts = sorted(_ts(s) for s in [record.started_at, *record.resumes] if s)
    origin = starts[0] if starts else min(by_commit)
    out, prev = [], origin
    for t in sorted(by_commit):
        restarts = [s for s in starts if prev < s <= t]
        if restarts:
            prev = restarts[-1]
        wall_h = (t - prev).total_seconds() / 3600
        out.append(Interval(t_h=(t - origin).total_seconds() / 3600, audio_h=by_commit[t], wall_h=wall_h))
        prev = t
    return out


def _slowest(frows: Sequence[Mapping[str, Any]], tokens: Mapping[str, int], n: int) -> list[dict[str, Any]]:
    total = sum(tokens.values()) or 1
    rows = [{
        "uri": r["uri"], "status": r["status"], "duration_s": r["duration_s"], "windows": r["n_segments"] or 0,
        "tokens": tokens.get(r["file_id"], 0), "share": tokens.get(r["file_id"], 0) / total,
    } for r in frows]
    rows.sort(key=lambda r: (-r["tokens"], -r["windows"], -(r["duration_s"] or 0), r["uri"]))
    return [r for r in rows if r["tokens"] or r["windows"]][:n]


def _samples(store: OutputStore, frows: Sequence[Mapping[str, Any]], n: int) -> list[Sample]:
    """The latest texts of the first ``n`` files (by URI) of the run that have segments."""
    chosen = sorted((r for r in frows if r["n_segments"]), key=lambda r: r["uri"])[:n]
    if not chosen:
        return []
    wanted = {r["file_id"] for r in chosen}
    latest = store.read_table("segments", file_ids=wanted)
    by_file: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for row in latest.select(["file_id", "start_s", "end_s", "task", "text", "label", "run_id"]).to_pylist():
        by_file[row["file_id"]].append(row)
    out = []
    for r in chosen:
        rows = sorted(by_file.get(r["file_id"], []), key=lambda x: x["start_s"])
        transcript = None
        if any(x["task"] == "transcribe" for x in rows):
            transcript = _shorten(" ".join((x["text"] or "").strip() for x in rows if x["task"] == "transcribe"),
                                  SAMPLE_TEXT_CHARS)
        segments: dict[str, list[tuple[float, float, str, str | None]]] = {}
        for task in _task_order({x["task"] for x in rows} - {"transcribe"}):
            segments[task] = [(x["start_s"], x["end_s"], _shorten((x["text"] or "").strip(), 200),
                               _label(x["task"], x["text"], x["label"]))
                              for x in rows if x["task"] == task][:SAMPLE_SEGMENTS]
        run = rows[0]["run_id"] if rows else r["run_id"]
        out.append(Sample(r["uri"], r["status"], r["duration_s"], run, transcript, segments))
    return out


def _task_order(tasks: set[str]) -> list[str]:
    return sorted(tasks, key=lambda t: (SAMPLE_TASKS.index(t) if t in SAMPLE_TASKS else len(SAMPLE_TASKS), t))


def _clock(s: float) -> str:
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _shorten(text: str, n: int) -> str:
    """One line of printable text (model output can hold control characters), at most ``n`` long."""
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return text if len(text) <= n else text[: n - 1].rstrip() + "\u2026"


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------

def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _counts(c: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


_PHASES = {"list": "listing", "ledger": "ledger", "reuse": "content keys and reuse sources",
           "remove": "removals", "reuse_commit": "reused files", "ray_init": "Ray start", "graph": "decode + inference",
           "finish": "compaction", "index": "search index"}


def _phases_line(counts: RunCounts | None) -> list[str]:
    """Where the driver's wall time went (``counts.phases_s`` of the run record; none in records
    of runs before it was kept)."""
    phases = counts.phases_s if counts is not None else {}
    if counts is None or not phases:
        return []
    parts = []
    for key in [*_PHASES, *sorted(set(phases) - set(_PHASES))]:     # in the order they run
        if key in phases:
            commits = f" (commits {_fmt_s(counts.commit_s)})" if key == "graph" else ""
            parts.append(f"{_PHASES.get(key, key)} {_fmt_s(phases[key])}{commits}")
    return ["  of which: " + ", ".join(parts)]


def render_text(d: ReportData) -> str:
    rec = d.record
    counts = rec.counts
    lines = []
    if d.is_tiny:
        lines.append("NOTE: model tiny-random has RANDOM weights: the texts below are meaningless.")
    lines += [
        f"run {d.run_id} ({rec.status}) under {d.out}",
        f"  started {rec.started_at or '?'}  finished {rec.finished_at or '-'}"
        + (f"  resumed x{len(rec.resumes)}" if rec.resumes else ""),
        f"  model {rec.model or '?'} ({', '.join(d.model_ids) or '?'}), config {rec.config_hash or '?'}, "
        f"tasks {', '.join(t['name'] for t in rec.tasks) or ', '.join(sorted(d.tasks)) or '?'}",
        f"files: {d.n_files} processed ({_counts(d.status_counts)})"
        + (f", {counts.skipped} skipped as unchanged" if counts is not None else "")
        + (f", {counts.n_inputs} inputs" if counts is not None else ""),
        f"archive changes: {rec.removed} removed (gone from the input's scope), "
        f"{rec.reused} reused (moved or copied: the results of the same content, copied without "
        f"decoding or generating)",
        f"error types: {_counts(d.error_types)}",
        f"audio: {d.audio_hours:.3f} h in {len(d.durations_s)} files"
        + (f" (median {_fmt_s(_median(d.durations_s))}, longest {_fmt_s(max(d.durations_s))})"
           if d.durations_s else ""),
        f"wall: {_fmt_s(d.wall_s)}"
        + (f" -> {d.throughput:.1f} audio-h per wall-h" if d.throughput is not None else ""),
        *_phases_line(counts),
        f"segment rows: {d.segment_rows} ({_counts(d.tasks)})",
        _speech_line(d),
    ]
    if d.label_counts:
        lines.append(f"emotion labels: {_counts(d.label_counts)}")
    if d.intervals:
        rates = [i.rate for i in d.intervals if i.wall_h > 0]
        if rates:
            lines.append(f"throughput between commits: min {min(rates):.1f}, max {max(rates):.1f} audio-h per wall-h "
                         f"over {len(d.intervals)} commits")
    if d.stages:
        lines.append("time per stage (Ray Data; operator wall time / sum of task time):")
        for s in d.stages:
            lines.append(f"  {s.name:<48} {_fmt_s(s.wall_s):>10} / {_fmt_s(s.task_s):>10}  ({s.tasks} tasks)")
    else:
        lines.append("time per stage: no Ray Data stats recorded for this run")
    if d.slowest:
        lines.append("slowest files (by generated tokens, the dominant cost; per-file time is not recorded):")
        for r in d.slowest:
            lines.append(f"  {r['tokens']:>8} tok {r['windows']:>4} win {_fmt_s(r['duration_s']):>9}  "
                         f"{r['share']:>6.1%}  {r['status']:<7} {r['uri']}")
    if d.samples:
        lines.append("samples (latest results):")
        for s in d.samples:
            lines.append(f"  {s.uri}  [{s.status}, {_fmt_s(s.duration_s)}, run {s.run_id}]")
            if s.transcript is not None:
                lines.append(f"    transcribe: {s.transcript}")
            for task, segs in s.segments.items():
                lines.append(f"    {task}: " + " | ".join(
                    f"[{_clock(a)}] {t}" + (f" ({lb})" if lb else "") for a, _b, t, lb in segs))
    lines.append(f"archive (latest result of each file, {len(d.runs)} run{'s' if len(d.runs) != 1 else ''}): "
                 f"{_counts(d.latest_counts)}")
    return "\n".join(lines)


def _speech_line(d: ReportData) -> str:
    if d.speech_hours is None or d.generations_saved is None:
        return "speech gate: off (every task generated on every window)"
    share = d.speech_hours / d.audio_hours if d.audio_hours else 0.0
    return (f"speech: {d.speech_hours:.3f} h of {d.audio_hours:.3f} audio h ({share:.0%}); generations saved by "
            f"the speech gate: {sum(d.skipped_rows.values())} of {d.segment_rows} rows ({d.generations_saved:.0%}: "
            f"{_counts(d.skipped_rows)})")


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


# ---------------------------------------------------------------------------------------------
# HTML with inline SVG plots
# ---------------------------------------------------------------------------------------------

def _svg(fig: Any) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path"}):  # text as paths: no font needed to view
        fig.savefig(buf, format="svg", bbox_inches="tight",
                    metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: inline SVG in HTML5


def _figure(width: float = 6.4, height: float = 3.4) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    return Figure(figsize=(width, height), layout="constrained")


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#777")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_status(d: ReportData) -> str:
    fig = _figure(7.2, 3.4)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 1.6])
    names = [s for s in schemas.STATUSES if d.status_counts.get(s)] or list(schemas.STATUSES)
    vals = [d.status_counts.get(s, 0) for s in names]
    bars = ax1.bar(names, vals, color=[STATUS_COLORS.get(s, "#888") for s in names])
    ax1.bar_label(bars)
    ax1.set_title("files by status")
    ax1.set_ylabel("files")
    ax1.margins(y=0.15)
    if d.error_types:
        items = sorted(d.error_types.items(), key=lambda kv: (kv[1], kv[0]))
        b = ax2.barh([k for k, _ in items], [v for _, v in items], color="#c83c3c")
        ax2.bar_label(b, padding=2)
        ax2.set_title("error and partial files by error type")
        ax2.set_xlabel("files")
        ax2.margins(x=0.15)
    else:
        ax2.set_title("error types")
        _empty(ax2, "no errors")
    return _svg(fig)


def plot_durations(d: ReportData) -> str:
    fig = _figure()
    ax = fig.subplots()
    if d.durations_s:
        longest = max(d.durations_s)
        scale, unit = (60.0, "min") if longest > 600 else (1.0, "s")
        ax.hist([x / scale for x in d.durations_s], bins=min(30, max(5, len(d.durations_s))), color="#4a78b0",
                edgecolor="white")
        ax.set_xlabel(f"decoded duration ({unit})")
        ax.set_ylabel("files")
    else:
        _empty(ax, "no decoded audio in this run")
    ax.set_title("audio duration per file")
    return _svg(fig)


def plot_throughput(d: ReportData) -> str:
    fig = _figure()
    ax = fig.subplots()
    pts = [i for i in d.intervals if i.wall_h > 0]
    if pts:
        minutes = max(i.t_h for i in pts) < 2
        scale, unit = (60.0, "min") if minutes else (1.0, "h")
        # one flat segment per interval between commits: the rate the run kept during it
        for k, iv in enumerate(pts):
            ax.plot([(iv.t_h - iv.wall_h) * scale, iv.t_h * scale], [iv.rate, iv.rate], color="#4a78b0",
                    linewidth=2.5, solid_capstyle="butt", label="between commits" if k == 0 else None)
        if d.throughput is not None:
            ax.axhline(d.throughput, color="#c87a30", linestyle="--", label=f"whole run: {d.throughput:.1f}")
        ax.set_xlabel(f"wall time since start ({unit})")
        ax.set_ylabel("audio-h per wall-h")
        ax.set_xlim(left=0)
        ax.set_ylim(0, 1.25 * max([i.rate for i in pts] + [d.throughput or 0.0]))
        ax.legend(loc="lower right")
    else:
        _empty(ax, "no commits with timestamps")
    ax.set_title("throughput over the run")
    return _svg(fig)


def plot_stages(d: ReportData) -> str:
    fig = _figure(6.4, max(3.4, 1.4 + 0.6 * len(d.stages)))
    ax = fig.subplots()
    if d.stages:
        import numpy as np

        names = [_shorten(s.name, 40) for s in d.stages][::-1]
        y = np.arange(len(names))
        wall = [s.wall_s for s in d.stages][::-1]
        task = [s.task_s for s in d.stages][::-1]
        unit, scale = ("min", 60.0) if max(wall + task) > 600 else ("s", 1.0)
        b1 = ax.barh(y + 0.2, [w / scale for w in wall], height=0.38, color="#4a78b0", label="operator wall time")
        b2 = ax.barh(y - 0.2, [t / scale for t in task], height=0.38, color="#9ab8d8", label="sum of task time")
        ax.bar_label(b1, fmt="%.1f", padding=2)
        ax.bar_label(b2, fmt="%.1f", padding=2)
        ax.set_yticks(y, names)
        ax.set_xlabel(unit)
        ax.margins(x=0.15)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18 - 0.1 / max(1, len(names))), ncol=2, frameon=False)
    else:
        _empty(ax, "no Ray Data stats recorded for this run")
    ax.set_title("time per stage (Ray Data)")
    return _svg(fig)


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:13px} .warn{background:#fff3cd;border:1px solid #e0c060;padding:8px 12px;margin:12px 0}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:22px} .card span{font-size:12px;color:#555}
.ok b{color:#3a923a} .partial b{color:#c88a10} .error b{color:#c83c3c}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:16px}
.plot{border:1px solid #eee;border-radius:6px;padding:6px} .plot svg{width:100%;height:auto}
table{border-collapse:collapse;font-size:13px;width:100%} td,th{border-bottom:1px solid #eee;padding:4px 6px;
text-align:left;vertical-align:top} th{background:#f6f6f6} td.n{text-align:right;font-variant-numeric:tabular-nums}
.sample{border:1px solid #eee;border-radius:6px;padding:8px 12px;margin:10px 0}
.sample .uri{font-family:monospace;font-size:13px} .task{font-weight:600;color:#4a78b0}
.label{display:inline-block;background:#e6ecfa;border-radius:10px;padding:0 7px;font-size:12px;color:#335}
.seg{margin-right:10px} .t{font-family:monospace;font-size:12px;color:#888}
"""


def render_html(d: ReportData) -> str:
    e = html.escape
    rec = d.record
    counts = rec.counts
    cards = [
        ("files processed", d.n_files, ""),
        ("ok", d.status_counts.get("ok", 0), "ok"),
        ("partial", d.status_counts.get("partial", 0), "partial"),
        ("error", d.status_counts.get("error", 0), "error"),
    ]
    if counts is not None:
        cards.append(("skipped (unchanged)", counts.skipped, ""))
        cards += [("removed (gone)", counts.removed, ""), ("reused (moved, copied)", counts.reused, "")]
    cards += [
        ("audio hours", f"{d.audio_hours:.3f}", ""),
        ("wall time", _fmt_s(d.wall_s), ""),
        ("audio-h per wall-h", f"{d.throughput:.1f}" if d.throughput is not None else "-", ""),
        ("segment rows", d.segment_rows, ""),
    ]
    if d.speech_hours is not None:
        cards += [("speech hours", f"{d.speech_hours:.3f}", ""),
                  ("generations saved", f"{d.generations_saved:.0%}" if d.generations_saved is not None else "-", "")]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>salmonn-pipeline report: run {e(d.run_id)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>salmonn-pipeline run {e(d.run_id)}</h1>",
        f'<div class="meta">{e(d.out)} &middot; status <b>{e(rec.status)}</b> &middot; '
        f'started {e(rec.started_at or "?")} &middot; finished {e(rec.finished_at or "-")}'
        + (f" &middot; resumed {len(rec.resumes)}&times;" if rec.resumes else "")
        + f'<br>model {e(rec.model or "?")} ({e(", ".join(d.model_ids) or "?")}) &middot; config '
        f'{e(rec.config_hash or "?")} &middot; tasks '
        f'{e(", ".join(t["name"] for t in rec.tasks) or ", ".join(sorted(d.tasks)))}</div>',
    ]
    if d.is_tiny:
        parts.append('<div class="warn">Model <b>tiny-random</b> has random weights: every text in this run is '
                     "meaningless. It exercises the pipeline only.</div>")
    parts.append('<div class="cards">' + "".join(
        f'<div class="card {cls}"><b>{e(str(v))}</b><span>{e(k)}</span></div>' for k, v, cls in cards) + "</div>")
    parts.append('<h2>Plots</h2><div class="plots">')
    for title, svg in (("files by status and error type", plot_status(d)),
                       ("audio duration histogram", plot_durations(d)),
                       ("throughput over the run", plot_throughput(d)),
                       ("time per stage", plot_stages(d))):
        parts.append(f'<div class="plot" title="{e(title)}">{svg}</div>')
    parts.append("</div>")

    parts.append("<h2>Counts</h2><table><tr><th>what</th><th>count</th></tr>")
    for k, v in sorted(d.status_counts.items()):
        parts.append(f'<tr><td>files {e(k)}</td><td class="n">{v}</td></tr>')
    for k, v in sorted(d.error_types.items(), key=lambda kv: (-kv[1], kv[0])):
        parts.append(f'<tr><td>error type {e(k)}</td><td class="n">{v}</td></tr>')
    for k, v in sorted(d.tasks.items()):
        parts.append(f'<tr><td>segment rows, task {e(k)}</td><td class="n">{v}</td></tr>')
    for k, v in sorted(d.label_counts.items(), key=lambda kv: (-kv[1], kv[0])):
        parts.append(f'<tr><td>emotion label {e(k)}</td><td class="n">{v}</td></tr>')
    runs = f"{len(d.runs)} run{'s' if len(d.runs) != 1 else ''}"
    for k, v in sorted(d.latest_counts.items()):
        parts.append(f'<tr><td>archive latest view ({runs}): files {e(k)}</td><td class="n">{v}</td></tr>')
    parts.append("</table>")

    parts.append("<h2>Slowest files</h2><p class=\"meta\">Ranked by generated tokens (the dominant cost of "
                 "the SALMONN stage); the pipeline does not record wall time per file.</p>")
    if d.slowest:
        parts.append("<table><tr><th>file</th><th>status</th><th>duration</th><th>windows</th>"
                     "<th>generated tokens</th><th>share of run</th></tr>")
        for r in d.slowest:
            parts.append(f"<tr><td>{e(r['uri'])}</td><td>{e(r['status'])}</td><td class=\"n\">"
                         f"{e(_fmt_s(r['duration_s']))}</td><td class=\"n\">{r['windows']}</td>"
                         f"<td class=\"n\">{r['tokens']}</td><td class=\"n\">{r['share']:.1%}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No file produced segments.</p>")

    parts.append("<h2>Sample results (latest)</h2>")
    if not d.samples:
        parts.append("<p>No file of this run has segments.</p>")
    for s in d.samples:
        parts.append(f'<div class="sample"><div class="uri">{e(s.uri)}</div><div class="meta">{e(s.status)}, '
                     f"{e(_fmt_s(s.duration_s))}, from run {e(s.run_id)}</div>")
        if s.transcript is not None:
            parts.append(f'<div><span class="task">transcribe</span>: {e(s.transcript) or "<i>(empty)</i>"}</div>')
        for task, segs in s.segments.items():
            parts.append(f'<div><span class="task">{e(task)}</span>: ' + " ".join(
                f'<span class="seg"><span class="t">{_clock(a)}</span> {e(t) or "<i>(empty)</i>"}'
                + (f' <span class="label">{e(lb)}</span>' if lb else "") + "</span>" for a, _b, t, lb in segs)
                + "</div>")
        parts.append("</div>")
    parts.append(f'<p class="meta">Generated by salmonn-pipeline report at {e(utcnow().isoformat())}. '
                 "Self-contained: no scripts, no external resources.</p></body></html>")
    return "\n".join(parts)


def write_html(d: ReportData, path: str) -> str:
    import fsspec

    page = render_html(d)
    with fsspec.open(path, "w", encoding="utf-8") as f:
        f.write(page)
    log.info("wrote report %s (%d bytes)", path, len(page))
    return path
