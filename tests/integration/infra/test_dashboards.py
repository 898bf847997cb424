"""The Grafana dashboard's panels (cluster/monitoring/grafana/dashboards/inference.json) ask for series that
Prometheus holds: after this test's own traffic (embeddings, a cache hit, a refused key, a 429 and a job),
every series a panel names is looked up from the test's start, so nothing an earlier run left counts.
Grafana itself is not run (none on these machines); `make dashboard` draws from the same panels."""

import time
import uuid

import httpx
import pytest

from cluster.dashboards import panel_expressions, series_names
from cluster.processes import wait_until
from tests.integration.helpers import MODEL, submit, wait_for


@pytest.fixture(scope="module")
def prometheus(settings):
    with httpx.Client(base_url=settings.prometheus_url, timeout=10) as client:
        yield client


def value(prometheus, expr: str) -> float:
    answer = prometheus.get("/api/v1/query", params={"query": expr}).json()
    assert answer["status"] == "success", answer
    found = answer["data"]["result"]
    return float(found[0]["value"][1]) if found else 0.0


def held(prometheus, series: str, since: float) -> bool:
    answer = prometheus.get("/api/v1/series", params={"match[]": series, "start": since}).json()
    assert answer["status"] == "success", answer
    return bool(answer["data"])


def send_traffic(settings, api, make_key, tenant) -> None:
    """A cache hit, a refused key, a 429 and a job: what the panels of rarer events need to show something."""
    text = f"dashboard {uuid.uuid4().hex}"
    for _ in range(2):  # the second time, from the cache
        response = api.post("/v1/embeddings", json={"model": MODEL, "input": [text]})
        assert response.status_code == 200, response.text
    assert response.headers["X-Cache-Hits"] == "1"
    for i in range(3):
        response = api.post("/v1/embeddings", json={"model": MODEL, "input": [f"dashboard {i} {time.time()}"]})
        assert response.status_code == 200, response.text
    # An auth refusal: a key nobody issued, at the public door.
    with httpx.Client(base_url=settings.public_url, timeout=30) as anonymous:
        refused = anonymous.post(
            "/v1/embeddings", json={"model": MODEL, "input": "x"}, headers={"Authorization": "Bearer not-a-key"}
        )
    assert refused.status_code == 401, refused.text
    # A 429: a key whose work budget one big request spends.
    key = make_key(tenant, name="dashboard: tiny budget", token_rate_per_s=1, token_burst=50)
    with httpx.Client(base_url=settings.public_url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        first = client.post("/v1/embeddings", json={"model": MODEL, "input": f"{uuid.uuid4().hex} " * 11})
        assert first.status_code == 200, first.text
        limited = client.post("/v1/embeddings", json={"model": MODEL, "input": f"never computed {uuid.uuid4().hex}"})
    assert limited.status_code == 429, limited.text
    job = submit(api, input=[f"a dashboard job {time.time()}"])
    assert job.status_code == 202, job.text
    assert wait_for(api, job.json()["id"])["status"] == "succeeded"


# What the test's traffic must add to the product's counters (each is exported from zero at a replica's start, so
# a dependency error, a dropped record or a weights download, which this test cannot cause, still has a series).
EXPECTED_RISES = {
    'sum(ray_embedding_cache_lookups_total{result="hit"})': 1,
    'sum(ray_auth_refusals_total{reason="malformed"})': 1,
    'sum(ray_rate_limited_total{limiter="tokens"})': 1,
    'sum(ray_jobs_total{state="accepted"})': 1,
    'sum(ray_jobs_total{state="succeeded"})': 1,
    'sum(ray_inference_requests_total{route="/v1/embeddings",status="200"})': 6,
    'sum(ray_inference_requests_total{route="/v1/embeddings",status="429"})': 1,
}


def test_every_panel_names_series_prometheus_holds_after_the_tests_own_traffic(
    settings, api, make_key, tenant, prometheus
):
    started = time.time()
    before = {expr: value(prometheus, expr) for expr in EXPECTED_RISES}
    send_traffic(settings, api, make_key, tenant)

    def rises() -> dict[str, float]:
        return {expr: value(prometheus, expr) - before[expr] for expr in EXPECTED_RISES}

    def counted() -> bool:
        return all(rise >= EXPECTED_RISES[expr] for expr, rise in rises().items())

    assert wait_until(counted, 60, interval_s=2), f"the test's traffic did not reach Prometheus within 60 s: {rises()}"

    panels = panel_expressions()
    assert len(panels) >= 20, panels

    def missing() -> dict[str, list[str]]:
        absent: dict[str, list[str]] = {}
        for title, exprs in panels.items():
            for series in sorted(set().union(*(series_names(expr) for expr in exprs))):
                if not held(prometheus, series, started):
                    absent.setdefault(title, []).append(series)
        return absent

    # A target scraped every 10 s may not have been scraped since the test began: a few scrapes' grace.
    wait_until(lambda: not missing(), 3 * settings.prometheus_scrape_interval_s, interval_s=2)
    assert not missing(), f"panels name series Prometheus does not hold: {missing()}"
