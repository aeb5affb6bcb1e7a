"""One plan (issue 27): the dry run and the run decide once, in ``pipelines.planning``, so they
cannot disagree. The end-to-end test runs the real pipeline (local Ray, the tiny model, one task,
two new tokens) after asking ``plan`` what it will do, on an archive that exercises every
decision at once: unchanged, new, a copy that reuses, a copy over ``--max-bytes`` (the case where
the two used to disagree), and a removal the guard allows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

from pipelines import planning
from pipelines.config import PipelineConfig
from pipelines.decode import DecodeOptions
from pipelines.ops import plan as plan_mod
from pipelines.output import OutputStore
from pipelines.run import run_pipeline
from pipelines.search import index_status, search
from pipelines.synth import noise, tone, write_audio
from salmonn import builtin_task
from schemas.vocabulary import STATUS_ERROR, STATUS_OK

SR = 16000
TRANSCRIBE = builtin_task("transcribe")
TASKS = (dataclasses.replace(TRANSCRIBE, settings=dataclasses.replace(TRANSCRIBE.settings, max_new_tokens=8)),)


def _cfg(inp: Path, out: Path, **decode) -> PipelineConfig:
    return PipelineConfig(input=str(inp), out=str(out), tasks=TASKS, decode=DecodeOptions(window_s=2.0, **decode),
                          speech_gate=False, progress=False, batch_size=4)


def _clip(path: Path, i: int, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_audio(path, tone(200.0 + 37 * i, seconds, SR) if i % 2 else noise(seconds, SR, seed=i), SR, "wav")


def _words(out: Path, name: str) -> list[str]:
    """A few words of the indexed text of ``name`` (the tiny model's random tokens)."""
    texts = [r["text"] for r in OutputStore(str(out)).read_table("segments").to_pylist()
             if r["uri"].endswith("/" + name) and r["text"]]
    # whole tokens as the index splits them (letters and digits), the purely alphabetic ones
    return sorted({w for t in texts for w in re.findall(r"[^\W_]+", t) if w.isascii() and w.isalpha()
                   and len(w) >= 3})[:3]


def test_prepare_gives_the_dry_run_the_runs_storage_options(tmp_path):
    """Both list with the same options: the production defaults (retries, timeouts) for S3."""
    cfg = PipelineConfig(input="s3://bucket/podcasts/", out=str(tmp_path / "out"), tasks=TASKS,
                         storage_options={"anon": True})
    prep = planning.prepare(cfg, check_out=False)
    assert prep.cfg.storage_options["anon"] is True
    assert "retries" in str(prep.cfg.storage_options["config_kwargs"])
    assert prep.config_hash and prep.task_names == ["transcribe"]


def test_the_plan_is_what_the_run_does(tmp_path):
    audio, out = tmp_path / "audio", tmp_path / "out"
    _clip(audio / "long.wav", 1, 4.0)     # indexed, then copied: the copy is over --max-bytes
    _clip(audio / "short.wav", 2, 1.0)    # indexed, then copied: the copy reuses its rows
    _clip(audio / "gone.wav", 3, 1.0)     # indexed, then deleted
    _clip(audio / "moved.wav", 5, 1.5)    # indexed, then renamed: a removal plus a reuse
    _clip(audio / "changed.wav", 6, 1.0)  # indexed, then re-recorded
    first = run_pipeline(_cfg(audio, out))
    assert (first.processed, first.ok) == (5, 5)

    gone_words = _words(out, "gone.wav")
    shutil.copy(audio / "long.wav", audio / "long-copy.wav")
    shutil.copy(audio / "short.wav", audio / "short-copy.wav")
    _clip(audio / "new.wav", 4, 1.0)
    os.remove(audio / "gone.wav")
    os.rename(audio / "moved.wav", audio / "moved-to.wav")
    _clip(audio / "changed.wav", 7, 2.0)
    # 2 of 5 indexed files gone (40%) but not more than --max-removed-files (3): not a bad listing
    # max_bytes is not part of the config hash: the indexed files stay unchanged
    cfg = _cfg(audio, out, max_bytes=os.path.getsize(audio / "long.wav") - 1)

    plan = json.loads(plan_mod.plan_json(plan_mod.plan_run(cfg)))    # what `plan --files --json` prints
    actions = {Path(f["uri"]).name: (f["action"], f["over_limit"], f["reused_from"] and Path(f["reused_from"]).name)
               for f in plan["files"]}
    assert actions == {"long.wav": ("unchanged", None, None), "short.wav": ("unchanged", None, None),
                       "long-copy.wav": ("new", "too_large", None),     # too large to hash: never reused
                       "short-copy.wav": ("new", None, "short.wav"), "new.wav": ("new", None, None),
                       "moved-to.wav": ("new", None, "moved.wav"), "changed.wav": ("changed", None, None)}
    assert sorted(Path(u).name for u in plan["removed"]) == ["gone.wav", "moved.wav"]
    assert plan["removal_refused"] is None

    run = run_pipeline(cfg)
    assert (run.skipped, run.processed, run.reused, run.removed) == (2, 3, 2, 2)
    rows = {Path(r["uri"]).name: r for r in OutputStore(str(out)).read_table("files").to_pylist()}
    assert set(rows) == set(actions)
    assert rows["moved-to.wav"]["reused_from"] == str(audio / "moved.wav")
    assert rows["changed.wav"]["run_id"] == run.run_id and rows["changed.wav"]["duration_s"] == 2.0
    assert (rows["long-copy.wav"]["status"], rows["long-copy.wav"]["error_type"]) == (STATUS_ERROR, "too_large")
    assert rows["short-copy.wav"]["reused_from"] == rows["short.wav"]["uri"]
    assert rows["new.wav"]["status"] == STATUS_OK and rows["new.wav"]["run_id"] == run.run_id

    # the run brought the search index up to its commits: the new file in, the removed one out
    assert index_status(str(out)).current
    new_words = _words(out, "new.wav")
    assert new_words and gone_words     # eight tokens of the tiny model's vocabulary hold a word or two
    for name, words in (("new.wav", new_words), ("gone.wav", gone_words)):
        for word in words:
            hits = search(str(out), word, uri_prefix=str(audio / name), limit=5)
            assert bool(hits) == (name == "new.wav"), (name, word, hits)

    # and afterwards both agree there is nothing left to do
    again = plan_mod.plan_run(cfg, probe="never")
    assert again.todo == [] and again.removed == ()
