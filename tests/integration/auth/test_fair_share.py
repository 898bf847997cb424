"""Per-key work budgets against the real cluster: one key's heavy work does not stall another's.

The acceptance test: key A sends maximum requests (256 texts x 8,192 characters, never cached)
from two loops at once while key B sends single texts one after another; B's p99 latency stays
within 3x its p99 alone (each measured twice, interleaved: alone, loaded, alone, loaded). It needs
both EmbeddingModel replicas running (the router sends B's text to the replica A is not using); the
replica count is printed and named in a failure.
"""

import secrets
import statistics
import threading
import time
import uuid
from collections import Counter

import httpx
import pytest
from pymongo import MongoClient

from cluster.secrets import ray_auth_headers

MODEL = "all-minilm-l6-v2"
MAX_TEXTS = 256
MAX_CHARS = 8192


def fresh_long_text() -> str:
    """8,192 characters of random words: a cache miss the model truncates at 256 tokens."""
    letters = secrets.token_hex(MAX_CHARS // 2)
    return " ".join(letters[i : i + 8] for i in range(0, MAX_CHARS, 9))[:MAX_CHARS]


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[max(0, int(len(ordered) * 0.99 + 0.5) - 1)]


def model_replicas(settings) -> int | None:
    try:
        applications = httpx.get(
            f"{settings.dashboard_url}/api/serve/applications/", headers=ray_auth_headers(settings), timeout=10
        ).json()
        deployment = applications["applications"][settings.serve_app_name]["deployments"]["EmbeddingModel"]
        return sum(1 for r in deployment["replicas"] if r.get("state") == "RUNNING")
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def single_text_latencies(client: httpx.Client, count: int = 0, until: float | None = None) -> list[float]:
    """Sequential requests of one fresh short text each: `count` of them, or as many as fit before `until`."""
    latencies = []
    while len(latencies) < count or (until is not None and time.monotonic() < until):
        text = f"fair share probe {uuid.uuid4().hex[:12]} about the weather today"
        started = time.perf_counter()
        response = client.post("/v1/embeddings", json={"model": MODEL, "input": text})
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        assert response.headers["X-Cache-Hits"] == "0"
    return latencies


def under_heavy_load(settings, heavy: dict, statuses: Counter, measure) -> list[float]:
    """`measure()` while key A sends maximum requests from two loops; returns once A's requests have ended."""
    stop = threading.Event()

    def heavy_loop() -> None:
        with httpx.Client(base_url=settings.public_url, timeout=180, headers=heavy) as a:
            while not stop.is_set():
                body = {"model": MODEL, "input": [fresh_long_text() for _ in range(MAX_TEXTS)]}
                response = a.post("/v1/embeddings", json=body)
                statuses[response.status_code] += 1
                if response.status_code == 429:  # expected: a polite client waits (at most 2 s here)
                    stop.wait(min(2.0, float(response.headers.get("Retry-After", "1"))))

    loops = [threading.Thread(target=heavy_loop, daemon=True) for _ in range(2)]
    for loop in loops:
        loop.start()
    try:
        time.sleep(3)  # A's first maximum request is uploaded, admitted and at the model
        return measure()
    finally:
        stop.set()
        for loop in loops:
            loop.join(200)


def test_a_heavy_key_does_not_stall_another_keys_single_texts(make_key, settings, tenant):
    heavy = {"Authorization": f"Bearer {make_key(tenant, name='fair share: heavy')}"}
    light = {"Authorization": f"Bearer {make_key(tenant, name='fair share: light')}"}
    statuses: Counter[int] = Counter()
    alone: list[float] = []
    loaded: list[float] = []
    with httpx.Client(base_url=settings.public_url, timeout=120, headers=light) as b:
        single_text_latencies(b, 20)  # warm: connections, the model's info
        # Alone and loaded twice, interleaved (A B A B), so the machine's drift falls on both sides.
        for _ in range(2):
            alone += single_text_latencies(b, 60)
            loaded += under_heavy_load(
                settings, heavy, statuses, lambda: single_text_latencies(b, until=time.monotonic() + 15)
            )

    replicas = model_replicas(settings)
    alone_p99, loaded_p99 = p99(alone), p99(loaded)
    print(
        f"\nB alone: n={len(alone)} p50={statistics.median(alone) * 1000:.1f}ms p99={alone_p99 * 1000:.1f}ms"
        f"\nB with A loading: n={len(loaded)} p50={statistics.median(loaded) * 1000:.1f}ms "
        f"p99={loaded_p99 * 1000:.1f}ms max={max(loaded) * 1000:.1f}ms ({loaded_p99 / alone_p99:.2f}x)"
        f"\nA's answers: {dict(statuses)}; EmbeddingModel replicas running: {replicas}"
    )
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] >= 1, f"key A never got a 200: {dict(statuses)}"
    assert loaded_p99 <= 3 * alone_p99, (
        f"B's p99 {loaded_p99 * 1000:.1f}ms > 3 x {alone_p99 * 1000:.1f}ms with {replicas} model replica(s) running"
    )


def test_a_key_over_its_work_budget_gets_a_429_with_headers_before_any_model_work(make_key, settings, tenant, api):
    key = make_key(tenant, name="fair share: tiny budget", token_rate_per_s=1, token_burst=50)
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=settings.public_url, timeout=60, headers=headers) as client:
        # ~100 estimated tokens: more than the bucket, so admitted only because it is full.
        first = client.post("/v1/embeddings", json={"model": MODEL, "input": f"{uuid.uuid4().hex} " * 11})
        assert first.status_code == 200, first.text
        assert first.headers["x-ratelimit-limit-tokens"] == "50"
        assert first.headers["x-ratelimit-remaining-tokens"] == "0"
        assert first.headers["x-ratelimit-limit-requests"]  # the request bucket's, on every answer
        assert client.get("/v1/models").headers["x-ratelimit-remaining-requests"]
        refused_text = f"never computed {uuid.uuid4().hex}"
        request_id = f"budget-{uuid.uuid4().hex}"
        started = time.monotonic()
        refused = client.post(
            "/v1/embeddings", json={"model": MODEL, "input": refused_text}, headers={"X-Request-ID": request_id}
        )
        elapsed = time.monotonic() - started
    assert refused.status_code == 429, refused.text
    assert elapsed < 1.0
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "tokens_rate_limited")
    assert "work budget" in error["message"]
    assert int(refused.headers["Retry-After"]) >= 40  # ~50 tokens of debt, then ~10, at 1 token/s
    assert refused.headers["x-ratelimit-limit-tokens"] == "50"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert refused.headers["x-ratelimit-reset-tokens"]
    assert refused.headers["x-ratelimit-remaining-requests"]
    # No model work: the text was never computed (another key finds no cached vector for it) ...
    assert api.post("/v1/embeddings", json={"model": MODEL, "input": refused_text}).headers["X-Cache-Hits"] == "0"
    # ... and the refused request's history record shows no model version and no work charged.
    with MongoClient(settings.mongo_url, **settings.mongo_options()) as mongo:
        deadline = time.monotonic() + 15
        while (record := mongo[settings.mongo_db]["requests"].find_one({"request_id": request_id})) is None:
            if time.monotonic() > deadline:
                pytest.fail("the refused request was not recorded in history")
            time.sleep(0.2)
    assert record["status"] == 429
    assert "version" not in record
    assert "work_tokens" not in record
