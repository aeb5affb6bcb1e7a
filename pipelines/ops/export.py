"""`salmonn-pipeline export OUT --format srt|vtt|jsonl|txt --task transcribe --to DIR`.

One file per input from the *latest* result of each file (the rows of the ``segments`` Delta
table, ``OutputStore.read_table``), so text of a superseded run never leaks into an export.
Segments are written in time order with their timestamps:

* ``srt``    SubRip cues ``HH:MM:SS,mmm --> HH:MM:SS,mmm``;
* ``vtt``    WebVTT (``WEBVTT`` header, ``HH:MM:SS.mmm`` cues); with ``word_timestamps``
             (``--vtt-word-timestamps``) every word of a timed cue but its first is preceded by
             its start as a timestamp tag (``Hello <00:00:01.240>world``, WebVTT's karaoke style);
* ``jsonl``  one JSON object per segment with Lhotse ``SupervisionSegment`` field names
             (``id``, ``recording_id``, ``start``, ``duration``, ``channel``, ``text``, ``language``,
             ``alignment``, ``custom``), so ``lhotse.SupervisionSet.from_jsonl`` and similar tools
             read it; the pipeline's own columns go under ``custom``. A timed row (schema v5
             ``words``) carries ``alignment: {"word": [[word, start, duration, probability], ...]}``,
             Lhotse's ``AlignmentItem`` (symbol, start, duration, score) with ``start`` in seconds of
             the recording, as Lhotse's alignments are;
* ``txt``    the texts, one segment per line, in time order.

Subtitle cues (srt, vtt): rows with word timings (``segments.words``, non-empty) are cut into
cues the way captioners cut them (:mod:`pipelines.subtitles`: at most 42 characters a line, 2
lines, 7 s, ~20 characters a second, split at sentence ends, pauses and commas, lines broken at
the best place), across window boundaries; rows without words keep one cue per window, their
text as it is. No two cues overlap (where windows overlap, words of a window are kept up to the
next window's start).

Output names: ``<stem>.<ext>``, under the input's directory relative to the common directory of
all exported inputs (so ``a/x.mp3`` and ``b/x.mp3`` do not collide); two inputs with the same
stem in one directory (``x.mp3``, ``x.wav``) keep their extension (``x.mp3.srt``), until no two
names are the same (``x.mp3`` and ``x.mp3.wav`` -> ``x.mp3.srt``, ``x.mp3.wav.srt``), also on a
case-insensitive file system; names that would still clash get ``~`` and a part of their file id.
Object keys are arbitrary strings: a key's ``..`` components become ``__``, ``\\`` separates like
``/``, control characters become ``_``, so every path written stays under ``--to``. Segments with
no text (e.g. skipped silence) are left out of subtitle formats.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import posixpath
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import fsspec

from pipelines import subtitles
from pipelines.labels import segment_label
from pipelines.output import OutputStore
from pipelines.sources import file_id_for
from salmonn.text import clean_text

log = logging.getLogger(__name__)

FORMATS = ("srt", "vtt", "jsonl", "txt")


@dataclasses.dataclass(frozen=True)
class Segment:
    file_id: str
    uri: str
    segment_index: int
    start_s: float
    end_s: float
    task: str
    text: str | None
    label: str | None
    run_id: str
    model_id: str | None
    words: Sequence[Mapping[str, Any]] | None = None   # v5: word timings (absolute); None: not timed
    language: str | None = None                        # v5: Whisper's language code of the window
    language_prob: float | None = None

    @property
    def timed(self) -> bool:
        """Whether the row has words to cut cues from (an empty list is timed, but shows nothing
        a window cue would not: such a row keeps its window cue)."""
        return bool(self.words)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    files: tuple[str, ...]      # written paths
    segments: int               # segments written
    inputs: int                 # inputs that had segments for the task
    skipped_empty: int          # segments left out for having no text

    def format(self, fmt: str, task: str, to: str) -> str:
        return (f"exported {self.segments} {task} segments of {self.inputs} inputs as {fmt} to {to} "
                f"({len(self.files)} files" + (f", {self.skipped_empty} empty segments left out" if self.skipped_empty
                                               else "") + ")")


# ---------------------------------------------------------------------------------------------
# Timestamps and cue text
# ---------------------------------------------------------------------------------------------

def _hmsms(seconds: float) -> tuple[int, int, int, int]:
    ms_total = max(0, round(seconds * 1000))
    h, rem = divmod(ms_total, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return h, m, s, ms


def srt_time(seconds: float) -> str:
    h, m, s, ms = _hmsms(seconds)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def vtt_time(seconds: float) -> str:
    h, m, s, ms = _hmsms(seconds)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def cue_text(text: str) -> str:
    """Text safe inside a cue: no control characters (a NUL ends ffmpeg's parse of the file; tables
    written before the engines cleaned their answers may hold them), no blank lines (they end a
    cue), no '-->' (it starts a timing)."""
    text, _ = clean_text(text)
    lines = [re.sub(r"[ \t]+", " ", ln).strip() for ln in text.split("\n")]
    return "\n".join(ln for ln in lines if ln).replace("-->", "\u2192")


def vtt_escape(text: str) -> str:
    """Text as WebVTT cue text: ``&``, ``<`` and ``>`` as character references (``<`` would
    start a tag)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ---------------------------------------------------------------------------------------------
