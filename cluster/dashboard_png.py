"""`make dashboard`: six of the Grafana dashboard's panels, drawn from Prometheus into one PNG.

    python -m cluster.dashboard_png [--window 15m] [--end 2025-01-31T12:00:00Z] [--step 3s] [--out docs/dashboard.png]

The charts are the panels of cluster/monitoring/grafana/dashboards/inference.json named in CHARTS, found by
title, each target's PromQL as Grafana sends it (one source of truth: cluster/dashboards.py reads it), asked
of Prometheus's /api/v1/query_range over the window that ends at --end (default: now), one point every
--step (default: the window / 300). A chart with nothing in the window says so instead of failing. Needs
no Grafana: matplotlib (the dev extra) draws the PNG.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from cluster.dashboards import DASHBOARD, load, panels, substitute_variables

# Panel titles of the dashboard, in the PNG's order (two columns).
CHARTS = (
    "Requests/s by status",
    "Latency p50/p99 (ms)",
    "Cache hit ratio",
    "Batch size (texts per batch)",
    "Live replicas by deployment",
    "Job queue depth",
)
POINTS = 300  # the auto step gives this many points per series
NO_DATA = "no data in this window"
UNIT_LABELS = {"reqps": "requests/s", "ms": "ms", "s": "seconds", "percentunit": "", "Bps": "bytes/s"}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_LEGEND = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")


class PrometheusError(RuntimeError):
    pass


@dataclass
class Chart:
    title: str
    unit: str
    series: list[tuple[str, list[float], list[float]]] = field(default_factory=list)  # (label, times, values)

    @property
    def has_data(self) -> bool:
        return any(not math.isnan(v) for _, _, values in self.series for v in values)


def parse_duration(text: str) -> float:
    """Prometheus's duration syntax (15m, 1h30m, 90s, 2d) in seconds."""
    text = text.strip()
    if not text or _DURATION.sub("", text):
        raise ValueError(f"{text!r} is not a duration like 15m, 1h or 90s")
    seconds = sum(float(n) * _SECONDS[unit] for n, unit in _DURATION.findall(text))
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


def parse_time(text: str | None) -> float:
    """Unix seconds, or an ISO 8601 time (UTC when it names no zone); None or "now": now."""
    if text is None or text == "now":
        return time.time()
    try:
        return float(text)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def auto_step(window_s: float) -> float:
    """One point per window / POINTS, never finer than a second."""
    return max(1.0, window_s / POINTS)


def number(value: float) -> str:
    """A number as Prometheus's API takes it: no exponent, no trailing zeros (1737000000, 3, 2.5)."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


def legend(fmt: str, metric: dict[str, str]) -> str:
    """Grafana's legendFormat ({{label}}) filled from a series' labels; the labels themselves without one."""
    if fmt and fmt != "__auto":
        return _LEGEND.sub(lambda m: metric.get(m.group(1), ""), fmt).strip()
    labels = {k: v for k, v in metric.items() if k != "__name__"}
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or metric.get("__name__", "value")


def query_range(client: httpx.Client, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = {"query": expr, "start": number(start), "end": number(end), "step": number(step)}
    response = client.get("/api/v1/query_range", params=params)
    try:
        answer = response.json()
    except ValueError:
        raise PrometheusError(f"Prometheus answered {response.status_code} without JSON to {expr!r}") from None
    if answer.get("status") != "success":
        raise PrometheusError(f"Prometheus refused {expr!r}: {answer.get('error') or answer}")
    return answer["data"]["result"]


def panel_charts(dashboard: Path = DASHBOARD, titles: tuple[str, ...] = CHARTS) -> list[tuple[str, str, list[dict]]]:
    """(title, unit, targets) of each chart, from the dashboard's panels of those titles."""
    by_title = {panel["title"]: panel for panel in panels(load(dashboard))}
    missing = [title for title in titles if title not in by_title]
    if missing:
        raise KeyError(f"the dashboard {dashboard} has no panel titled {missing}")
    found = []
    for title in titles:
        panel = by_title[title]
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        found.append((title, unit, [t for t in panel["targets"] if t.get("expr")]))
    return found


def collect(client: httpx.Client, start: float, end: float, step: float, dashboard: Path = DASHBOARD) -> list[Chart]:
    charts = []
    for title, unit, targets in panel_charts(dashboard):
        chart = Chart(title, unit)
        for target in targets:
            for result in query_range(client, substitute_variables(target["expr"]), start, end, step):
                times = [float(t) for t, _ in result["values"]]
                values = [float(v) for _, v in result["values"]]  # "NaN" (0/0) stays a gap
                chart.series.append((legend(target.get("legendFormat", ""), result["metric"]), times, values))
        charts.append(chart)
    return charts


def render(charts: list[Chart], path: Path, start: float, end: float, step: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    columns = 2
    rows = math.ceil(len(charts) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(7 * columns, 3.6 * rows), squeeze=False)
    begin, finish = (datetime.fromtimestamp(t, tz=UTC) for t in (start, end))
    for ax, chart in zip(axes.flat, charts, strict=False):
        ax.set_title(chart.title)
        ax.set_xlim(begin, finish)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=UTC))
        ax.grid(alpha=0.3)
        if chart.unit == "percentunit":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylabel(UNIT_LABELS.get(chart.unit, ""))
        if not chart.has_data:
            ax.set_yticks([])
            ax.text(0.5, 0.5, NO_DATA, transform=ax.transAxes, ha="center", va="center", color="grey")
            continue
        for label, times, values in chart.series:
            ax.plot([datetime.fromtimestamp(t, tz=UTC) for t in times], values, label=label, linewidth=1.2)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small", loc="upper left")
    for ax in list(axes.flat)[len(charts) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"Inference cluster, {begin:%Y-%m-%d %H:%M:%S} to {finish:%H:%M:%S} UTC "
        f"(window {number(end - start)} s, step {number(step)} s)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def dashboard_png(
    client: httpx.Client, out: Path, window_s: float, end: float, step: float | None = None, dashboard: Path = DASHBOARD
) -> list[Chart]:
    """Ask Prometheus (client's base URL) for every chart's series and write the PNG; the charts drawn."""
    step = step or auto_step(window_s)
    start = end - window_s
    charts = collect(client, start, end, step, dashboard)
    render(charts, out, start, end, step)
    return charts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.dashboard_png", description=__doc__.splitlines()[0])
    parser.add_argument("--window", default="15m", help="how far back from --end (Prometheus duration; 15m)")
    parser.add_argument("--end", default=None, help="the window's end: unix seconds or ISO 8601 (default: now)")
    parser.add_argument("--step", default=None, help="between points (duration; default: the window / 300)")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"), help="the PNG (docs/dashboard.png)")
    parser.add_argument("--prometheus", default=None, help="Prometheus's URL (default: the settings' prometheus_url)")
    args = parser.parse_args(argv)
    try:
        window_s = parse_duration(args.window)
        step = parse_duration(args.step) if args.step else None
        end = parse_time(args.end)
    except ValueError as exc:
        parser.error(str(exc))
    url = args.prometheus
    if url is None:
        from cluster.settings import get_cluster_settings

        url = get_cluster_settings().prometheus_url
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            charts = dashboard_png(client, args.out, window_s, end, step)
    except httpx.HTTPError as exc:
        print(f"error: Prometheus at {url} does not answer ({exc}): is the cluster up (make up)?", file=sys.stderr)
        return 1
    except PrometheusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    empty = [chart.title for chart in charts if not chart.has_data]
    print(
        f"wrote {args.out}: {len(charts)} charts from {url} over {args.window}" + (f"; no data: {empty}" * bool(empty))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
