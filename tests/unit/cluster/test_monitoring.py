"""Prometheus's rendered config and the alert rules, checked by Prometheus's own promtool (`make install`
installs Debian's prometheus package, which ships it)."""

import shutil
import subprocess
from pathlib import Path

import yaml

from cluster.services import Prometheus, RabbitMQ, Ray, ray_env
from cluster.settings import ClusterSettings


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool") or "/usr/bin/promtool"
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False)


def test_the_rendered_config_scrapes_ray_through_its_discovery_file_rabbitmq_and_itself(tmp_path):
    settings = ClusterSettings(state_dir=tmp_path)
    prometheus = Prometheus("prometheus", settings)
    config = yaml.safe_load(prometheus.render())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["ray"]["file_sd_configs"] == [
        {"files": [str(Ray("ray", settings).temp_dir / "prom_metrics_service_discovery.json")]}
    ]
    assert jobs["rabbitmq"]["static_configs"] == [{"targets": [f"127.0.0.1:{settings.rabbitmq_prometheus_port}"]}]
    assert jobs["prometheus"]["static_configs"] == [{"targets": ["127.0.0.1:9090"]}]
    assert config["rule_files"] == [str(prometheus.rules_path)]
    assert config["global"]["scrape_interval"] == f"{settings.prometheus_scrape_interval_s}s"
    # Ray's dashboard is pointed at it, so its metrics views fill.
    assert ray_env(settings)["RAY_PROMETHEUS_HOST"] == "http://127.0.0.1:9090"


def test_promtool_accepts_the_rendered_config_and_the_alert_rules(tmp_path):
    prometheus = Prometheus("prometheus", ClusterSettings(state_dir=tmp_path))
    path = tmp_path / "prometheus.yml"
    path.write_text(prometheus.render())
    checked = promtool("check", "config", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = promtool("check", "rules", str(prometheus.rules_path))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 7 rules found" in rules.stdout + rules.stderr


def test_promtool_refuses_a_broken_rule(tmp_path):
    """The check above can fail: a rule with a broken expression is refused."""
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: Broken\n        expr: sum(rate(up[5m])\n")
    assert promtool("check", "rules", str(broken)).returncode != 0


def test_rabbitmq_serves_its_metrics_on_loopback_per_queue(tmp_path, monkeypatch):
    settings = ClusterSettings(state_dir=tmp_path, rabbitmq_password="pw")
    rabbitmq = RabbitMQ("rabbitmq", settings)
    started = []
    monkeypatch.setattr("cluster.services.ManagedProcess.start", lambda self, *a, **k: started.append(a))
    monkeypatch.setattr("cluster.services.port_open", lambda *a, **k: True)
    rabbitmq.launch()
    assert (rabbitmq.data_dir / "enabled_plugins").read_text() == "[rabbitmq_prometheus].\n"
    conf = (rabbitmq.data_dir / "rabbitmq.conf").read_text()
    assert "prometheus.tcp.ip = 127.0.0.1\n" in conf
    assert f"prometheus.tcp.port = {settings.rabbitmq_prometheus_port}\n" in conf
    assert "prometheus.return_per_object_metrics = true\n" in conf


def test_prometheus_may_listen_on_loopback_only():
    import pytest
    from pydantic import ValidationError

    assert ClusterSettings(prometheus_host="::1").prometheus_host == "::1"
    with pytest.raises(ValidationError, match="not a loopback address"):
        ClusterSettings(prometheus_host="0.0.0.0")


def test_another_prometheus_on_the_port_is_refused_not_used(tmp_path, monkeypatch):
    import pytest

    from cluster.services import ServiceError

    prometheus = Prometheus("prometheus", ClusterSettings(state_dir=tmp_path))
    monkeypatch.setattr(Prometheus, "answers", lambda self: True)  # something answers; no pid file of ours
    with pytest.raises(ServiceError, match="something else already answers"):
        prometheus.ensure()


def test_promtool_accepts_the_compose_config_which_scrapes_what_make_up_does(tmp_path):
    """cluster/monitoring/prometheus-compose.yml (compose.yaml's `monitoring` profile): the same jobs as the
    rendered config, its rules the same alerts.yml (mounted beside it, as compose mounts both)."""
    monitoring = Path(__file__).resolve().parents[3] / "cluster" / "monitoring"
    path = monitoring / "prometheus-compose.yml"
    checked = promtool("check", "config", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout + checked.stderr
    config = yaml.safe_load(path.read_text())
    rendered = yaml.safe_load(Prometheus("prometheus", ClusterSettings(state_dir=tmp_path)).render())
    assert [job["job_name"] for job in config["scrape_configs"]] == [j["job_name"] for j in rendered["scrape_configs"]]
    assert config["rule_files"] == ["alerts.yml"]
    compose = yaml.safe_load((monitoring.parent / "compose.yaml").read_text())["services"]["prometheus"]
    mounted = {v.split(":")[1]: (monitoring.parent / v.split(":")[0]).resolve() for v in compose["volumes"]}
    assert mounted["/etc/prometheus/prometheus.yml"] == path
    assert mounted["/etc/prometheus/alerts.yml"] == monitoring / "alerts.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose["command"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # Ray's discovery file, in the temp dir the `serve` service shares (Ray writes it at the temp dir's top).
    assert jobs["ray"]["file_sd_configs"] == [{"files": ["/tmp/ray/prom_metrics_service_discovery.json"]}]
    assert jobs["rabbitmq"]["metrics_path"] == "/metrics/per-object", "per-queue series, whatever the broker's config"