# Cues: one input's segments (time order) -> subtitle cues
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ExportCue:
    cue: subtitles.Cue
    ident: str          # WebVTT cue identifier: "<task>-<segment_index>" (-<n> for word cues)


def _window_words(segments: Sequence[Segment]) -> list[tuple[Segment, list[Mapping[str, Any]]]]:
    """Each timed row with its words, a window's words kept up to the next window's start (so
    overlapping windows, hop < window, show no word twice)."""
    out = []
    for k, s in enumerate(segments):
        words = [w for w in s.words or () if w.get("start_s") is not None]
        if k + 1 < len(segments) and segments[k + 1].start_s < s.end_s:
            words = [w for w in words if w["start_s"] < segments[k + 1].start_s]
        out.append((s, words))
    return out


def build_export_cues(segments: Sequence[Segment], **cue_options: Any) -> list[ExportCue]:
    """The subtitle cues of one input's segments (time order): consecutive timed rows' words cut
    into cues with :func:`pipelines.subtitles.build_cues` (``cue_options`` are its keyword
    arguments), every other row one cue of its window; none overlapping."""
    out: list[ExportCue] = []
    run: list[tuple[Segment, list[Mapping[str, Any]]]] = []

    def flush() -> None:
        words = [w for _, ws in run for w in ws]
        counts: collections.Counter[int] = collections.Counter()
        for cue in subtitles.build_cues(words, **cue_options):
            owner = next((s for s, _ in reversed(run) if s.start_s <= cue.start_s), run[0][0])
            counts[owner.segment_index] += 1
            out.append(ExportCue(cue, f"{owner.task}-{owner.segment_index}-{counts[owner.segment_index]}"))
        run.clear()

    for s, words in _window_words(segments):
        if s.timed:
            run.append((s, words))
            continue
        if run:
            flush()
        text = cue_text(s.text or "")
        if text:
            out.append(ExportCue(subtitles.Cue(s.start_s, s.end_s, tuple(text.split("\n")), ()),
                                 f"{s.task}-{s.segment_index}"))
    if run:
        flush()
    # window cues meet word cues: no overlap (contiguous windows stay contiguous)
    ordered = sorted(out, key=lambda c: c.cue.start_s)
    separated = subtitles.separate([c.cue for c in ordered], min_gap_s=0.0)
    return [dataclasses.replace(c, cue=cue) for c, cue in zip(ordered, separated)]


# ---------------------------------------------------------------------------------------------
# Writers: one input's segments (time order) -> file content
# ---------------------------------------------------------------------------------------------

def to_srt(segments: Sequence[Segment], **cue_options: Any) -> str:
    cues = []
    for n, c in enumerate(build_export_cues(segments, **cue_options), 1):
        cues.append(f"{n}\n{srt_time(c.cue.start_s)} --> {srt_time(c.cue.end_s)}\n{c.cue.text}\n")
    return "\n".join(cues)


def to_vtt(segments: Sequence[Segment], *, word_timestamps: bool = False, **cue_options: Any) -> str:
    """WebVTT; ``word_timestamps``: a timestamp tag before each word of a timed cue but its first."""
    cues = ["WEBVTT\n"]
    for c in build_export_cues(segments, **cue_options):
        if word_timestamps and c.cue.words:
            lines = subtitles.timed_lines(c.cue, vtt_time, escape=vtt_escape)
        else:
            lines = tuple(vtt_escape(line) for line in c.cue.lines)
        cues.append(f"{c.ident}\n{vtt_time(c.cue.start_s)} --> {vtt_time(c.cue.end_s)}\n" + "\n".join(lines) + "\n")
    return "\n".join(cues)


