"""Searching the index: ``search(OUT, "query") -> [Hit]`` (BM25-ranked windows, the time of the
matched words, a highlighted snippet), and its stable JSON form.

Query syntax (see the README's *Search*):

* ``word`` — bare words are stemmed (English Snowball: ``computers`` finds ``computing``) and
  any of them may match; BM25 ranks windows with more and rarer matches first.
* ``"a phrase"`` — quoted: exactly these words in this order (not stemmed; case, accents and
  punctuation ignored); required. Also found when a 30-s cut splits it (up to
  :data:`~pipelines.search.schema.EDGE_WORDS` words each side): the hit is the earlier window and
  its time runs into the next. ``"a phrase"~N`` allows up to N other words in between.
* ``+word`` requires a word; ``-word`` and ``-"a phrase"`` exclude windows that have it.

Filters (task, language, run, uri prefix) restrict without changing the ranking.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tantivy
from tantivy import Occur, Query

import pipelines.search.schema as sch
import pipelines.search.sync as sync
from pipelines.output.store import OutputStore

JSON_FORMAT = "salmonn-pipeline.search/1"
SNIPPET_CHARS = 200
_CLAUSE = re.compile(r'([+-]?)(?:"([^"]*)"?(?:~(\d+))?|(\S+))')


class SearchError(ValueError):
    """A query that cannot be run (no words to search for)."""


class NoIndex(FileNotFoundError):
    """OUT has no search index: ``salmonn-pipeline index OUT`` builds it."""


@dataclasses.dataclass(frozen=True)
class Clause:
    occur: str            # "must" | "should" | "must_not"
    phrase: bool          # quoted: exact words in order
    tokens: tuple[str, ...]
    slop: int = 0


@dataclasses.dataclass(frozen=True)
class Hit:
    """One ranked window. ``start_s``/``end_s`` are the matched words' times where the rows have
    word timings (``time_source == "words"``), else the window's (``"window"``; a phrase across
    a cut: from this window's start to the next one's end)."""

    rank: int
    score: float
    uri: str
    file_id: str
    task: str
    segment_index: int
    start_s: float
    end_s: float
    time_source: str
    window_start_s: float
    window_end_s: float
    spans_next: bool          # the match runs into the next window (segment_index + 1)
    snippet: str
    highlights: tuple[tuple[int, int], ...]    # [start, end) character ranges of ``snippet``
    text: str
    language: str | None
    run_id: str

    @property
    def snippet_marked(self) -> str:
        """The snippet with each highlight between ``**``."""
        out, at = [], 0
        for a, b in self.highlights:
            out += [self.snippet[at:a], "**", self.snippet[a:b], "**"]
            at = b
        return "".join(out) + self.snippet[at:]

    def to_dict(self) -> dict[str, Any]:
        """The hit's stable JSON object (documented in the README; keys only ever added)."""
        return {
            "rank": self.rank, "score": round(self.score, 6), "uri": self.uri, "file_id": self.file_id,
            "task": self.task, "segment_index": self.segment_index, "start_s": round(self.start_s, 3),
            "end_s": round(self.end_s, 3), "time_source": self.time_source,
            "window": {"start_s": self.window_start_s, "end_s": self.window_end_s, "spans_next": self.spans_next},
            "snippet": self.snippet, "highlights": [list(h) for h in self.highlights], "text": self.text,
            "language": self.language, "run_id": self.run_id,
        }


def parse(query: str) -> list[Clause]:
    """The clauses of ``query`` (module docstring), analysed as the index analyses text."""
    stem, exact = sch.analyzer(sch.STEM), sch.analyzer(sch.EXACT)
    clauses = []
    for sign, quoted, slop, word in _CLAUSE.findall(query):
        if quoted or (not word and not sign):
            tokens = tuple(exact.analyze(quoted))
            occur = "must_not" if sign == "-" else "must"
            if tokens:
                clauses.append(Clause(occur, True, tokens, int(slop or 0)))
        elif word:
            tokens = tuple(stem.analyze(word))
            occur = {"+": "must", "-": "must_not"}.get(sign, "should")
            if tokens:
                clauses.append(Clause(occur, False, tokens))
    if not any(c.occur != "must_not" for c in clauses):
        raise SearchError(f"the query {query!r} has no words to search for")
    return clauses


def _clause_query(schema: tantivy.Schema, c: Clause, *, spans: bool) -> Query:
    if not c.phrase:
        if len(c.tokens) == 1:
            return Query.term_query(schema, "text", c.tokens[0])
        return Query.phrase_query(schema, "text", list(c.tokens))
    if len(c.tokens) == 1:
        return Query.term_query(schema, "text_exact", c.tokens[0])
    inside = Query.phrase_query(schema, "text_exact", list(c.tokens), c.slop)
    if not spans:
        return inside
    across = Query.phrase_query(schema, "span_exact", list(c.tokens), c.slop)
    return Query.boolean_query([(Occur.Should, inside), (Occur.Should, across)])


