"""The full-text search index (pipelines.search): ranking, phrases, filters, word times, the JSON
form, and the nightly semantics (added, reprocessed and removed files; a killed update; object
storage with a second reader), on tables written by the real Committer with chosen texts."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

import schemas
from pipelines.output import CommittedFile, Committer, OutputStore
from pipelines.search import (
    JSON_FORMAT,
    NoIndex,
    SearchError,
    clean_index,
    hits_json,
    index_status,
    search,
    update_index,
)
from pipelines.sources import file_id_for

ROOT = Path(__file__).resolve().parents[1]
RUN1 = "20261201T020000Z-aaaaaa"
RUN2 = "20261202T020000Z-bbbbbb"
T1 = dt.datetime(2026, 12, 1, 2, 0, tzinfo=dt.UTC)
T2 = dt.datetime(2026, 12, 2, 2, 0, tzinfo=dt.UTC)

# uri -> {task: [window texts]}: 30-s windows; "" is a window without text (e.g. no speech)
ARCHIVE = {
    "/arch/talks/a.mp3": {
        "transcribe": ["Welcome to the show, everyone.", "Today we discuss quantum computing and what it means.",
                       "Thanks for listening."],
        "caption": ["A man speaks in a studio.", "A man talks about computers.", "Applause."],
    },
    "/arch/talks/b.mp3": {
        # the phrase "the quick brown fox jumps over the lazy dog" is cut by the 30-s boundary
        "transcribe": ["My favourite sentence is the quick brown fox jumps",
                       "over the lazy dog, said the teacher.", ""],
        "caption": ["A woman reads a sentence.", "A woman laughs.", "Silence."],
    },
    "/arch/talks/c.mp3": {
        "transcribe": ["The weather in the mountains is cold.", "Computers were mentioned once."],
    },
    "/arch/music/d.mp3": {
        "transcribe": ["Quantum physics lyrics, quantum quantum quantum."],
        "caption": ["Music with a quantum synthesizer."],
    },
}


def _tables(run_id: str, archive: dict, processed_at: dt.datetime):
    frows, srows, entries = [], [], []
    for uri, tasks in archive.items():
        fid = file_id_for(uri)
        n = max(len(t) for t in tasks.values())
        frows.append({"file_id": fid, "uri": uri, "status": "ok", "duration_s": 30.0 * n, "n_segments": n,
                      "run_id": run_id, "model_id": "test", "config_hash": "c0", "processed_at": processed_at})
        for task, texts in tasks.items():
            for i, text in enumerate(texts):
                srows.append({"file_id": fid, "uri": uri, "segment_index": i, "start_s": 30.0 * i,
                              "end_s": 30.0 * (i + 1), "task": task, "prompt": "p", "text": text or None,
                              "finish_reason": "stop" if text else "no_speech", "run_id": run_id, "model_id": "test"})
        entries.append(CommittedFile(file_id=fid, uri=uri, version="v1", config_hash="c0", status="ok",
                                     error_type=None, run_id=run_id, seq=0))
    return (pa.Table.from_pylist(frows, schema=schemas.FILES), pa.Table.from_pylist(srows, schema=schemas.SEGMENTS),
            entries)


def _commit(store: OutputStore, run_id: str, archive: dict, at: dt.datetime) -> None:
    Committer(store, run_id).commit(*_tables(run_id, archive, at))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SALMONN_SEARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def archive_out(tmp_path, cache) -> str:
    out = str(tmp_path / "out")
    store = OutputStore(out)
    _commit(store, RUN1, ARCHIVE, T1)
    update_index(store)
    return out


def test_a_phrase_is_found_first_with_its_file_and_time(archive_out):
    hits = search(archive_out, '"quantum computing"')
    assert hits, "the phrase was not found"
    first = hits[0]
    assert (first.uri, first.task, first.segment_index) == ("/arch/talks/a.mp3", "transcribe", 1)
    assert 30.0 <= first.start_s < first.end_s <= 60.0 and first.time_source == "window"
    assert first.snippet_marked == "Today we discuss **quantum computing** and what it means."
    assert [h.uri for h in hits] == ["/arch/talks/a.mp3"]        # exact phrase: nothing else
    assert first.rank == 1 and first.score > 0 and first.run_id == RUN1


def test_stemming_and_phrase_rules(archive_out):
    # bare words are stemmed: "computers" finds "computing" (and "computers"); BM25 ranks
    uris = {(h.uri, h.task) for h in search(archive_out, "computers")}
    assert {("/arch/talks/a.mp3", "transcribe"), ("/arch/talks/a.mp3", "caption"),
            ("/arch/talks/c.mp3", "transcribe")} <= uris
    # a quoted phrase is exact (not stemmed): "quantum computers" is not "quantum computing"
    assert search(archive_out, '"quantum computers"') == []
    # case, accents and punctuation do not matter
    assert [h.uri for h in search(archive_out, '"WELCOME to the SHOW"')] == ["/arch/talks/a.mp3"]
    # more matches and rarer words rank first: "quantum" four times in d.mp3's transcript
    assert search(archive_out, "quantum", task="transcribe")[0].uri == "/arch/music/d.mp3"
    # exclusion and required words
    assert {h.uri for h in search(archive_out, "quantum -physics")} == {"/arch/talks/a.mp3", "/arch/music/d.mp3"}
    assert all(h.task == "caption" for h in search(archive_out, "quantum -physics -computing"))
    assert [h.uri for h in search(archive_out, "+quantum +synthesizer")] == ["/arch/music/d.mp3"]
    with pytest.raises(SearchError):
        search(archive_out, "-quantum")
    with pytest.raises(SearchError):
        search(archive_out, "  ?! ")


def test_filters_and_limit(archive_out):
    assert {h.task for h in search(archive_out, "quantum", task="caption")} == {"caption"}
    assert {h.uri for h in search(archive_out, "quantum", uri_prefix="/arch/music/")} == {"/arch/music/d.mp3"}
    assert search(archive_out, "quantum", uri_prefix="/nowhere/") == []
    assert search(archive_out, "quantum", run_id="other-run") == []
    assert len(search(archive_out, "quantum", run_id=RUN1)) == 3
    assert len(search(archive_out, "quantum", limit=2)) == 2
    assert search(archive_out, "quantum", language="fr") == []     # these rows have no language


def test_a_phrase_across_two_windows_is_found_once(archive_out):
    hits = search(archive_out, '"the quick brown fox jumps over the lazy dog"')
    assert len(hits) == 1
    h = hits[0]
    assert (h.uri, h.segment_index, h.spans_next) == ("/arch/talks/b.mp3", 0, True)
    assert (h.start_s, h.end_s, h.window_start_s, h.window_end_s) == (0.0, 60.0, 0.0, 60.0)
    assert "**the quick brown fox jumps over the lazy dog**" in h.snippet_marked
    # a phrase inside the second window is that window's hit, not also the first window's
    inside = search(archive_out, '"over the lazy dog"')
    assert [(x.uri, x.segment_index, x.spans_next) for x in inside] == [("/arch/talks/b.mp3", 1, False)]


def test_json_form_is_stable(archive_out):
    hits = search(archive_out, '"quantum computing"')
    doc = hits_json(archive_out, '"quantum computing"', hits, filters={"task": None}, limit=10,
                    index=index_status(archive_out).to_dict())
    assert doc["format"] == JSON_FORMAT == "salmonn-pipeline.search/1"
    assert list(doc) == ["format", "out", "query", "filters", "limit", "index", "hits"]
    assert doc["index"]["current"] is True and doc["index"]["windows"] == 15
    hit = json.loads(json.dumps(doc))["hits"][0]
    assert list(hit) == ["rank", "score", "uri", "file_id", "task", "segment_index", "start_s", "end_s",
                         "time_source", "window", "snippet", "highlights", "text", "language", "run_id"]
    assert hit["window"] == {"start_s": 30.0, "end_s": 60.0, "spans_next": False}
    assert [hit["snippet"][a:b] for a, b in hit["highlights"]] == ["quantum computing"]


def test_nightly_run_adds_reprocesses_and_removes(archive_out):
    store = OutputStore(archive_out)
    before = index_status(archive_out)
    # the next night: a new file, c.mp3 reprocessed (new run, new text), d.mp3 gone from the archive
    c2 = Committer(store, RUN2)
    c2.commit(*_tables(RUN2, {"/arch/talks/e.mp3": {"transcribe": ["A brand new episode about volcanoes."]},
                              "/arch/talks/c.mp3": {"transcribe": ["The weather in the valley is warm."]}}, T2))
    c2.remove([file_id_for("/arch/music/d.mp3")])
    assert not index_status(archive_out).current
    update = update_index(store)
    assert (update.rebuilt, update.files_added, update.files_reindexed, update.files_removed) == (False, 1, 1, 1)
    assert update.documents_added == 2 and update.previous_versions == before.versions
    assert index_status(archive_out).current
    assert [h.uri for h in search(archive_out, '"brand new episode"')] == ["/arch/talks/e.mp3"]
    assert [h.run_id for h in search(archive_out, '"valley is warm"')] == [RUN2]
    assert search(archive_out, '"in the mountains"') == []            # c.mp3's superseded text
    assert search(archive_out, "physics synthesizer") == []        # d.mp3 is gone
    assert all(h.uri != "/arch/music/d.mp3" for h in search(archive_out, "quantum", limit=50))
    # nothing changed since: nothing to do
    again = update_index(store)
    assert (again.changed, again.reason) == (False, "current")
    # the full rebuild gives the same answers
    rebuilt = update_index(store, rebuild=True)
    assert rebuilt.rebuilt and rebuilt.documents == update.documents
    assert [h.uri for h in search(archive_out, '"brand new episode"')] == ["/arch/talks/e.mp3"]


def _update_in_subprocess(out: str, faults: list | None, options: dict | None = None, *, kill_at: str | None = None):
    """Run update_index(OUT) in a child process (with the fault rules); ``kill_at``: SIGKILL it
    once its log says this."""
    code = ("import json, logging, sys\n"
            "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            "from pipelines.output import OutputStore\n"
            "from pipelines.search import update_index\n"
            "print(update_index(OutputStore(sys.argv[1], json.loads(sys.argv[2]))).format(), flush=True)\n")
    env = {**os.environ, "SALMONN_PIPELINE_FAULTS": json.dumps(faults or [])}
    proc = subprocess.Popen([sys.executable, "-c", code, out, json.dumps(options or {})], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_at is None:
        out_, err = proc.communicate(timeout=120)
        return proc.returncode, out_ + err
    seen = []
    for line in proc.stderr:   # type: ignore[union-attr]
        seen.append(line)
        if kill_at in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    return proc.returncode, "".join(seen)


def test_an_update_killed_before_its_commit_leaves_the_previous_index(archive_out):
    store = OutputStore(archive_out)
    _commit(store, RUN2, {"/arch/talks/a.mp3": {"transcribe": ["Rewritten: nothing about physics here."]},
                          "/arch/talks/f.mp3": {"transcribe": ["Submarines and whales."]}}, T2)
    rc, log = _update_in_subprocess(archive_out, [{"stage": "search-commit", "sleep_s": 120}], kill_at="committing")
    assert rc == -signal.SIGKILL, log
    status = index_status(archive_out)
    assert status.exists and not status.current and status.reason is None
    assert [h.uri for h in search(archive_out, '"quantum computing"')] == ["/arch/talks/a.mp3"]   # the old text
    assert search(archive_out, "submarines") == []
    # an update that dies hard at the same point (os._exit) leaves it too
    rc, log = _update_in_subprocess(archive_out, [{"stage": "search-commit", "times": -1}])
    assert rc == 77, log
    assert [h.uri for h in search(archive_out, '"quantum computing"')] == ["/arch/talks/a.mp3"]
    # the rerun makes it current
    update = update_index(store)
    assert not update.rebuilt and (update.files_added, update.files_reindexed) == (1, 1)
    assert search(archive_out, '"quantum computing"') == []
    assert [h.uri for h in search(archive_out, "submarines")] == ["/arch/talks/f.mp3"]
    assert index_status(archive_out).current


def test_an_index_that_cannot_be_trusted_is_rebuilt(archive_out):
    index_dir = Path(archive_out) / "_search"
    (index_dir / "meta.json").write_text("{not json")
    with pytest.raises(NoIndex, match="cannot be read"):
        search(archive_out, "quantum")
    update = update_index(OutputStore(archive_out))
    assert update.rebuilt and update.reason.startswith("unreadable index") and update.documents == 15
    assert [h.uri for h in search(archive_out, '"quantum computing"')] == ["/arch/talks/a.mp3"]
    # the leftovers of the unreadable index are cleaned (maintain)
    clean_index(OutputStore(archive_out), older_than_s=0)
    meta = json.loads((index_dir / "meta.json").read_text())
    live = {s["segment_id"].replace("-", "") for s in meta["segments"]}
    stray = [n for n in os.listdir(index_dir) if not n.startswith(".") and n != "meta.json"
             and n.partition(".")[0] not in live]
    assert stray == []


def test_no_index_says_how_to_build_it(tmp_path, cache):
    with pytest.raises(NoIndex, match="salmonn-pipeline index"):
        search(str(tmp_path / "nothing"), "quantum")


def test_word_timings_give_the_time_of_the_matched_words(tmp_path, cache):
    """Rows with word timings (schema v5's ``words`` and ``language``), committed by the Committer."""
    out = tmp_path / "out"
    uri = "/arch/timed.mp3"
    texts = ["So the meeting starts now and the budget is", "approved for next year, thank you."]
    files, segments, entries = _tables(RUN1, {uri: {"transcribe": texts}}, T1)
    assert "words" in schemas.SEGMENTS.names, "schema v5: segments.words"
    words = []
    for i, text in enumerate(texts):
        ws = text.split()
        step = 30.0 / len(ws)
        words.append([{"word": " " + w, "start_s": 30.0 * i + k * step, "end_s": 30.0 * i + (k + 0.8) * step,
                       "probability": 0.9} for k, w in enumerate(ws)])
    segments = segments.set_column(segments.schema.get_field_index("words"), "words",
                                   pa.array(words, schemas.SEGMENTS.field("words").type))
    segments = segments.set_column(segments.schema.get_field_index("language"), "language",
                                   pa.array(["en", "en"], pa.string()))
    Committer(OutputStore(str(out)), RUN1).commit(files, segments, entries)
    update_index(OutputStore(str(out)))

    (hit,) = search(str(out), '"meeting starts"')
    step = 30.0 / 9
    assert hit.time_source == "words" and hit.language == "en"
    assert (hit.start_s, hit.end_s) == (pytest.approx(2 * step, abs=2e-3), pytest.approx(3.8 * step, abs=2e-3))
    # bare word: the first matched word's time
    (hit,) = search(str(out), "approve")
    assert hit.segment_index == 1 and hit.start_s == pytest.approx(30.0, abs=2e-3) and hit.time_source == "words"
    # across the cut: from "budget" in the first window to "approved" in the second
    (hit,) = search(str(out), '"the budget is approved"')
    assert hit.spans_next and hit.segment_index == 0
    assert (hit.start_s, hit.end_s) == (pytest.approx(6 * step, abs=2e-3), pytest.approx(30.0 + 0.8 * 30.0 / 6, abs=2e-3))
    assert search(str(out), "budget", language="en")[0].language == "en"
    assert search(str(out), "budget", language="de") == []


def test_object_storage_publish_pull_and_a_killed_publish(s3_server, s3_storage_options, tmp_path, monkeypatch):
    s3_server.s3fs().mkdir("idx")
    out = "s3://idx/out"
    monkeypatch.setenv("SALMONN_SEARCH_CACHE", str(tmp_path / "writer"))
    store = OutputStore(out, s3_storage_options)
    _commit(store, RUN1, ARCHIVE, T1)
    first = update_index(store)
    assert first.rebuilt and first.published_files > 1
    fs = s3_server.s3fs()
    assert fs.exists("idx/out/_search/meta.json")

    # a second machine (its own cache) pulls the published index and searches it
    monkeypatch.setenv("SALMONN_SEARCH_CACHE", str(tmp_path / "reader"))
    hits = search(out, '"quantum computing"', storage_options=s3_storage_options)
    assert [h.uri for h in hits] == ["/arch/talks/a.mp3"]

    # the next night: add, reprocess, remove; the update publishes only new files
    monkeypatch.setenv("SALMONN_SEARCH_CACHE", str(tmp_path / "writer"))
    c2 = Committer(store, RUN2)
    c2.commit(*_tables(RUN2, {"/arch/talks/e.mp3": {"transcribe": ["A brand new episode about volcanoes."]},
                              "/arch/talks/a.mp3": {"transcribe": ["Today we discuss gardening."]}}, T2))
    c2.remove([file_id_for("/arch/music/d.mp3")])
    night = update_index(store)
    assert (night.files_added, night.files_reindexed, night.files_removed) == (1, 1, 1)
    assert 1 < night.published_files < first.published_files + 6
    monkeypatch.setenv("SALMONN_SEARCH_CACHE", str(tmp_path / "reader"))
    assert [h.uri for h in search(out, "volcanoes", storage_options=s3_storage_options)] == ["/arch/talks/e.mp3"]
    assert search(out, '"quantum computing"', storage_options=s3_storage_options) == []    # superseded
    assert search(out, "synthesizer", storage_options=s3_storage_options) == []            # removed

    # a publish that dies between its segment files and meta.json: readers keep the previous index
    Committer(store, "20261203T020000Z-cccccc").commit(
        *_tables("20261203T020000Z-cccccc", {"/arch/talks/g.mp3": {"transcribe": ["Penguins on ice."]}}, T2))
    monkeypatch.setenv("SALMONN_SEARCH_CACHE", str(tmp_path / "writer"))
    rc, log = _update_in_subprocess(out, [{"stage": "search-publish", "times": -1}], s3_storage_options)
    assert rc == 77, log
    monkeypatch.setenv("SALMONN_SEARCH_CACHE", str(tmp_path / "reader"))
    assert search(out, "penguins", storage_options=s3_storage_options) == []
    assert [h.uri for h in search(out, "volcanoes", storage_options=s3_storage_options)] == ["/arch/talks/e.mp3"]
    assert not index_status(out, s3_storage_options).current
    # the rerun (its working copy is reset to the published index first) makes it current
    monkeypatch.setenv("SALMONN_SEARCH_CACHE", str(tmp_path / "writer"))
    again = update_index(store)
    assert again.files_added == 1 and again.published_files > 1
    monkeypatch.setenv("SALMONN_SEARCH_CACHE", str(tmp_path / "reader"))
    assert [h.uri for h in search(out, "penguins", storage_options=s3_storage_options)] == ["/arch/talks/g.mp3"]
    assert index_status(out, s3_storage_options).current
    # maintain: the files no index version names (the dead publish's, earlier versions') go
    names = fs.ls("idx/out/_search")
    removed = clean_index(store, older_than_s=0)
    meta = json.loads(fs.cat_file("idx/out/_search/meta.json"))
    live = {s["segment_id"].replace("-", "") for s in meta["segments"]}
    fs.invalidate_cache()
    left = [p.rsplit("/", 1)[1] for p in fs.ls("idx/out/_search")]
    assert removed > 0 and len(left) == len(names) - removed
    assert all(n == "meta.json" or n.partition(".")[0] in live for n in left)
    assert [h.uri for h in search(out, "penguins", storage_options=s3_storage_options)] == ["/arch/talks/g.mp3"]
    # a published index that lost a file it names is rebuilt by the next update
    fs.rm(f"idx/out/_search/{sorted(n for n in left if n.endswith('.idx'))[0]}")
    monkeypatch.setenv("SALMONN_SEARCH_CACHE", str(tmp_path / "writer2"))
    with pytest.raises(FileNotFoundError, match="missing"):
        search(out, "penguins", storage_options=s3_storage_options)
    repaired = update_index(store)
    assert repaired.rebuilt and repaired.reason == "no index yet"
    assert [h.uri for h in search(out, "penguins", storage_options=s3_storage_options)] == ["/arch/talks/g.mp3"]


def test_cli_index_and_search(tmp_path, cache):
    out = str(tmp_path / "out")
    _commit(OutputStore(out), RUN1, ARCHIVE, T1)
    env = {**os.environ, "SALMONN_SEARCH_CACHE": str(cache)}
    cli = [sys.executable, "-m", "pipelines.cli"]
    done = subprocess.run([*cli, "index", out], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "rebuilt (no index yet)" in done.stdout and "15 windows of 4 files" in done.stdout
    found = subprocess.run([*cli, "search", out, '"quantum computing"', "--task", "transcribe", "--json"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    doc = json.loads(found.stdout)
    assert doc["filters"]["task"] == ["transcribe"] and doc["index"]["current"] is True
    assert [(h["uri"], h["start_s"], h["end_s"]) for h in doc["hits"]] == [("/arch/talks/a.mp3", 30.0, 60.0)]
    text = subprocess.run([*cli, "search", out, "quantum", "--limit", "2"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert text.stdout.count("**quantum") >= 2 and " 1. " in text.stdout
    bad = subprocess.run([*cli, "search", out, "--", "-quantum"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "no words to search for" in bad.stderr


def test_tables_written_before_schema_v5_are_indexed(tmp_path, cache):
    """Tables without ``language`` and ``words`` (schema v4 and earlier): window times, no language."""
    from deltalake import write_deltalake

    out = tmp_path / "out"
    uri = "/old/e1.mp3"
    fid = file_id_for(uri)
    write_deltalake(str(out / "segments"), pa.table({
        "file_id": [fid, fid], "uri": [uri, uri], "segment_index": pa.array([0, 1], pa.int32()),
        "start_s": [0.0, 30.0], "end_s": [30.0, 45.0], "task": ["transcribe"] * 2,
        "text": ["An old recording of a brass", "band playing in the park."], "run_id": [RUN1] * 2}))
    write_deltalake(str(out / "files"), pa.table({"file_id": [fid], "uri": [uri], "run_id": [RUN1],
                                                  "processed_at": pa.array([T1])}))
    update_index(OutputStore(str(out)))
    (hit,) = search(str(out), '"brass band"')
    assert (hit.segment_index, hit.spans_next, hit.start_s, hit.end_s) == (0, True, 0.0, 45.0)
    assert hit.time_source == "window" and hit.language is None


def test_the_readme_example(archive_out, capsys):
    readme = (ROOT / "README.md").read_text()
    code = readme.split("<!-- tested: readme-search -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert code.count('"OUT"') == 2
    exec(code.replace('"OUT"', repr(archive_out)), {})
    assert capsys.readouterr().out.splitlines() == [
        "/arch/talks/a.mp3 30.0 60.0 Today we discuss **quantum computing** and what it means."]
