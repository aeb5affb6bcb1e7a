"""Emotion answers -> fixed labels (table-driven), the segments.label column, schema v1 -> v2."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from pipelines import labels
from pipelines.output import CommittedFile, Committer, OldLayoutError, OutputStore, migrate
from pipelines.output.migrate import CommitRecord

# Answers in the style SALMONN gives to "Describe the emotion of the speaker in one word."
MODEL_ANSWERS = [
    ("Happy.", "happy"),
    ("The speaker sounds angry", "angry"),
    ("neutral tone", "neutral"),
    ("I think the speaker is sad.", "sad"),
    ("Excited", "happy"),
    ("calm", "neutral"),
    ("Neutral", "neutral"),
    ("Sad", "sad"),
    ("Angry.", "angry"),
    ("surprised", "surprised"),
    ("Surprise!", "surprised"),
    ("Fearful", "fearful"),
    ("The speaker seems scared.", "fearful"),
    ("anxious", "fearful"),
    ("Disgusted", "disgusted"),
    ("The speaker's tone conveys disgust.", "disgusted"),
    ("The emotion of the speaker is happiness.", "happy"),
    ("Cheerful and excited", "happy"),
    ("The speaker is frustrated.", "angry"),
    ("The speaker sounds annoyed and impatient.", "angry"),
    ("Melancholic", "sad"),
    ("Disappointed.", "sad"),
    ("Relaxed", "neutral"),
    ("The speaker is speaking in a neutral tone, without any strong emotion.", "neutral"),
    ("No particular emotion.", "neutral"),
    ("The speaker is not angry, just calm.", "neutral"),
    ("The speaker doesn't sound happy", "other"),
    ("The speaker\u2019s tone isn\u2019t happy", "other"),
    ("HAPPY", "happy"),
    ("  sad  \n", "sad"),
    ("matter-of-fact", "neutral"),
    ("Confused", "other"),
    ("The audio contains music.", "other"),
    ("I'm sorry, I cannot determine the emotion.", "other"),
    ("", "other"),
    ("Sad and angry", "sad"),  # the first emotion named wins
]


@pytest.mark.parametrize("answer,label", MODEL_ANSWERS)
def test_model_answers(answer, label):
    assert labels.emotion_label(answer) == label


def test_every_label_is_reachable_and_in_the_schema_set():
    assert set(labels.KEYWORDS) | {"other"} == set(schemas.EMOTION_LABELS)
    for label, words in labels.KEYWORDS.items():
        for w in words[:3]:
            assert labels.emotion_label(w) == label, w
        assert labels.emotion_label(f"The speaker sounds {words[0]}.") == label


def test_table_drives_the_mapping(monkeypatch):
    """A word added to the table maps without touching the code."""
    assert labels.emotion_label("Wistful") == "other"
    monkeypatch.setitem(labels._WORD_TO_LABEL, "wistful", "sad")
    assert labels.emotion_label("Wistful") == "sad"


def test_segment_label_only_for_emotion_rows():
    assert labels.segment_label("emotion", "Happy.") == "happy"
    assert labels.segment_label("transcribe", "I am so happy today") is None
    assert labels.segment_label("caption", "A happy song plays") is None
    assert labels.segment_label("emotion", None) is None
    assert labels.segment_labels(["emotion", "caption"], ["calm", "calm"]) == ["neutral", None]


def _v1_segments(run_id: str) -> pa.Table:
    """A segments part exactly as schema version 1 wrote it: no label column, version "1"."""
    fields = [f for f in schemas.SEGMENTS if f.name != "label"]
    schema = pa.schema(fields).with_metadata({schemas.METADATA_KEY: b"1"})
    return pa.Table.from_pylist([
        {"file_id": "f1", "uri": "/a.wav", "segment_index": 0, "start_s": 0.0, "end_s": 30.0, "task": "emotion",
         "text": "Happy.", "finish_reason": "stop", "run_id": run_id},
        {"file_id": "f1", "uri": "/a.wav", "segment_index": 0, "start_s": 0.0, "end_s": 30.0, "task": "caption",
         "text": "music", "finish_reason": "stop", "run_id": run_id},
    ], schema=schema)


def test_schema_version_2_has_label_and_version_1_parts_still_read(tmp_path):
    assert int(schemas.SCHEMA_VERSION) >= 2
    assert schemas.SEGMENTS.field("label").nullable
    assert schemas.SEGMENTS.field("label").type == pa.string()

    # a version-1 output: parts written by the old schema, listed by a commit record
    store = OutputStore(str(tmp_path / "out"))
    run = "20250101T000000Z-old111"
    files_v1 = pa.Table.from_pylist([{"file_id": "f1", "uri": "/a.wav", "status": "ok", "run_id": run}],
                                    schema=schemas.FILES).replace_schema_metadata({schemas.METADATA_KEY: b"1"})
    segs_v1 = _v1_segments(run)
    (tmp_path / "out" / "files" / f"run_id={run}").mkdir(parents=True)
    (tmp_path / "out" / "segments" / f"run_id={run}").mkdir(parents=True)
    pq.write_table(files_v1, tmp_path / "out" / "files" / f"run_id={run}" / "part-000001-aa.parquet")
    pq.write_table(segs_v1, tmp_path / "out" / "segments" / f"run_id={run}" / "part-000001-aa.parquet")
    rec = CommitRecord(run_id=run, seq=1, files_part=f"files/run_id={run}/part-000001-aa.parquet",
                       segments_part=f"segments/run_id={run}/part-000001-aa.parquet", n_files=1, n_segments=2,
                       committed_at="2025-01-01T00:00:00+00:00",
                       files=(CommittedFile("f1", "/a.wav", "v", "h", "ok", None, run, 1),))
    store.write_bytes(store.path("_runs", run, "commits", "000001.json"), rec.to_json().encode())
    assert schemas.schema_version(pq.read_schema(tmp_path / "out" / rec.segments_part)) == "1"

    with pytest.raises(OldLayoutError, match="salmonn-pipeline migrate"):
        store.read_table("segments")
    migrate(str(tmp_path / "out"))   # the earlier layout -> Delta tables
    segs = store.read_table("segments")
    assert segs.column_names == schemas.SEGMENTS.names
    assert segs["label"].to_pylist() == [None, None]       # filled with nulls
    assert sorted(segs["text"].to_pylist()) == ["Happy.", "music"]  # the rest intact
    assert schemas.schema_version(segs.schema) == schemas.SCHEMA_VERSION

    # a version-2 commit next to it; the latest view mixes both versions
    run2 = "20260101T000000Z-new222"
    segs2 = pa.Table.from_pylist([
        {"file_id": "f2", "uri": "/b.wav", "segment_index": 0, "start_s": 0.0, "end_s": 12.5, "task": "emotion",
         "text": "The speaker sounds angry", "label": labels.segment_label("emotion", "The speaker sounds angry"),
         "finish_reason": "stop", "run_id": run2}], schema=schemas.SEGMENTS)
    files2 = pa.Table.from_pylist([{"file_id": "f2", "uri": "/b.wav", "status": "ok", "run_id": run2}],
                                  schema=schemas.FILES)
    Committer(store, run2).commit(files2, segs2, [CommittedFile("f2", "/b.wav", "v", "h", "ok", None, run2, 0)])
    latest = store.read_table("segments", latest=True)
    by_uri = {(r["uri"], r["task"]): r["label"] for r in latest.to_pylist()}
    assert by_uri == {("/a.wav", "emotion"): None, ("/a.wav", "caption"): None, ("/b.wav", "emotion"): "angry"}
    # an archive can be filtered by emotion
    import pyarrow.compute as pc

    assert latest.filter(pc.equal(latest["label"], "angry"))["uri"].to_pylist() == ["/b.wav"]


def test_label_values_are_checked():
    t = schemas.conform(pa.table({"file_id": ["f"], "uri": ["u"], "segment_index": [0], "start_s": [0.0],
                                  "end_s": [1.0], "task": ["emotion"], "run_id": ["r"], "label": ["ecstatic"]}),
                        schemas.SEGMENTS)
    with pytest.raises(schemas.SchemaError, match="label"):
        schemas.check_values("segments", t)