def build_query(schema: tantivy.Schema, clauses: Sequence[Clause], filters: Sequence[Query]) -> Query:
    occurs = {"must": Occur.Must, "should": Occur.Should, "must_not": Occur.MustNot}
    positive = Query.boolean_query([(occurs[c.occur], _clause_query(schema, c, spans=c.occur != "must_not"))
                                    for c in clauses])
    return Query.boolean_query([(Occur.Must, positive)] +
                               [(Occur.Must, Query.const_score_query(f, 0.0)) for f in filters])


def _filters(index: tantivy.Index, searcher: tantivy.Searcher, *, task: str | Sequence[str] | None,
             language: str | None, uri_prefix: str | None, run_id: str | None) -> list[Query] | None:
    """The filter queries; None when a filter matches nothing."""
    schema = index.schema
    out = []
    for field, value in (("task", task), ("language", language), ("run_id", run_id)):
        if value is None:
            continue
        values = [v for v in ([value] if isinstance(value, str) else list(value)) if v]
        if values:
            out.append(Query.term_set_query(schema, field, values))
    if uri_prefix:
        uris = [t for t, _ in searcher.terms_with_prefix("uri", uri_prefix)]
        if not uris:
            return None
        out.append(Query.term_set_query(schema, "uri", uris))
    return out


def open_for_search(out: str, storage_options: Mapping[str, Any] | None = None) -> tantivy.Index:
    """``OUT``'s index, ready to search (on object storage: its local copy, pulled first)."""
    store = OutputStore(out, storage_options)
    local = sync.local_copy(store, "read")
    if not store.is_local:
        with sync.locked(local):
            if not sync.pull(store, local):
                raise NoIndex(f"{store.uri(sync.INDEX_DIR)} holds no search index: build it with "
                              f"`salmonn-pipeline index {out}`")
    try:
        return sch.open_index(Path(local))
    except FileNotFoundError:
        raise NoIndex(f"{store.uri(sync.INDEX_DIR)} holds no search index: build it with "
                      f"`salmonn-pipeline index {out}`") from None
    except ValueError as e:      # tantivy cannot read it
        raise NoIndex(f"the search index in {store.uri(sync.INDEX_DIR)} cannot be read ({' '.join(str(e).split())}): "
                      f"`salmonn-pipeline index {out}` rebuilds it") from None


def search(out: str, query: str, *, task: str | Sequence[str] | None = None, language: str | None = None,
           uri_prefix: str | None = None, run_id: str | None = None, limit: int = 10,
           storage_options: Mapping[str, Any] | None = None) -> list[Hit]:
    """The ``limit`` best windows of ``OUT`` for ``query`` (module docstring), best first."""
    return search_index(open_for_search(out, storage_options), query, task=task, language=language,
                        uri_prefix=uri_prefix, run_id=run_id, limit=limit)


def search_index(index: tantivy.Index, query: str, *, task: str | Sequence[str] | None = None,
                 language: str | None = None, uri_prefix: str | None = None, run_id: str | None = None,
                 limit: int = 10) -> list[Hit]:
    """:func:`search` on an open index."""
    clauses = parse(query)
    if limit <= 0:
        return []
    index.reload()
    searcher = index.searcher()
    filters = _filters(index, searcher, task=task, language=language, uri_prefix=uri_prefix, run_id=run_id)
    if filters is None:
        return []
    q = build_query(index.schema, clauses, filters)
    hits: list[Hit] = []
    offset, page = 0, limit * 2 + 8
    while len(hits) < limit:
        found = searcher.search(q, page, count=False, offset=offset).hits
        for score, address in found:
            hit = _hit(searcher.doc(address).to_dict(), float(score), clauses, len(hits) + 1)
            if hit is not None:
                hits.append(hit)
                if len(hits) == limit:
                    break
        if len(found) < page:
            break
        offset += page
    return hits


# -- one hit: where the words matched, their time, the snippet -----------------------------------

def _tokens(analyzer: tantivy.TextAnalyzer, text: str) -> list[tuple[str, int, int]]:
    return [(t.text, t.char_offset_from, t.char_offset_to) for t in analyzer.pre_tokenize(text).tokens]


def _phrase_at(seq: Sequence[str], tokens: Sequence[str], slop: int) -> list[tuple[int, int]]:
    """[first, last] token indices of each occurrence of ``tokens`` in ``seq`` (in order, with up
    to ``slop`` other tokens in between)."""
    found = []
    for i, tok in enumerate(seq):
        if tok != tokens[0]:
            continue
        j, ok = i, True
        for want in tokens[1:]:
            window = seq[j + 1:j + 2 + slop]
            if want not in window:
                ok = False
                break
            j = j + 1 + window.index(want)
        if ok:
            found.append((i, j))
    return found


