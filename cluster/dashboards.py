"""The Grafana dashboard's panels as data: each panel's PromQL, and the series each expression names.

cluster/monitoring/grafana/dashboards/inference.json is the one source of the cluster's charts: Grafana
shows it (cluster/compose.yaml, profile monitoring), `make dashboard` draws some of its panels into a PNG
(cluster/dashboard_png.py), tests/unit/cluster/test_grafana.py checks every expression with promtool, and
tests/integration/infra/test_dashboards.py checks that Prometheus holds every series a panel names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent / "monitoring" / "grafana" / "dashboards" / "inference.json"

# Grafana's own variables that a Prometheus query may use, and what stands in for them outside Grafana.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "${__rate_interval}": "1m",
    "$__interval_ms": "15000",
    "$__interval": "15s",
    "${__interval}": "15s",
    "$__range_s": "3600",
    "$__range": "1h",
    "${__range}": "1h",
}

# Names in PromQL that are series: this project's, Ray's and Serve's (ray_*), RabbitMQ's, and `up`.
_SERIES = re.compile(r"(?<![\w:$])((?:ray|rabbitmq)_[A-Za-z0-9_:]*|up)(?![\w:])(?!\s*\()")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")


def load(path: Path = DASHBOARD) -> dict:
    return json.loads(Path(path).read_text())


def panels(dashboard: dict) -> list[dict]:
    """Every panel that shows data: rows are layout only (a collapsed row holds its panels itself)."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def panel_targets(path: Path = DASHBOARD) -> dict[str, list[dict]]:
    """panel title -> its Prometheus targets (expr, legendFormat, refId)."""
    return {panel["title"]: [t for t in panel.get("targets", []) if t.get("expr")] for panel in panels(load(path))}


def panel_expressions(path: Path = DASHBOARD) -> dict[str, list[str]]:
    """panel title -> the PromQL of each of its targets, as written in the dashboard."""
    return {title: [t["expr"] for t in targets] for title, targets in panel_targets(path).items()}


def substitute_variables(expr: str) -> str:
    """The expression with Grafana's variables ($__rate_interval, ...) replaced, for Prometheus itself."""
    for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(variable, GRAFANA_VARIABLES[variable])
    return expr


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects, as written (a `_bucket` stays a `_bucket`): names
    starting ray_ or rabbitmq_, and `up`; not functions, label names or label values."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("{}", text)
    text = _LABEL_LISTS.sub("", text)
    return set(_SERIES.findall(text))
