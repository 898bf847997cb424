"""The Grafana dashboard and its provisioning (cluster/monitoring/grafana/), validated, never run: no
Grafana installs on these machines (not in Debian 12, not on PyPI). What can be checked with the real
thing is: every panel's PromQL goes through Prometheus's own promtool (`make install` installs Debian's
prometheus package, which ships it), loaded as recording rules, since promtool has no command for a bare
expression. The rest is checked against the files themselves: ids, layout, the datasource's uid, and
the providers' paths against what compose.yaml mounts and where Ray writes its own dashboards.
"""

import json
from pathlib import Path

import pytest
import yaml

from cluster.dashboards import (
    DASHBOARD,
    GRAFANA_VARIABLES,
    load,
    panel_expressions,
    panels,
    series_names,
    substitute_variables,
)
from tests.unit.cluster.test_monitoring import promtool

GRAFANA = DASHBOARD.parents[1]
PROVISIONING = GRAFANA / "provisioning"
CLUSTER = GRAFANA.parents[1]

# What issue 14 asks the dashboard to show, by row.
ROWS = ["Traffic", "Model", "Replicas", "Jobs", "Security & dependencies", "Weights"]


def datasources() -> list[dict]:
    return yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]


def providers() -> dict[str, dict]:
    config = yaml.safe_load((PROVISIONING / "dashboards" / "inference.yml").read_text())
    return {provider["name"]: provider for provider in config["providers"]}


def compose_service(name: str) -> dict:
    return yaml.safe_load((CLUSTER / "compose.yaml").read_text())["services"][name]


