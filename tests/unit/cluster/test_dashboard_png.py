"""`make dashboard` (cluster/dashboard_png.py) against a fake Prometheus (httpx.MockTransport): the queries are
the dashboard's panels', over the window asked for, and the PNG is written, with or without data."""

import math
import re
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import matplotlib.axes
import pytest

from cluster import dashboard_png
from cluster.dashboard_png import (
    CHARTS,
    NO_DATA,
    PrometheusError,
    auto_step,
    legend,
    panel_charts,
    parse_duration,
    parse_time,
)
from cluster.dashboards import panel_expressions

PNG = b"\x89PNG\r\n\x1a\n"
END = 1_737_000_000.0
REPO = Path(__file__).resolve().parents[3]


class FakePrometheus:
    """Answers /api/v1/query_range with one series per query (or none), and keeps every request's params."""

    def __init__(self, values=None, status="success"):
        self.asked: list[dict[str, str]] = []
        self.values = values
        self.status = status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/query_range"
        params = {k: v[0] for k, v in parse_qs(request.url.query.decode()).items()}
        self.asked.append(params)
        if self.status != "success":
            return httpx.Response(400, json={"status": "error", "errorType": "bad_data", "error": "parse error"})
        result = []
        if self.values is not None:
            start, step = float(params["start"]), float(params["step"])
            points = [[start + i * step, value] for i, value in enumerate(self.values)]
            result = [{"metric": {"status": "200", "model": "m", "deployment": "EmbeddingModel"}, "values": points}]
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "matrix", "result": result}})

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self), base_url="http://prometheus.test")


@pytest.fixture
def drawn_texts(monkeypatch):
    """Every text drawn on a chart's axes."""
    texts: list[str] = []
    original = matplotlib.axes.Axes.text

    def text(self, x, y, s, *args, **kwargs):
        texts.append(s)
        return original(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "text", text)
    return texts


def test_the_png_is_written_from_each_charts_queries_over_the_window(tmp_path, drawn_texts):
    fake = FakePrometheus(values=["1", "2.5", "3"])
    out = tmp_path / "docs" / "dashboard.png"
    with fake.client() as client:
        charts = dashboard_png.dashboard_png(client, out, window_s=900, end=END)
    assert out.read_bytes().startswith(PNG)
    assert [chart.title for chart in charts] == list(CHARTS)
    assert all(chart.has_data for chart in charts)
    assert NO_DATA not in drawn_texts
    # Each target of each chart's panel, as the dashboard writes it, over [end - 15m, end] every 900/300 s.
    expressions = panel_expressions()
    expected = [expr for title in CHARTS for expr in expressions[title]]
    assert [asked["query"] for asked in fake.asked] == expected
    for asked in fake.asked:
        assert (asked["start"], asked["end"], asked["step"]) == ("1736999100", "1737000000", "3")


def test_a_chart_without_data_says_so_instead_of_failing(tmp_path, drawn_texts):
    fake = FakePrometheus(values=None)  # every query: an empty matrix
    out = tmp_path / "empty.png"
    with fake.client() as client:
        charts = dashboard_png.dashboard_png(client, out, window_s=3600, end=END, step=30)
    assert out.read_bytes().startswith(PNG)
    assert not any(chart.has_data for chart in charts)
    assert drawn_texts.count(NO_DATA) == len(CHARTS)
    assert {asked["step"] for asked in fake.asked} == {"30"}


def test_a_ratio_of_nothing_nan_only_is_no_data_too(tmp_path, drawn_texts):
    fake = FakePrometheus(values=["NaN", "NaN"])  # 0/0: a cache hit ratio with no lookups
    with fake.client() as client:
        charts = dashboard_png.dashboard_png(client, tmp_path / "nan.png", window_s=600, end=END)
    assert not any(chart.has_data for chart in charts)
    assert drawn_texts.count(NO_DATA) == len(CHARTS)
    assert all(math.isnan(v) for chart in charts for _, _, values in chart.series for v in values)


def test_a_query_prometheus_refuses_is_an_error_not_an_empty_chart(tmp_path):
    with FakePrometheus(status="error").client() as client, pytest.raises(PrometheusError, match="parse error"):
        dashboard_png.dashboard_png(client, tmp_path / "x.png", window_s=600, end=END)
    assert not (tmp_path / "x.png").exists()


def test_every_chart_is_a_dashboard_panel_with_a_query():
    charts = panel_charts()
    assert [title for title, _, _ in charts] == list(CHARTS)
    assert all(targets for _, _, targets in charts)
    with pytest.raises(KeyError, match="no panel titled"):
        panel_charts(titles=("Not a panel",))


@pytest.mark.parametrize(
    ("text", "seconds"), [("15m", 900), ("1h", 3600), ("1h30m", 5400), ("90s", 90), ("2d", 172800), ("500ms", 0.5)]
)
def test_durations_are_prometheus_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "15", "m", "15 minutes", "0s", "-5m"])
def test_a_duration_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_times_and_the_auto_step():
    assert parse_time("1737000000") == END
    assert parse_time("2025-01-16T04:00:00Z") == END
    assert parse_time("2025-01-16T04:00:00") == END  # no zone: UTC
    assert abs(parse_time(None) - parse_time("now")) < 5
    assert auto_step(900) == 3
    assert auto_step(60) == 1, "never finer than a second"


def test_legends_are_grafanas_legend_format():
    metric = {"__name__": "ray_x", "status": "429", "model": "m"}
    assert legend("{{status}}", metric) == "429"
    assert legend("p99 {{ model }}", metric) == "p99 m"
    assert legend("", metric) == "model=m, status=429"


def test_main_says_when_prometheus_does_not_answer(tmp_path, capsys):
    code = dashboard_png.main(["--prometheus", "http://127.0.0.1:1", "--out", str(tmp_path / "x.png")])
    assert code == 1
    assert "does not answer" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_make_dashboard_runs_the_module_with_its_window_and_output():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^\.PHONY:.* dashboard\b", makefile, re.MULTILINE)
    (rule,) = re.findall(r"^dashboard: install +## .+\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert "-m cluster.dashboard_png --window $(WINDOW) --out $(OUT)" in rule
    assert re.search(r"^WINDOW \?= 15m$", makefile, re.MULTILINE)
    assert re.search(r"^OUT \?= docs/dashboard.png$", makefile, re.MULTILINE)
