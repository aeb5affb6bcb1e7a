"""The search index's documents: fields, analyzers, and how one ``segments`` row becomes one
document.

A document is one ``segments`` row with text (a window of one task of one file). Its fields:

==============  ===========================  =====================================================
field           indexed as                   for
==============  ===========================  =====================================================
kind            raw term                     ``window`` documents; the reserved ``state`` document
file_id         raw term, stored             delete by file (re-index, removal); the hit
uri             raw term, stored             ``uri_prefix`` filter (terms with that prefix)
task            raw term, stored             ``task`` filter
language        raw term, stored             ``language`` filter (schema v5 rows; absent before)
run_id          raw term, stored             ``run_id`` filter
segment_index   i64, stored, fast            the hit
start_s, end_s  f64, stored                  the window's time
text            STEM analyzer, positions,    bare words: BM25 on stems (``computers`` finds
                stored                       ``computing``); the snippet's text
text_exact      EXACT analyzer, positions    quoted phrases: exact words in order
span_exact      EXACT analyzer, positions,   the last :data:`EDGE_WORDS` words of this window, a
                stored                       line break, the first of the next: a quoted phrase
                                             spoken across the 30-s cut is found in the earlier
                                             window (stored: the snippet shows the next window's)
next_end_s      f64, stored                  the next window's end (a hit across the cut)
extra           bytes (JSON), stored         word timings where the rows have them (schema v5):
                                             this window's, and the next one's first words
state           bytes (zlib JSON), stored    the reserved document (:mod:`pipelines.search.index`)
==============  ===========================  =====================================================

Both analyzers split on what is not a letter or digit (tantivy's ``simple`` tokenizer), drop
tokens over 40 bytes, lowercase and fold accents to ASCII (``café`` = ``cafe``); STEM then
applies the English Snowball stemmer. So matching is case- and accent-insensitive and ignores
punctuation; only bare words are stemmed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tantivy

# Bump when the fields or analyzers change: an index of another format is rebuilt, never read.
FORMAT = 1
STEM = "salmonn_stem"
EXACT = "salmonn_exact"
# Words of each side of a window cut that ``span_exact`` carries: the longest phrase found across
# a cut has this many words on each side.
EDGE_WORDS = 16
KIND_WINDOW = "window"
KIND_STATE = "state"


def analyzer(name: str) -> tantivy.TextAnalyzer:
    """The analyzer registered under ``name`` (:data:`STEM` or :data:`EXACT`), as indexing and
    querying both use it."""
    from tantivy import Filter, TextAnalyzerBuilder, Tokenizer

    builder = (TextAnalyzerBuilder(Tokenizer.simple()).filter(Filter.remove_long(40)).filter(Filter.lowercase())
               .filter(Filter.ascii_fold()))
    if name == STEM:
        builder = builder.filter(Filter.stemmer("english"))
    elif name != EXACT:
        raise ValueError(f"no analyzer {name!r}")
    return builder.build()


def build_schema() -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    for name in ("kind", "file_id", "uri", "task", "language", "run_id"):
        sb.add_text_field(name, stored=name != "kind", tokenizer_name="raw", index_option="basic")
    sb.add_integer_field("segment_index", stored=True, indexed=True, fast=True)
    sb.add_float_field("start_s", stored=True)
    sb.add_float_field("end_s", stored=True)
    sb.add_text_field("text", stored=True, tokenizer_name=STEM, index_option="position")
    sb.add_text_field("text_exact", stored=False, tokenizer_name=EXACT, index_option="position")
    sb.add_text_field("span_exact", stored=True, tokenizer_name=EXACT, index_option="position")
    sb.add_float_field("next_end_s", stored=True)
    sb.add_bytes_field("extra", stored=True, indexed=False)
    sb.add_bytes_field("state", stored=True, indexed=False)
    return sb.build()


def register(index: tantivy.Index) -> tantivy.Index:
    """``index`` with this module's analyzers registered (needed by every writer and reader)."""
    index.register_tokenizer(STEM, analyzer(STEM))
    index.register_tokenizer(EXACT, analyzer(EXACT))
    return index


def open_index(path: Path) -> tantivy.Index:
    """The index in ``path`` with the analyzers registered (raises where there is none, or it
    cannot be read)."""
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"no search index in {path}")
    return register(tantivy.Index.open(str(path)))


def head(text: str, n: int = EDGE_WORDS) -> str:
    return " ".join(text.split(None, n)[:n])


def tail(text: str, n: int = EDGE_WORDS) -> str:
    return " ".join(text.rsplit(None, n)[-n:])


def compact_words(words: Sequence[dict[str, Any]] | None) -> list[list[Any]] | None:
    """Word timings ``[{word, start_s, end_s, ...}]`` as ``[[word, start_s, end_s], ...]``
    (milliseconds kept), or None."""
    if not words:
        return None
    out = []
    for w in words:
        word, start, end = w.get("word"), w.get("start_s"), w.get("end_s")
        if word is None or start is None or end is None or not (math.isfinite(start) and math.isfinite(end)):
            continue
        out.append([str(word), round(float(start), 3), round(float(end), 3)])
    return out or None


def window_document(row: dict[str, Any], nxt: dict[str, Any] | None) -> tantivy.Document:
    """The document of one segments row (``nxt``: the same file's and task's next window, whose
    first words the phrase field carries)."""
    text = row["text"]
    extra: dict[str, Any] = {}
    words = compact_words(row.get("words"))
    if words:
        extra["words"] = words
    doc = tantivy.Document(kind=KIND_WINDOW, file_id=row["file_id"], uri=row["uri"], task=row["task"],
                           run_id=row["run_id"], segment_index=int(row["segment_index"]),
                           start_s=float(row["start_s"]), end_s=float(row["end_s"]), text=text, text_exact=text)
    if nxt is not None:
        doc.add_text("span_exact", tail(text) + "\n" + head(nxt["text"]))
        doc.add_float("next_end_s", float(nxt["end_s"]))
        next_words = compact_words(nxt.get("words"))
        if next_words:
            extra["next_words"] = next_words[:EDGE_WORDS * 2]
    if row.get("language"):
        doc.add_text("language", row["language"])
    if extra:
        doc.add_bytes("extra", json.dumps(extra, separators=(",", ":")).encode())
    return doc
