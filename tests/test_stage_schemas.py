"""The typed stage contract (schemas/stage.py): batches are built and checked against pyarrow
schemas, a mismatch names its column, and the driver never dies on a batch it cannot use."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from pipelines.decode import FileInfo, Window
from pipelines.sources import FileRef
from pipelines.stages import DecodeStage, ResultAssembler, info_to_struct, refs_table
from schemas import stage as st


def _info(fid: str = "f1", n: int = 2) -> FileInfo:
    return FileInfo(file_id=fid, uri=f"/x/{fid}.wav", status="ok", error_type=None, error_message=None,
                    container="wav", codec="pcm_s16le", sample_rate_in=16000, channels_in=1,
                    duration_s=2.0 * n, n_segments=n)


def _segment(fid: str, seg: int, task: str = "caption", **extra) -> dict:
    return {"kind": st.KIND_SEGMENT, "file_id": fid, "uri": f"/x/{fid}.wav", "segment_index": seg,
            "start_s": 2.0 * seg, "end_s": 2.0 * seg + 2, "task": task, "prompt": "p", "text": f"t{seg}",
            "lora_scale": 4.0, "num_beams": 1, "n_output_tokens": 3, "finish_reason": "stop", **extra}


def test_file_info_struct_mirrors_the_dataclass():
    """FileInfo crosses two stages as FILE_INFO: the struct and the dataclass must not drift."""
    assert [f.name for f in st.FILE_INFO] == [f.name for f in dataclasses.fields(FileInfo)]


def test_build_names_the_column_of_a_bad_value():
    rows = [_segment("f1", 0), {**_segment("f1", 1), "segment_index": "one"}]
    with pytest.raises(st.StageSchemaError, match="column 'segment_index'"):
        st.build(rows, st.RESULTS, "infer")
    with pytest.raises(st.StageSchemaError, match=r"unknown column\(s\) \['confidence'\]"):
        st.build([_segment("f1", 0, confidence=0.3)], st.RESULTS, "infer")
    with pytest.raises(st.StageSchemaError, match="column 'file_id' is required"):
        st.build([{**_segment("f1", 0), "file_id": None}], st.RESULTS, "infer")


def test_all_null_file_info_block_keeps_its_type():
    """The bug of the first landing: a block whose file_info values are all None. Built from the
    schema it is a null struct column of the same type as a block that has one, so blocks
    concatenate and the driver reads None (not a float NaN)."""
    without = st.build([_segment("f1", 0), _segment("f1", 1, task="emotion")], st.RESULTS, "infer")
    with_info = st.build([_segment("f1", 1, file_info=info_to_struct(_info()))], st.RESULTS, "infer")
    assert without.schema == with_info.schema == st.RESULTS
    both = pa.concat_tables([without, with_info])
    assert both["file_info"].to_pylist()[:2] == [None, None]


def test_check_rejects_what_type_inference_made_of_a_null_column():
    """What Ray's per-block type inference produced from object arrays (file_info as float NaN)
    is rejected at the boundary with the column's name, before the assembler reads it."""
    good = st.build([_segment("f1", 0)], st.RESULTS, "infer")
    inferred = good.set_column(good.schema.get_field_index("file_info"), "file_info",
                               pa.array([float("nan")], pa.float32()))
    with pytest.raises(st.StageSchemaError, match="column 'file_info' is float"):
        st.check(inferred, st.RESULTS, "results")
    # Ray's large_string stand-in for string is the same data: accepted and cast back
    large = good.set_column(good.schema.get_field_index("text"), "text", good["text"].cast(pa.large_string()))
    assert st.check(large, st.RESULTS, "results").schema == st.RESULTS


def test_assembler_never_raises_and_fails_only_the_files_it_cannot_use():
    asm = ResultAssembler(["caption"])
    # f1 complete over two batches, the second of them carries its FileInfo
    done, failed = asm.add(st.build([_segment("f1", 0)], st.RESULTS, "t"))
    assert (done, failed) == ([], [])
    # f2: a row of an unknown kind -> f2 fails once, its later rows are ignored
    bad = st.build([_segment("f2", 0), {**_segment("f2", 1), "kind": "bogus"}], st.RESULTS, "t")
    done, failed = asm.add(bad)
    assert done == [] and [f.file_id for f in failed] == ["f2"] and "bogus" in failed[0].reason
    done, failed = asm.add(st.build([_segment("f2", 2, file_info=info_to_struct(_info("f2", 3)))], st.RESULTS, "t"))
    assert (done, failed) == ([], [])
    # a batch that does not match the schema at all: every file in it fails, nothing raises
    wrong = pa.table({"file_id": ["f3", "f3"], "kind": ["segment", "segment"]})
    done, failed = asm.add(wrong)
    assert done == [] and [f.file_id for f in failed] == ["f3"] and "missing" in failed[0].reason
    # f1 completes normally beside them
    done, failed = asm.add(st.build([_segment("f1", 1, file_info=info_to_struct(_info("f1", 2)))], st.RESULTS, "t"))
    assert [d.info.file_id for d in done] == ["f1"] and failed == []
    assert [s["segment_index"] for s in done[0].segments] == [0, 1]
    # a retried task delivering f1's rows again after completion: counted, not a new file
    done, failed = asm.add(st.build([_segment("f1", 0)], st.RESULTS, "t"))
    assert (done, failed) == ([], []) and asm.duplicates == 1


