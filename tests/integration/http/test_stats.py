"""GET /v1/admin/stats against traffic this test sent: one fresh tenant's requests, counted, with its
cache hits, errors and latency percentiles recomputed from the history records MongoDB holds."""

import math
import uuid

import httpx
import pytest
from pymongo import MongoClient

from cluster.processes import wait_until
from tests.integration.helpers import MODEL


@pytest.fixture(scope="module")
def requests_collection(settings):
    with MongoClient(settings.mongo_url, **settings.mongo_options()) as client:
        yield client[settings.mongo_db]["requests"]


def nearest_rank(values: list[float], quantile: float) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(quantile * len(ordered)) - 1, 0)]


def test_stats_count_a_tenants_requests_texts_cache_hits_errors_and_percentiles(
    settings, make_key, api, requests_collection
):
    owner = f"stats-{uuid.uuid4().hex[:10]}"
    headers = {"Authorization": f"Bearer {make_key(owner, name='stats')}"}
    a, b, c, d = (f"stats text {k} {uuid.uuid4().hex}" for k in "abcd")
    with httpx.Client(base_url=settings.public_url, headers=headers, timeout=60) as client:
        for body in ([a], [b, c], [a, d]):  # the third: a from the cache, d computed
            assert client.post("/v1/embeddings", json={"model": MODEL, "input": body}).status_code == 200
        missing = client.post("/v1/embeddings", json={"model": "no-such-model", "input": ["x"]})
        assert missing.status_code == 404, missing.text

    def recorded() -> list[dict]:
        return list(requests_collection.find({"owner": owner}))

    assert wait_until(lambda: len(recorded()) == 4, 30), recorded()  # history is written within a second or so
    latencies = [r["latency_ms"] for r in recorded()]

    stats = api.get("/v1/admin/stats", params={"window": "10m", "owner": owner})
    assert stats.status_code == 200, stats.text
    body = stats.json()
    overall = body["overall"]
    assert overall["requests"] == 4
    assert overall["texts"] == 1 + 2 + 2 + 1
    assert overall["cache_hit_ratio"] == pytest.approx(1 / 5)  # texts of the requests that read the cache
    assert overall["error_ratio"] == 0
    assert overall["client_error_ratio"] == pytest.approx(1 / 4)
    assert overall["p50_ms"] == pytest.approx(nearest_rank(latencies, 0.5), rel=0.006)  # its bucket: 0.6% wide
    assert overall["p99_ms"] == pytest.approx(max(latencies))
    models = {row["key"]: row for row in body["by_model"]}
    assert models[MODEL]["requests"] == 3
    assert models[MODEL]["client_error_ratio"] == 0
    assert models["no-such-model"]["client_error_ratio"] == 1
    assert [row["key"] for row in body["by_route"]] == ["/v1/embeddings"]
    assert body["owner"] == owner


def test_the_whole_windows_stats_include_everyones_traffic(api):
    body = api.get("/v1/admin/stats", params={"window": "1d"}).json()
    assert body["overall"]["requests"] >= 1
    assert sum(row["requests"] for row in body["by_route"]) == body["overall"]["requests"]


def test_a_bad_window_is_a_clear_4xx(api):
    malformed = api.get("/v1/admin/stats", params={"window": "ten minutes"})
    assert malformed.status_code == 422
    assert "window" in malformed.text
    too_long = api.get("/v1/admin/stats", params={"window": "400d"})
    assert too_long.status_code == 400
    assert "longer than the history kept" in too_long.json()["error"]["message"]


def test_stats_are_for_admins_only(settings, make_key):
    key = make_key(f"stats-{uuid.uuid4().hex[:10]}", name="not an admin", scopes=["infer"])
    answer = httpx.get(f"{settings.public_url}/v1/admin/stats", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert answer.status_code == 403