def mounts(service: dict) -> dict[str, str]:
    """container path -> source (a host path relative to cluster/, or a volume name), of `src:dst[:ro]`."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        found[target] = source
    return found


def test_the_dashboard_is_one_grafana_dashboard_with_the_rows_asked_for():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "inference-cluster"
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["id"] is None, "a provisioned dashboard carries no database id"
    assert [p["title"] for p in dashboard["panels"] if p["type"] == "row"] == ROWS
    assert {p["type"] for p in panels(dashboard)} <= {"timeseries", "stat"}


def test_panel_ids_are_unique():
    dashboard = load()
    ids = [p["id"] for p in dashboard["panels"]] + [p["id"] for p in panels(dashboard) if p not in dashboard["panels"]]
    assert len(ids) == len(set(ids)), ids
    titles = [p["title"] for p in panels(dashboard)]
    assert len(titles) == len(set(titles)), "panels are found by title (make dashboard)"


def test_every_panel_and_target_uses_the_provisioned_datasource():
    (datasource,) = datasources()
    assert (datasource["uid"], datasource["type"]) == ("prometheus", "prometheus")
    for panel in panels(load()):
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], panel["title"]


def test_every_panel_has_a_query():
    for panel in panels(load()):
        exprs = [t for t in panel.get("targets", []) if t.get("expr", "").strip()]
        assert exprs, f"{panel['title']} has no target with an expr"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_panel_has_a_place_on_the_grid_and_none_overlap():
    dashboard = load()
    boxes = []
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid), panel["title"]
        assert min(grid["w"], grid["h"]) > 0, panel["title"]
        assert min(grid["x"], grid["y"]) >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than Grafana's 24 columns"
        boxes.append((panel["title"], grid))
    for i, (title, a) in enumerate(boxes):
        for other, b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"]
                or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"]
            )
            assert apart, f"{title!r} and {other!r} overlap"


def rules_file(path: Path, exprs: list[str]) -> Path:
    rules = [{"record": f"panel:{i}", "expr": substitute_variables(expr)} for i, expr in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    return path


def test_promtool_accepts_every_panel_expression(tmp_path):
    exprs = [expr for exprs in panel_expressions().values() for expr in exprs]
    checked = promtool("check", "rules", str(rules_file(tmp_path / "panels.yml", exprs)))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in checked.stdout + checked.stderr


def test_the_expression_check_can_fail_and_grafana_variables_are_substituted_first(tmp_path):
    broken = promtool("check", "rules", str(rules_file(tmp_path / "broken.yml", ["sum(rate(up[5m])"])))
    assert broken.returncode != 0
    raw = tmp_path / "raw.yml"
    raw.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "a", "expr": "rate(up[$__rate_interval])"}]}]})
    )
    assert promtool("check", "rules", str(raw)).returncode != 0, "promtool does not know Grafana's variables"
    variables = [f"rate(up[{v}])" for v in GRAFANA_VARIABLES if not v.endswith(("_ms", "_s"))]
    assert promtool("check", "rules", str(rules_file(tmp_path / "vars.yml", variables))).returncode == 0


def test_every_panel_names_a_series_of_this_project_ray_or_rabbitmq():
    for title, exprs in panel_expressions().items():
        names = set().union(*(series_names(expr) for expr in exprs))
        assert names, f"{title} names no series"
        assert all(name.startswith(("ray_", "rabbitmq_")) for name in names), (title, names)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (status) (rate(ray_inference_requests_total{status=~"5.."}[1m]))', {"ray_inference_requests_total"}),
        (
            "sum by (le) (rate(ray_embedding_batch_texts_sum[5m])) / sum(rate(ray_embedding_batch_texts_count[5m]))",
            {"ray_embedding_batch_texts_sum", "ray_embedding_batch_texts_count"},
        ),
        (
            'up == 0 or on(up) absent(rabbitmq_queue_messages{queue="ray_not_a_series"})',
            {"up", "rabbitmq_queue_messages"},
        ),
        ('label_replace(ray_a, "ray_label", "$1", "up", "(.*)")', {"ray_a"}),
        ("histogram_quantile(0.99, sum by (le, up) (rate(ray_x_bucket[$__rate_interval])))", {"ray_x_bucket"}),
    ],
)
def test_series_names_are_the_metrics_not_functions_labels_or_values(expr, names):
    assert series_names(expr) == names


def test_the_datasource_url_comes_from_compose_with_prometheus_as_default():
    (datasource,) = datasources()
    assert datasource["url"] == "${PROMETHEUS_URL}"
    assert datasource["access"] == "proxy", "Grafana's server asks Prometheus, not the browser"
    grafana = compose_service("grafana")
    assert grafana["environment"]["PROMETHEUS_URL"] == "${PROMETHEUS_URL:-http://prometheus:9090}"
    assert "prometheus" in yaml.safe_load((CLUSTER / "compose.yaml").read_text())["services"]


def test_the_providers_read_this_dashboard_and_rays_from_where_compose_mounts_them():
    found = providers()
    grafana = mounts(compose_service("grafana"))
    ours = found["inference-cluster"]
    assert (ours["type"], ours["options"]["path"]) == ("file", "/var/lib/grafana/dashboards")
    assert (CLUSTER / grafana["/var/lib/grafana/dashboards"]).resolve() == DASHBOARD.parent
    assert (CLUSTER / grafana["/etc/grafana/provisioning"]).resolve() == PROVISIONING
    # Ray's: Ray's dashboard process writes them to <temp dir>/session_latest/metrics/grafana/dashboards.
    ray = Path(found["ray"]["options"]["path"])
    assert ray.parts[-4:] == ("session_latest", "metrics", "grafana", "dashboards")
    temp_dir = str(ray.parents[3])
    assert temp_dir == "/tmp/ray", "Ray's default temp dir, where the serve service's Ray writes"
    assert grafana[temp_dir] == mounts(compose_service("serve"))[temp_dir] == "ray-temp"


def test_ray_writes_its_dashboards_where_the_provider_looks(tmp_path, monkeypatch):
    """Ray's own dashboard module (MetricsHead, as the head's dashboard runs it at start) writes them into
    a temp dir laid out as Ray lays it out; the provider's folder, under that temp dir, holds them."""
    from ray.dashboard.modules.metrics.metrics_head import MetricsHead
    from ray.dashboard.subprocesses.module import SubprocessModuleConfig

    for name in ("RAY_METRICS_OUTPUT_ROOT", "RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"):
        monkeypatch.delenv(name, raising=False)
    session = tmp_path / "session_2025-01-01_00-00-00_000000_1"
    session.mkdir()
    (tmp_path / "session_latest").symlink_to(session)  # as Ray links it
    config = SubprocessModuleConfig(
        cluster_id_hex="00",
        gcs_address="127.0.0.1:6380",
        session_name=session.name,
        temp_dir=str(tmp_path),
        session_dir=str(session),
        logging_level="INFO",
        logging_format="%(message)s",
        log_dir=str(tmp_path),
        logging_filename="dashboard.log",
        logging_rotate_bytes=1,
        logging_rotate_backup_count=1,
        socket_dir=str(tmp_path),
    )
    MetricsHead(config)._create_default_grafana_configs()
    folder = tmp_path / Path(providers()["ray"]["options"]["path"]).relative_to("/tmp/ray")
    generated = {path.name: json.loads(path.read_text()) for path in folder.glob("*.json")}
    assert {"default_grafana_dashboard.json", "serve_grafana_dashboard.json"} <= set(generated)
    assert load()["uid"] not in {dashboard["uid"] for dashboard in generated.values()}
    # Their queries go to the default Prometheus datasource, through a `datasource` variable.
    variables = {v["name"]: v for v in generated["serve_grafana_dashboard.json"]["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    (datasource,) = datasources()
    assert datasource["isDefault"] is True


def test_every_provisioning_file_is_yaml_grafana_reads():
    for path in PROVISIONING.rglob("*"):
        if path.is_file():
            assert path.suffix in (".yml", ".yaml"), path
            assert yaml.safe_load(path.read_text())["apiVersion"] == 1, path