def _matches(text: str, clauses: Sequence[Clause]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(phrase occurrences, word matches) in ``text`` as character ranges; the phrases' are the
    required (``must``) phrase clauses'."""
    exact = _tokens(sch.analyzer(sch.EXACT), text)
    stems = _tokens(sch.analyzer(sch.STEM), text)
    seq = [t for t, _, _ in exact]
    phrases = []
    for c in clauses:
        if c.phrase and c.occur == "must":
            phrases += [(exact[a][1], exact[b][2]) for a, b in _phrase_at(seq, c.tokens, c.slop)]
    words = []
    stem_seq = [t for t, _, _ in stems]
    for c in clauses:
        if not c.phrase and c.occur != "must_not":
            words += [(stems[a][1], stems[b][2]) for a, b in _phrase_at(stem_seq, c.tokens, 0)]
    return sorted(phrases), sorted(words)


def _word_times(words: Sequence[Sequence[Any]], clauses: Sequence[Clause]) -> tuple[float, float] | None:
    """The time of the first required phrase (else the first matched word) in timed ``words``."""
    exact, stem = sch.analyzer(sch.EXACT), sch.analyzer(sch.STEM)
    seq, stem_seq, owner, stem_owner = [], [], [], []
    for k, (word, _, _) in enumerate(words):
        for tok in exact.analyze(word):
            seq.append(tok)
            owner.append(k)
        for tok in stem.analyze(word):
            stem_seq.append(tok)
            stem_owner.append(k)
    spans = []
    for c in clauses:
        if c.phrase and c.occur == "must":
            spans += [(owner[a], owner[b]) for a, b in _phrase_at(seq, c.tokens, c.slop)]
    if not spans and not any(c.phrase and c.occur == "must" for c in clauses):
        for c in clauses:
            if not c.phrase and c.occur != "must_not":
                spans += [(stem_owner[a], stem_owner[b]) for a, b in _phrase_at(stem_seq, c.tokens, 0)]
    if not spans:
        return None
    a, b = min(spans)
    return float(words[a][1]), float(words[b][2])


def _snippet(text: str, marks: Sequence[tuple[int, int]]) -> tuple[str, tuple[tuple[int, int], ...]]:
    """A piece of ``text`` of about :data:`SNIPPET_CHARS` around the first mark, and the marks in it."""
    merged: list[list[int]] = []
    for a, b in sorted(marks):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    start = 0
    if len(text) > SNIPPET_CHARS and merged:
        start = max(0, min(merged[0][0] - SNIPPET_CHARS // 4, len(text) - SNIPPET_CHARS))
        while start > 0 and not text[start - 1].isspace():
            start -= 1
    end = min(len(text), start + SNIPPET_CHARS)
    while end < len(text) and not text[end].isspace():
        end += 1
    prefix = "… " if start > 0 else ""
    piece = prefix + text[start:end] + (" …" if end < len(text) else "")
    shift = len(prefix) - start
    inside = tuple((max(a, start) + shift, min(b, end) + shift) for a, b in merged if a < end and b > start)
    return piece, inside


def _hit(doc: dict[str, list[Any]], score: float, clauses: Sequence[Clause], rank: int) -> Hit | None:
    text = doc["text"][0]
    extra = json.loads(doc["extra"][0]) if doc.get("extra") else {}
    span = (doc.get("span_exact") or [""])[0]
    next_head = span.split("\n", 1)[1] if "\n" in span else ""
    cut = len(text)
    joined = text + " " + next_head if next_head else text
    phrases, words = _matches(joined, clauses)
    required = [c for c in clauses if c.phrase and c.occur == "must"]
    if required and phrases and all(a > cut for a, _ in phrases):
        return None   # the phrase is inside the next window: that window is the hit, not this one
    spans_next = any(a < cut < b for a, b in phrases)
    words = [(a, b) for a, b in words if b <= cut or spans_next]
    window_start, window_end = float(doc["start_s"][0]), float(doc["end_s"][0])
    if spans_next and doc.get("next_end_s"):
        window_end = float(doc["next_end_s"][0])
    start_s, end_s, source = window_start, window_end, "window"
    timed = list(extra.get("words") or [])
    if timed:
        if spans_next:
            timed += list(extra.get("next_words") or [])
        found = _word_times(timed, clauses)
        if found is not None:
            (start_s, end_s), source = found, "words"
    shown = joined if spans_next else text
    snippet, highlights = _snippet(shown, phrases + words)
    return Hit(rank=rank, score=score, uri=doc["uri"][0], file_id=doc["file_id"][0], task=doc["task"][0],
               segment_index=int(doc["segment_index"][0]), start_s=start_s, end_s=end_s, time_source=source,
               window_start_s=window_start, window_end_s=window_end, spans_next=spans_next, snippet=snippet,
               highlights=highlights, text=text, language=(doc.get("language") or [None])[0],
               run_id=doc["run_id"][0])


def hits_json(out: str, query: str, hits: Sequence[Hit], *, filters: Mapping[str, Any], limit: int,
              index: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The stable JSON document of a search (README: *Search*, JSON output)."""
    return {"format": JSON_FORMAT, "out": out, "query": query, "filters": dict(filters), "limit": limit,
            "index": dict(index or {}), "hits": [h.to_dict() for h in hits]}