def test_decode_stage_output_blocks_are_typed_whatever_their_content(tmp_path):
    """A long file's blocks hold no FileInfo until the last one; every block has the WINDOWS
    schema, one block per windows_per_batch windows."""
    from pipelines.decode import DecodeOptions
    from pipelines.synth import tone, write_audio

    write_audio(tmp_path / "a.wav", tone(300.0, 9.5, 16000), 16000, "wav")
    ref = FileRef(uri=str(tmp_path / "a.wav"), size_bytes=(tmp_path / "a.wav").stat().st_size, etag=None,
                  mtime=None, file_id="a")
    blocks = list(DecodeStage(DecodeOptions(window_s=1.0), windows_per_batch=3)(refs_table([ref])))
    assert [b.num_rows for b in blocks] == [3, 3, 3, 1]
    assert all(b.schema == st.WINDOWS for b in blocks)
    infos = [fi for b in blocks for fi in b["file_info"].to_pylist()]
    assert infos[:-1] == [None] * 9 and infos[-1]["n_segments"] == 10
    samples = np.frombuffer(blocks[0]["samples"][0].as_buffer(), dtype="<f4")
    assert samples.shape == (16000,) and np.abs(samples).max() == pytest.approx(0.5, abs=0.01)


def test_window_rows_round_trip_through_the_predictor_reader():
    from pipelines.infer import windows_from_batch

    samples = np.linspace(-1, 1, 3200, dtype=np.float32)
    w = Window(file_id="f", uri="/x/f.wav", segment_index=4, start_s=8.0, end_s=8.2, samples=samples,
               is_silent=False)
    batch = st.build([DecodeStage.window_row(w), DecodeStage.file_row(_info("g", 0))], st.WINDOWS, "t")
    windows, files = windows_from_batch(batch)
    assert [f["file_id"] for f in files] == ["g"]
    (got,) = windows
    assert (got.segment_index, got.start_s, got.end_s, got.file_info) == (4, 8.0, 8.2, None)
    np.testing.assert_array_equal(got.samples, samples)


# --- the driver through the real Ray graph -----------------------------------------------------

def _small_archive(directory):
    from pipelines.synth import noise, tone, write_audio

    directory.mkdir()
    for i in range(4):
        write_audio(directory / f"clip{i}.flac", [tone(300.0 + 50 * i, 5.0, 16000), noise(5.0, 16000)][i % 2],
                    16000, "flac")
    return directory


def test_a_file_whose_results_are_unusable_is_an_error_row_and_the_run_completes(tmp_path, ray_local, monkeypatch):
    """The predictor hands back rows of an unknown kind for one file (fault hook): that file gets
    a pipeline_error row naming the reason, its neighbours are ok, the run exits 0."""
    import json

    from pipelines import faults
    from pipelines.cli import main as cli_main
    from pipelines.output import OutputStore

    audio = _small_archive(tmp_path / "audio")
    monkeypatch.setenv(faults.ENV, json.dumps([{"stage": "infer", "uri_contains": "clip2", "corrupt_kind": "bogus"}]))
    out = tmp_path / "out"
    assert cli_main(["run", str(audio), "--out", str(out), "--window-s", "2", "--tasks", "caption",
                     "--max-new-tokens", "2", "--no-progress", "--speech-gate", "off"]) == 0
    files = {r["uri"].rsplit("/", 1)[-1]: r for r in OutputStore(str(out)).read_table("files").to_pylist()}
    assert sorted(files) == [f"clip{i}.flac" for i in range(4)]
    assert (files["clip2.flac"]["status"], files["clip2.flac"]["error_type"]) == ("error", "pipeline_error")
    assert "unknown result kind 'bogus'" in files["clip2.flac"]["error_message"]
    assert all(files[f"clip{i}.flac"]["status"] == "ok" for i in (0, 1, 3))


def test_a_failure_of_the_run_itself_is_failed_in_run_json_and_exit_1_then_resumes(tmp_path, ray_local, monkeypatch,
                                                                                   capsys):
    """A commit that raises (the output stopped being writable; fault hook): one line on stderr,
    exit 1, run.json says failed with the reason (never left at running); the same command
    without the fault resumes the run and completes it exactly once."""
    import json

    from pipelines import faults
    from pipelines.cli import main as cli_main
    from pipelines.output import OutputStore

    audio = _small_archive(tmp_path / "audio")
    out = tmp_path / "out"
    args = ["run", str(audio), "--out", str(out), "--window-s", "2", "--tasks", "caption", "--max-new-tokens", "2",
            "--no-progress", "--flush-files", "1", "--flush-seconds", "0", "--speech-gate", "off"]
    monkeypatch.setenv(faults.ENV, json.dumps([{"stage": "commit", "uri_contains": "clip3", "raise": "disk is full"}]))
    capsys.readouterr()
    assert cli_main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "salmonn-pipeline: error" in line]
    assert len(err) == 1 and "RuntimeError: disk is full" in err[0] and "Traceback" not in err[0]
    store = OutputStore(str(out))
    (run_id,) = store.list_runs()
    rec = store.read_run(run_id)
    assert rec.status == "failed" and rec.error == "RuntimeError: disk is full"
    assert "Traceback" in (out / "_runs" / run_id / "error.txt").read_text()
    capsys.readouterr()
    assert cli_main(["status", str(out)]) == 0   # status says why the run failed
    assert "failed: RuntimeError: disk is full" in capsys.readouterr().out

    monkeypatch.delenv(faults.ENV)
    assert cli_main(args) == 0
    assert store.list_runs() == [run_id] and store.read_run(run_id).status == "completed"
    files = store.read_table("files").to_pylist()
    assert sorted(r["uri"].rsplit("/", 1)[-1] for r in files) == [f"clip{i}.flac" for i in range(4)]
