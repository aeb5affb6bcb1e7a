"""report: counts, plots inlined as SVG, self-contained HTML, text summary, stage-time parsing."""

from __future__ import annotations

import argparse
import re
from html.parser import HTMLParser

import pytest

from pipelines import cli_ops, report
from tests import ops_fixtures as fx


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("report") / "out")
    fx.build_two_runs(path)
    return path


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


def test_stage_times_sum_passes_and_units():
    text = (fx.RAY_STATS + "\n\n" + fx.RAY_STATS.replace("2.4min", "30s").replace("2.2min total", "500ms total")
            + "\nOperator 3 Write: 2 tasks executed, 2 blocks produced in 1.5h\n* Remote wall time: 1us min, "
              "1us max, 1us mean, 2us total\n")
    stages = {s.name: s for s in report.stage_times(text)}
    assert stages["MapBatches(SalmonnPredictor)"].wall_s == pytest.approx(144 + 30)
    assert stages["MapBatches(SalmonnPredictor)"].task_s == pytest.approx(132 + 0.5)
    assert stages["MapBatches(SalmonnPredictor)"].tasks == 28
    assert stages["Write"].wall_s == pytest.approx(5400) and stages["Write"].task_s == pytest.approx(2e-6)


def test_throughput_clock_restarts_at_resume():
    import datetime as dt

    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = [{"processed_at": t0 + dt.timedelta(hours=1), "duration_s": 36000.0},
            {"processed_at": t0 + dt.timedelta(hours=30), "duration_s": 36000.0}]
    record = {"started_at": t0.isoformat(), "resumes": [(t0 + dt.timedelta(hours=29)).isoformat()]}
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
