"""Prometheus, started by the bring-up, collects what the cluster exports: Ray's and Serve's metrics and
this project's (through Ray's metrics API), and RabbitMQ's; the Ray dashboard finds it; every alert
rule's expression names series it holds after this test's own traffic."""

import re
import time

import httpx
import pytest

from cluster.nodes import dashboard_get
from cluster.processes import wait_until
from tests.integration.helpers import MODEL, listener_pid, submit, wait_for

# Names in a PromQL expression that are series, not functions or keywords.
SERIES = re.compile(r"\b((?:ray|rabbitmq)_[a-zA-Z0-9_:]+|up)\b")


@pytest.fixture(scope="module")
def prometheus(settings):
    with httpx.Client(base_url=settings.prometheus_url, timeout=10) as client:
        yield client


def query(prometheus, expr: str) -> list[dict]:
    answer = prometheus.get("/api/v1/query", params={"query": expr}).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def test_prometheus_listens_on_loopback_only(settings):
    assert settings.prometheus_host == "127.0.0.1"
    assert listener_pid(settings.prometheus_port, host="127.0.0.1") is not None


def test_every_target_is_scraped_ray_rabbitmq_and_prometheus_itself(prometheus):
    def healthy() -> dict[str, set[str]]:
        targets = prometheus.get("/api/v1/targets").json()["data"]["activeTargets"]
        by_job: dict[str, set[str]] = {}
        for target in targets:
            by_job.setdefault(target["labels"]["job"], set()).add(target["health"])
        return by_job

    def all_up() -> bool:
        found = healthy()
        return {"ray", "rabbitmq", "prometheus"} <= set(found) and all(h == {"up"} for h in found.values())

    assert wait_until(all_up, 60), healthy()


def test_the_ray_dashboard_finds_prometheus(settings):
    answer = dashboard_get(settings, "/api/prometheus_health")
    assert answer.get("result") is True, answer


def value(prometheus, expr: str) -> float:
    found = query(prometheus, expr)
    return float(found[0]["value"][1]) if found else 0.0


def test_traffic_and_a_job_show_up_in_prometheus_and_every_alert_names_held_series(settings, api, prometheus):
    """Counted from this test's own traffic (counters read before and after), and the alert rules' series
    looked up from the test's start only, so nothing an earlier run left in Prometheus's data counts."""
    started = time.time()
    texts_before = value(prometheus, "sum(ray_embedding_texts_computed_total)")
    requests_before = value(prometheus, 'sum(ray_serve_num_http_requests_total{application="inference"})')
    for i in range(5):
        response = api.post("/v1/embeddings", json={"model": MODEL, "input": [f"monitored {i} {time.time()}"]})
        assert response.status_code == 200, response.text
    job = submit(api, input=[f"a monitored job {time.time()}"])
    assert job.status_code == 202, job.text
    assert wait_for(api, job.json()["id"])["status"] == "succeeded"

    def counted() -> bool:
        texts = value(prometheus, "sum(ray_embedding_texts_computed_total)") - texts_before
        requests = value(prometheus, 'sum(ray_serve_num_http_requests_total{application="inference"})')
        queues = query(prometheus, 'rabbitmq_queue_messages_ready{queue="jobs"}')
        return texts >= 6 and requests - requests_before >= 6 and bool(queues)

    assert wait_until(counted, 60, interval_s=2), "the traffic did not reach Prometheus within 60 s"

    rules = prometheus.get("/api/v1/rules").json()["data"]["groups"]
    expressions = {rule["name"]: rule["query"] for group in rules for rule in group["rules"]}
    assert len(expressions) == 7, expressions

    def missing() -> dict[str, list[str]]:
        absent: dict[str, list[str]] = {}
        for name, expr in expressions.items():
            for series in set(SERIES.findall(expr)):
                held = prometheus.get("/api/v1/series", params={"match[]": series, "start": started}).json()["data"]
                if not held:
                    absent.setdefault(name, []).append(series)
        return absent

    # A target scraped every 10 s may not have been scraped since the test began: a few scrapes' grace.
    wait_until(lambda: not missing(), 3 * settings.prometheus_scrape_interval_s, interval_s=2)
    assert not missing(), f"alert rules name series Prometheus does not hold: {missing()}"
