"""report: counts, plots inlined as SVG, self-contained HTML, text summary, stage times from Ray Data's
structured stats."""

from __future__ import annotations

import argparse
import dataclasses
import re
from html.parser import HTMLParser

import pytest

from pipelines import stage_times
from pipelines.ops import commands as cli_ops
from pipelines.ops import report
from pipelines.output import OutputStore, RunRecord
from tests import ops_fixtures as fx


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("report") / "out")
    fx.build_two_runs(path)
    store = OutputStore(path)
    record = store.read_run(fx.RUN1)
    store.write_run(dataclasses.replace(record, stage_times=STAGES))
    return path


# What the driver records for one pass (stage_times.to_record of Ray Data's summary)
STAGES = [
    {"name": "FromItems", "wall_s": 0.05, "task_s": 0.02759, "tasks": 1},
    {"name": "MapBatches(DecodeStage)", "wall_s": 41.3, "task_s": 39.7, "tasks": 7},
    {"name": "MapBatches(SalmonnPredictor)", "wall_s": 144.0, "task_s": 132.0, "tasks": 14},
]


class _Refs(HTMLParser):
    """Every tag and every attribute that could make a browser fetch something."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.fetching: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "xlink:href", "srcset", "data", "action", "poster") and value and \
                    not value.startswith(("#", "data:")):
                self.fetching.append((tag, name, value))


def test_collect_counts_run1(out):
    d = report.collect(out, fx.RUN1)
    assert d.status_counts == {"ok": 3, "partial": 1, "error": 3}
    assert d.error_types == {"decode_error": 1, "invalid_data": 1, "no_audio_stream": 1, "read_error": 1}
    assert sorted(d.durations_s) == [40.0, 45.0, 75.0, 130.0]
    assert d.segment_rows == (3 + 2 + 2 + 5) * 3
    assert d.tasks == {"transcribe": 12, "caption": 12, "emotion": 12}
    assert sum(d.label_counts.values()) == 12
    assert [s.name for s in d.stages] == ["FromItems", "MapBatches(DecodeStage)", "MapBatches(SalmonnPredictor)"]
    assert d.stages[2].wall_s == pytest.approx(144.0) and d.stages[2].task_s == pytest.approx(132.0)
    # two commits: 2 and 5 minutes after the start
    assert [round(i.t_h * 60, 3) for i in d.intervals] == [2.0, 5.0]
    assert d.throughput == pytest.approx((290 / 3600) / (320 / 3600))
    # the largest file costs most; samples are files with segments, latest text (ep01 from run 2)
    assert d.slowest[0]["uri"].endswith("interviews/ep06.mp3")
    samples = {s.uri: s for s in d.samples}
    assert samples[fx.PREFIX + "ep01.mp3"].run_id == fx.RUN2
    assert samples[fx.PREFIX + "ep01.mp3"].transcript.startswith("v2 ")
    assert d.latest_counts == {"ok": 4, "partial": 1, "error": 2}


def test_default_run_is_the_newest(out):
    d = report.collect(out)
    assert d.run_id == fx.RUN2
    assert d.status_counts == {"ok": 2}
    assert d.stages == ()


def test_html_is_self_contained_with_every_plot_and_the_counts(out, tmp_path):
    path = tmp_path / "r.html"
    report.write_html(report.collect(out, fx.RUN1), str(path))
    page = path.read_text()
    parser = _Refs()
    parser.feed(page)
    # four plots, each an inline SVG drawn by matplotlib
    assert parser.tags.count("svg") == 4
    for title in ("files by status and error type", "audio duration histogram", "throughput over the run",
                  "time per stage"):
        assert f'title="{title}"' in page
    svgs = re.findall(r"<svg\b.*?</svg>", page, flags=re.S)
    assert len(svgs) == 4
    for svg in svgs:  # matplotlib's figure structure, axes and drawn paths
        assert 'id="figure_1"' in svg and 'id="axes_1"' in svg and svg.count("<path") > 10
    # no network needed: no scripts, no external stylesheet, nothing to fetch
    assert "script" not in parser.tags and "link" not in parser.tags and "img" not in parser.tags
    assert parser.fetching == []
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page)
    assert "<?xml" not in page and "DOCTYPE svg" not in page
    assert "@import" not in page
    # the counts
    for needle in (">7<", ">3<", ">1<", "decode_error", "invalid_data", "no_audio_stream", "read_error",
                   "interviews/ep06.mp3", "v2 "):
        assert needle in page, needle


def test_html_without_stats_or_errors_still_has_four_plots(out, tmp_path):
    path = tmp_path / "r2.html"
    report.write_html(report.collect(out, fx.RUN2), str(path))
    page = path.read_text()
    assert page.count("<svg") == 4


def test_text_summary(out):
    text = report.render_text(report.collect(out, fx.RUN1))
    assert "files: 7 processed (error 3, ok 3, partial 1)" in text
    assert "error types: decode_error 1, invalid_data 1, no_audio_stream 1, read_error 1" in text
    assert "MapBatches(SalmonnPredictor)" in text
    assert "slowest files" in text and "samples (latest results)" in text
    assert "archive (latest result of each file, 2 runs): ok 4, error 2, partial 1" in text


def test_stage_times_sum_passes_and_resumes():
    second = [{**e, "wall_s": 30.0, "task_s": 0.5} if e["name"] == "MapBatches(SalmonnPredictor)" else e
              for e in STAGES]
    extra = [{"name": "Write", "wall_s": 5400.0, "task_s": 2e-6, "tasks": 2}]
    stages = {s.name: s for s in stage_times.from_record(STAGES + second + extra)}
    assert list(stages) == ["FromItems", "MapBatches(DecodeStage)", "MapBatches(SalmonnPredictor)", "Write"]
    assert stages["MapBatches(SalmonnPredictor)"].wall_s == pytest.approx(144 + 30)
    assert stages["MapBatches(SalmonnPredictor)"].task_s == pytest.approx(132 + 0.5)
    assert stages["MapBatches(SalmonnPredictor)"].tasks == 28
    assert stages["Write"].wall_s == pytest.approx(5400) and stages["Write"].task_s == pytest.approx(2e-6)
    assert stage_times.from_record(None) == [] and stage_times.from_record([]) == []


@pytest.mark.slow
def test_stage_times_from_a_real_ray_dataset(ray_local):
    """Ray Data's structured summary gives each operator's wall time, task time and task count."""
    import time

    import ray.data

    def slow(batch):
        time.sleep(0.1)
        return batch

    ds = ray.data.range(40, override_num_blocks=4).map_batches(slow, batch_size=10)
    assert sum(len(b["id"]) for b in ds.iter_batches(batch_size=None)) == 40
    times = {t.name: t for t in stage_times.from_ray_summary(ds._get_stats_summary())}
    assert set(times) == {"ReadRange", "MapBatches(slow)"}, times
    mapped = times["MapBatches(slow)"]
    assert mapped.tasks >= 1 and mapped.task_s >= 4 * 0.1 and mapped.wall_s >= 0.1
    entries = stage_times.to_record(times.values())
    assert stage_times.from_record(entries) == list(times.values())


def test_throughput_clock_restarts_at_resume():
    import datetime as dt

    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rows = [{"processed_at": t0 + dt.timedelta(hours=1), "duration_s": 36000.0},
            {"processed_at": t0 + dt.timedelta(hours=30), "duration_s": 36000.0}]
    record = RunRecord(run_id="r", status="completed", started_at=t0.isoformat(),
                       resumes=[(t0 + dt.timedelta(hours=29)).isoformat()])
    ivs = report.throughput_intervals(rows, record)
    assert [iv.rate for iv in ivs] == [pytest.approx(10.0), pytest.approx(10.0)]


def test_cli_report(out, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli_ops.add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", out, "--run", fx.RUN1])
    assert args.func(args) == 0
    assert "files: 7 processed" in capsys.readouterr().out
    html = tmp_path / "x.html"
    args = parser.parse_args(["report", out, "--html", str(html)])
    assert args.func(args) == 0 and html.is_file()
    assert "ok 2" in capsys.readouterr().out
    args = parser.parse_args(["report", str(tmp_path / "nothing")])
    assert args.func(args) == 1
    assert "no runs" in capsys.readouterr().err
