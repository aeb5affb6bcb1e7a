"""Every invalid argument is one line on stderr and exit code 2, before Ray starts.

Each rule goes through the real console entry point ``pipelines.cli.main``; ``ray.init`` is
replaced by a function that records the call and fails, and ``ray.is_initialized`` reports False,
so an argument that slipped through to a run would try to start Ray and fail the test.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest

from pipelines import synth as S
from pipelines.cli import build_parser, config_from_args, main
from pipelines.config import MODEL_OPTIONS, ConfigError, PipelineConfig, check_output
from pipelines.decode import DecodeOptions


@pytest.fixture
def no_ray(monkeypatch):
    """Fail (and record) any attempt to start or connect to Ray."""
    import ray

    calls: list[tuple] = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("ray.init was called: the argument was not rejected before Ray")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    return calls


@pytest.fixture
def archive(tmp_path):
    """An input folder with one short clip, an existing output folder with no runs, a regular file."""
    d = tmp_path / "audio"
    d.mkdir()
    S.write_audio(d / "a.wav", S.tone(440, 1.0, 16000), 16000, "wav")
    out = tmp_path / "out"
    out.mkdir()
    plain = tmp_path / "plain.txt"
    plain.write_text("not a directory\n")
    return {"in": str(d), "out": str(out), "file": str(plain)}


def _run_cli(argv, capsys) -> tuple[int, list[str]]:
    try:
        rc = main(argv)
    except SystemExit as e:    # argparse's own errors exit from parse_args
        rc = e.code
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


# (extra run arguments, words the one-line message must contain)
RULES = {
    "window 0": (["--window-s", "0"], "--window-s"),
    "window negative": (["--window-s", "-5"], "--window-s"),
    "window over the model's 30 s": (["--window-s", "31"], "--window-s"),
    "window nan": (["--window-s", "nan"], "--window-s"),
    "window under a second": (["--window-s", "0.001"], "--window-s"),
    "hop under a second": (["--hop-s", "0.01"], "--hop-s"),
    "hop 0": (["--hop-s", "0"], "--hop-s"),
    "hop over the window": (["--window-s", "10", "--hop-s", "11"], "--hop-s"),
    "max duration 0": (["--max-duration-s", "0"], "--max-duration-s"),
    "max duration inf": (["--max-duration-s", "inf"], "--max-duration-s"),
    "max bytes 0": (["--max-bytes", "0"], "--max-bytes"),
    "unknown task": (["--tasks", "nonsense"], "nonsense"),
    "no task at all": (["--tasks", ""], "--tasks"),
    "unknown task setting": (["--task-setting", "caption.bogus=1"], "bogus"),
    "task setting of an absent task": (["--tasks", "caption", "--task-setting", "emotion.num_beams=2"], "emotion"),
    "task setting without a key": (["--task-setting", "caption=1"], "TASK.KEY=VALUE"),
    "task setting of the wrong type": (["--task-setting", "caption.num_beams=abc"], "num_beams"),
    "task setting nan": (["--task-setting", "transcribe.lora_scale=NaN"], "lora_scale"),
    "num beams 0": (["--num-beams", "0"], "--num-beams"),
    "max new tokens 0": (["--max-new-tokens", "0"], "--max-new-tokens"),
    "repetition penalty 0": (["--repetition-penalty", "0"], "--repetition-penalty"),
    "lora scale nan": (["--lora-scale", "nan"], "--lora-scale"),
    "lora scale inf": (["--lora-scale", "inf"], "--lora-scale"),
    "lora scale negative": (["--lora-scale", "-1"], "--lora-scale"),
    "resume a run that does not exist": (["--resume", "NOSUCHRUN"], "NOSUCHRUN"),
    "resume a path": (["--resume", "../elsewhere"], "--resume"),
    "resume and fresh": (["--resume", "x", "--fresh"], "--fresh"),
    "batch size negative": (["--batch-size", "-3"], "--batch-size"),
    "batch size 0": (["--batch-size", "0"], "--batch-size"),
    "infer actors negative": (["--infer-actors", "-1"], "--infer-actors"),
    "decode actors 0": (["--decode-actors", "0"], "--decode-actors"),
    "num cpus 0": (["--num-cpus", "0"], "--num-cpus"),
    "gpus per actor negative": (["--gpus-per-actor", "-1"], "--gpus-per-actor"),
    "flush files 0": (["--flush-files", "0"], "--flush-files"),
    "flush seconds negative": (["--flush-seconds", "-1"], "--flush-seconds"),
    "model option unknown key": (["--model-option", "whisper=/models/whisper-large-v2"], "whisper_path"),
    "model option misspelt": (["--model-option", "numercs=fp32"], "numerics"),
    "model option bad numerics": (["--model-option", "numerics=fp8"], "numerics"),
    "model option without a value": (["--model-option", "whisper_path"], "KEY=VALUE"),
    "unknown model": (["--model", "salmonn-99b"], "salmonn-99b"),
    "storage option without =": (["--storage-option", "anon"], "--storage-option"),
    "empty extensions": (["--extensions", ","], "--extensions"),
    "prompt without text": (["--prompt", "ask="], "--prompt"),
    "two tasks with one name": (["--tasks", "caption", "--prompt", "caption=Say something."], "unique"),
    "not a number": (["--window-s", "abc"], "--window-s"),
    "unknown flag": (["--windw-s", "10"], "--windw-s"),
}


@pytest.mark.parametrize("name", list(RULES))
def test_invalid_run_argument_is_one_line_and_exit_2_before_ray(name, archive, capsys, no_ray):
    extra, needle = RULES[name]
    rc, lines = _run_cli(["run", archive["in"], "--out", archive["out"], *extra], capsys)
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("salmonn-pipeline: error: ") and needle in lines[0], lines
    assert "Traceback" not in lines[0]
    assert no_ray == []


def test_out_pointing_at_a_regular_file(archive, capsys, no_ray):
    rc, lines = _run_cli(["run", archive["in"], "--out", archive["file"]], capsys)
    assert rc == 2 and len(lines) == 1 and "regular file" in lines[0], lines
    assert no_ray == []


def test_a_fifo_as_the_input_is_refused_without_reading_it(archive, tmp_path, capsys, no_ray):
    fifo = tmp_path / "list.txt"
    os.mkfifo(fifo)          # opening it for reading would block until a writer came
    rc, lines = _run_cli(["run", str(fifo), "--out", archive["out"]], capsys)
    assert rc == 2 and len(lines) == 1 and "FIFO" in lines[0], lines
    assert no_ray == []


def test_missing_input_location(archive, capsys, no_ray):
    rc, lines = _run_cli(["run", archive["in"] + "-typo", "--out", archive["out"]], capsys)
    assert rc == 2 and len(lines) == 1 and "input not found" in lines[0] and "-typo" in lines[0], lines
    assert no_ray == []


@pytest.mark.parametrize("argv", [
    ["plan", "{in}", "--out", "{out}", "--window-s", "0"],
    ["plan", "{in}-typo", "--out", "{out}"],
    ["demo", "--dir", "{out}", "--num-cpus", "0"],
    ["status", "{out}", "--storage-option", "anon"],
])
def test_other_subcommands_share_the_rules(argv, archive, capsys, no_ray):
    rc, lines = _run_cli([a.format(**archive) for a in argv], capsys)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("salmonn-pipeline: error: "), lines
    assert no_ray == []


def test_valid_arguments_build_the_config_they_say(archive):
    args = build_parser().parse_args([
        "run", archive["in"], "--out", archive["out"], "--tasks", "caption,transcribe", "--lora-scale", "2",
        "--task-setting", "caption.num_beams=4", "--window-s", "10", "--hop-s", "5", "--batch-size", "3",
        "--model-option", "whisper_path=/models/whisper-large-v2", "--model-option", "numerics=fp32",
        "--extensions", ".MP3,wav",
    ])
    cfg = config_from_args(args)
    assert [t.name for t in cfg.tasks] == ["caption", "transcribe"]
    assert [(t.settings.num_beams, t.settings.lora_scale) for t in cfg.tasks] == [(4, 2.0), (1, 2.0)]
    assert (cfg.decode.window_s, cfg.decode.hop_s, cfg.batch_size) == (10.0, 5.0, 3)
    assert dict(cfg.model_options) == {"whisper_path": "/models/whisper-large-v2", "numerics": "fp32"}
    assert cfg.extensions == ("mp3", "wav")
    blank = config_from_args(build_parser().parse_args(["run", archive["in"], "--out", archive["out"],
                                                        "--extensions", ""]))
    assert blank.extensions is None          # '' is the default: audio and video extensions
    check_output(cfg)   # an existing, empty output folder is fine


def test_a_model_option_sets_a_path_and_keeps_the_dimensions():
    """The CLI help's example: --model-option whisper_path=... names the Whisper part; the Whisper
    dimensions stay a WhisperDims (the old 'whisper=...' replaced them with a string)."""
    import salmonn

    cfg = PipelineConfig(input="x", out="y", model="salmonn-7b",
                         model_options={"whisper_path": "/models/whisper-large-v2"})
    model = salmonn.SalmonnConfig.from_name(cfg.model, **cfg.model_options)
    assert model.whisper_path == "/models/whisper-large-v2"
    assert model.whisper == salmonn.SalmonnConfig.from_name("salmonn-7b").whisper
    assert set(MODEL_OPTIONS) <= {f.name for f in dataclasses.fields(salmonn.SalmonnConfig)}


@pytest.mark.parametrize("change", [
    {"num_cpus": 0}, {"batch_size": 0}, {"infer_actors": -1}, {"decode_actors": 0}, {"flush_files": 0},
    {"gpus_per_infer_actor": math.nan}, {"model_options": {"whisper": "/m"}}, {"model": "nope"},
    {"out": ""}, {"input": ()}, {"resume_run_id": "r", "fresh": True}, {"max_passes": 0},
])
def test_python_api_validates_the_same_rules(change):
    base = PipelineConfig(input="in", out="out")
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(base, **change)
    assert "\n" not in str(err.value)


def test_python_api_refuses_nan_generation_settings():
    import salmonn

    task = salmonn.Task("caption", "Describe the audio.", salmonn.GenerationSettings(lora_scale=math.nan))
    with pytest.raises(ConfigError, match="lora_scale"):
        PipelineConfig(input="in", out="out", tasks=(task,))
    with pytest.raises(ValueError, match="max_duration_s"):
        DecodeOptions(max_duration_s=math.inf)


def test_check_output_finds_the_run_record(tmp_path):
    out = tmp_path / "out"
    (out / "_runs" / "20250101T000000Z-abcdef").mkdir(parents=True)
    (out / "_runs" / "20250101T000000Z-abcdef" / "run.json").write_text("{}")
    check_output(PipelineConfig(input="in", out=str(out), resume_run_id="20250101T000000Z-abcdef"))
    with pytest.raises(ConfigError, match="no such run"):
        check_output(PipelineConfig(input="in", out=str(out), resume_run_id="20250101T000000Z-000000"))