def lhotse_word_alignment(words: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Word timings as Lhotse ``AlignmentItem`` lists ``[symbol, start, duration, score]``: the
    word without its surrounding spaces, its start in seconds of the recording, its duration and
    its probability (None where there is none). Words without a time or text are left out."""
    out: list[list[Any]] = []
    for w in words:
        text = " ".join(clean_text(w.get("word") or "")[0].split())
        if not text or w.get("start_s") is None:
            continue
        start = float(w["start_s"])
        end = float(w["end_s"]) if w.get("end_s") is not None else start
        prob = w.get("probability")
        out.append([text, round(start, 6), round(max(0.0, end - start), 6),
                    None if prob is None else round(float(prob), 6)])
    return out


def to_jsonl(segments: Sequence[Segment], recording_id: str) -> str:
    rows = []
    for s in segments:
        custom: dict[str, Any] = {"uri": s.uri, "file_id": s.file_id, "segment_index": s.segment_index,
                                  "end": s.end_s, "task": s.task, "run_id": s.run_id, "model_id": s.model_id}
        if s.label is not None:
            custom["label"] = s.label
        if s.language_prob is not None:
            custom["language_prob"] = round(float(s.language_prob), 6)
        row: dict[str, Any] = {
            "id": f"{recording_id}-{s.task}-{s.segment_index:05d}",
            "recording_id": recording_id,
            "start": round(s.start_s, 6),
            "duration": round(s.end_s - s.start_s, 6),
            "channel": 0,
            "text": s.text,
        }
        if s.language is not None:
            row["language"] = s.language
        if s.words is not None:
            row["alignment"] = {"word": lhotse_word_alignment(s.words)}
        row["custom"] = custom
        rows.append(json.dumps(row, ensure_ascii=False))
    return "".join(r + "\n" for r in rows)


def to_txt(segments: Sequence[Segment]) -> str:
    lines = (" ".join(clean_text(s.text or "")[0].split()) for s in segments)
    return "".join(line + "\n" for line in lines if line)


# ---------------------------------------------------------------------------------------------
# Naming
# ---------------------------------------------------------------------------------------------

_MAX_COMPONENT_BYTES = 200   # file systems take 255 per name: room for ".mp3", "~<id>" and ".jsonl"
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")   # NUL and the other control characters


def _path_of(uri: str) -> str:
    """The path part of a URI (protocol and bucket kept as a directory for remote URIs)."""
    return uri.split("://", 1)[1] if "://" in uri else uri


def _components(uri: str) -> list[str]:
    """The path of ``uri`` as components that are safe to write under a directory: ``\\`` is a
    separator too, empty and ``.`` components go, ``..`` becomes ``__``, control characters
    (NUL included) become ``_``, and a component too long for a file system is cut and given
    a hash of itself."""
    out = []
    for c in _path_of(uri).replace("\\", "/").split("/"):
        if c in ("", "."):
            continue
        c = "__" if c == ".." else _UNSAFE.sub("_", c)
        if len(c.encode("utf-8")) > _MAX_COMPONENT_BYTES:
            digest = hashlib.sha1(c.encode("utf-8")).hexdigest()[:8]
            c = c.encode("utf-8")[:_MAX_COMPONENT_BYTES - 9].decode("utf-8", "ignore") + "~" + digest
        out.append(c)
    return out


def _clash_key(name: str) -> str:
    """Names that one file system could store as one file (case-insensitive, Unicode-normalising
    ones: macOS, Windows) clash."""
    return unicodedata.normalize("NFC", name).casefold()


def _clashes(names: Mapping[str, str]) -> list[list[str]]:
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for uri, name in names.items():
        groups[_clash_key(name)].append(uri)
    return [members for members in groups.values() if len(members) > 1]


def output_names(uris: Iterable[str]) -> dict[str, str]:
    """uri -> relative output name without the format extension (see the module docstring).

    Every name stays under the export directory (no absolute path, no ``..``) and no two are
    the same, also on a case-insensitive file system: inputs whose names clash keep their
    extension (``x.mp3``, ``x.wav``), again until nothing clashes (``x.mp3`` and ``x.mp3.wav``),
    and names that still clash get ``~`` and their file id's first hex digits."""
    uris = sorted(set(uris))
    if not uris:
        return {}
    parts = {u: _components(u) or ["unnamed"] for u in uris}
    dirs = [p[:-1] for p in parts.values()]
    common = 0
    while all(len(d) > common and d[common] == dirs[0][common] for d in dirs):
        common += 1
    full = {u: "/".join(p[common:]) for u, p in parts.items()}
    names = {u: posixpath.join(posixpath.dirname(full[u]), posixpath.splitext(posixpath.basename(full[u]))[0]
                               or posixpath.basename(full[u])) for u in uris}
    digits = 8
    while groups := _clashes(names):
        restored = False
        for members in groups:
            for u in members:
                if names[u] != full[u]:
                    names[u], restored = full[u], True
        if restored:
            continue
        for members in groups:
            for u in members:
                names[u] = f"{full[u]}~{file_id_for(u)[:digits]}"
        digits += 8
        if digits > 16:
            for members in _clashes(names):
                for i, u in enumerate(sorted(members)):
                    names[u] = f"{names[u]}~{i}"
            break
    for u in uris:
        if names[u] != posixpath.splitext(full[u])[0]:
            log.warning("%s: another input has the same name; writing %s.<format>", u, names[u])
    return names


def _inside(root: str, path: str) -> bool:
    root = posixpath.normpath(root or "/")
    return posixpath.commonpath([root, posixpath.normpath(path)]) == root


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

def latest_segments(out: str, task: str, *, where: str | None = None, run_id: str | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> dict[str, list[Segment]]:
    """uri -> the task's segments of the file's latest result, in time order."""
    import pyarrow.compute as pc

    store = OutputStore(out, storage_options)
    # the latest view; with run_id, that run's rows as of its last commit (Delta time travel)
    table = store.read_run_rows("segments", run_id) if run_id else store.read_table("segments")
    table = table.filter(pc.equal(table["task"], task))
    if where:
        table = table.filter(pc.starts_with(table["uri"], where))
    by_uri: dict[str, list[Segment]] = collections.defaultdict(list)
    cols = [f.name for f in dataclasses.fields(Segment)]
    for row in table.select(cols).to_pylist():
        if row["label"] is None:  # rows written before schema version 2: the same mapping
            row["label"] = segment_label(row["task"], row["text"])
        if row["words"] is not None:
            row["words"] = tuple(row["words"])
        by_uri[row["uri"]].append(Segment(**row))
    for segs in by_uri.values():
        segs.sort(key=lambda s: (s.start_s, s.segment_index))
    return dict(by_uri)


def export(out: str, *, fmt: str, task: str, to: str, where: str | None = None, run_id: str | None = None,
           storage_options: Mapping[str, Any] | None = None,
           to_storage_options: Mapping[str, Any] | None = None, word_timestamps: bool = False,
           cue_options: Mapping[str, Any] | None = None) -> ExportResult:
    """Write one ``fmt`` file per input under ``to``; see the module docstring.

    ``word_timestamps``: vtt only, word timestamp tags in timed cues. ``cue_options``: keyword
    arguments of :func:`pipelines.subtitles.build_cues` (``max_line``, ``max_cps``, ...)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if word_timestamps and fmt != "vtt":
        raise ValueError("word timestamps are a WebVTT feature: use them with format vtt")
    options = dict(cue_options or {})
    by_uri = latest_segments(out, task, where=where, run_id=run_id, storage_options=storage_options)
    if not by_uri:
        log.warning("no %s segments under %s%s", task, out, f" for URIs starting with {where!r}" if where else "")
    names = output_names(by_uri)
    fs, root = fsspec.core.url_to_fs(to, **dict(to_storage_options or {}))
    root = root.rstrip("/") or "/"
    written, n_segments, skipped = [], 0, 0
    for uri in sorted(by_uri):
        segs = by_uri[uri]
        if fmt in ("srt", "vtt"):
            kept = [s for s in segs if s.timed or (s.text and cue_text(s.text))]   # a cue needs text to show
            skipped += len(segs) - len(kept)
            segs = kept
        if not segs:
            continue
        rec_id = names[uri]
        if fmt == "srt":
            content = to_srt(segs, **options)
        elif fmt == "vtt":
            content = to_vtt(segs, word_timestamps=word_timestamps, **options)
        elif fmt == "jsonl":
            content = to_jsonl(segs, rec_id)
        else:
            content = to_txt(segs)
        path = posixpath.join(root, f"{rec_id}.{fmt}")
        if not _inside(root, path):   # output_names never makes such a name; never write one
            raise ValueError(f"export name {rec_id!r} of {uri} would leave {to}")
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with fs.open(path, "w", encoding="utf-8") as f:
            f.write(content)
        written.append(path)
        n_segments += len(segs)
    return ExportResult(files=tuple(written), segments=n_segments, inputs=len(by_uri), skipped_empty=skipped)
