"""End to end through NGINX: client -> NGINX -> Serve proxy -> Gateway -> EmbeddingModel."""

import base64
import subprocess
import time
import uuid

import numpy as np
import pytest
from pymongo import MongoClient

from cluster.secrets import ray_auth_headers
from cluster.services import VENV_BIN, Redis, ray_env
from serve_app.model_repository import VERIFIED_MARKER, ModelRepository, sha256_of


def unique(text: str) -> str:
    """Texts this run has never sent, so the first request is a cache miss."""
    return f"{text} [{uuid.uuid4().hex[:12]}]"


def embed(api, texts, **extra):
    return api.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": texts, **extra})


def vectors(response) -> np.ndarray:
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def test_vectors_have_the_right_shape_and_meaning(api):
    texts = ["A man is eating a piece of bread.", "Someone is having a meal.", "The stock market fell sharply."]
    response = embed(api, [unique(t) for t in texts])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    assert body["model"] == "all-minilm-l6-v2"
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    got = vectors(response)
    assert got.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    paraphrase, unrelated = float(got[0] @ got[1]), float(got[0] @ got[2])
    assert paraphrase > unrelated + 0.2, (paraphrase, unrelated)


def test_embeddings_match_sentence_transformers(api):
    from sentence_transformers import SentenceTransformer

    from cluster.seed import default_model_dir

    texts = [unique("Ray Serve batches requests"), "ünïcödé and emoji 🚀", "short", "word " * 400]
    served = vectors(embed(api, texts))
    reference = SentenceTransformer(str(default_model_dir()), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(served, reference, atol=1e-4)


def test_base64_answers_decode_to_the_same_floats(api):
    text = unique("base64 please")
    floats = vectors(embed(api, text))[0]
    encoded = embed(api, text, encoding_format="base64").json()["data"][0]["embedding"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), floats)


def test_second_identical_request_is_served_from_cache(api):
    texts = [unique("cache me"), unique("and me")]
    first = embed(api, texts)
    second = embed(api, texts)
    assert first.headers["X-Cache-Hits"] == "0"
    assert second.headers["X-Cache-Hits"] == "2"
    np.testing.assert_array_equal(vectors(first), vectors(second))


def test_ten_texts_of_which_seven_were_seen_compute_three(api, settings):
    seen = [unique(f"seen {i}") for i in range(7)]
    embed(api, seen)
    response = embed(api, [*seen, *(unique(f"new {i}") for i in range(3))])
    assert response.headers["X-Cache-Hits"] == "7"
    record = wait_for_history(settings, response.headers["X-Request-ID"])
    assert (record["items"], record["cache_hits"]) == (10, 7)


def wait_for_history(settings, request_id: str, timeout_s: float = 15) -> dict:
    with MongoClient(settings.mongo_url, **settings.mongo_options()) as client:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            record = client[settings.mongo_db]["requests"].find_one({"request_id": request_id})
            if record:
                return record
            time.sleep(0.2)
    raise AssertionError(f"no history record for request {request_id}")


def test_history_record_lands_in_mongodb(api, settings):
    request_id = f"test-{uuid.uuid4().hex}"
    response = api.post(
        "/v1/embeddings",
        json={"model": "all-minilm-l6-v2", "input": [unique("history"), unique("more")]},
        headers={"X-Request-ID": request_id},
    )
    assert response.headers["X-Request-ID"] == request_id
    record = wait_for_history(settings, request_id)
    assert record["model"] == "all-minilm-l6-v2"
    assert record["version"] == "1"
    assert record["items"] == 2
    assert record["cache_hits"] == 0
    assert record["status"] == 200
    assert record["latency_ms"] > 0
    assert record["ts"] is not None


def test_failed_requests_are_in_history_too(api, settings):
    request_id = f"test-{uuid.uuid4().hex}"
    response = api.post("/v1/embeddings", json={"model": "nope", "input": "x"}, headers={"X-Request-ID": request_id})
    assert response.status_code == 404
    assert wait_for_history(settings, request_id)["status"] == 404


def test_the_replica_weights_came_from_the_object_store(api, settings):
    card = api.get("/v1/models").json()["data"][0]
    repository = ModelRepository.from_settings(settings)
    manifest = repository.manifest(card["id"], card["version"])
    assert card["source"] == f"s3://{settings.model_bucket}/{card['id']}/{card['version']}/"
    assert card["manifest_digest"] == manifest.digest
    cached = settings.weights_cache_dir / card["id"] / card["version"]
    assert (cached / VERIFIED_MARKER).read_text() == manifest.digest
    for f in manifest.files:
        assert sha256_of(cached / f.path) == f.sha256


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"model": "all-minilm-l6-v2", "input": []}, 422, "at least one text"),
        ({"model": "all-minilm-l6-v2", "input": ""}, 422, "is empty"),
        ({"model": "all-minilm-l6-v2", "input": ["x"] * 1000}, 422, "at most"),
        ({"model": "all-minilm-l6-v2", "input": "x" * 9000}, 422, "characters"),
        ({"model": "all-minilm-l6-v2", "input": [1, 2]}, 422, "valid string"),
        ({"model": "all-minilm-l6-v2", "input": "x", "dimensions": 7}, 400, "dimensions"),
        ({"model": "gpt-4", "input": "x"}, 404, "does not exist"),
        ({"input": "x"}, 422, "model"),
    ],
)
def test_bad_input_is_a_4xx_with_a_message(api, body, status, fragment):
    response = api.post("/v1/embeddings", json=body)
    assert response.status_code == status
    assert fragment in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("content", "status", "fragment"),
    [
        (b'{"model": "all-minilm-l6-v2", "input": ', 422, "not valid JSON"),
        (b'{"model": "all-minilm-l6-v2", "input": "\xff\xfe"}', 400, "could not be parsed"),
        (b"[]", 422, "body"),
    ],
)
def test_malformed_bodies_are_4xx(api, content, status, fragment):
    response = api.post("/v1/embeddings", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    assert fragment in response.json()["error"]["message"]


def test_nginx_refuses_oversized_bodies_with_json(api):
    response = api.post(
        "/v1/embeddings", content=b"x" * (5 * 1024 * 1024), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert response.headers["X-Request-ID"]


def test_nginx_answers_an_unparsable_request_with_json(api):
    response = api.get("/v1/models/%00")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"


def test_nginx_makes_a_request_id_when_none_or_a_bad_one_is_sent(api):
    made = api.get("/healthz").headers["X-Request-ID"]
    assert len(made) == 32
    assert api.get("/healthz", headers={"X-Request-ID": "bad id"}).headers["X-Request-ID"] != "bad id"
    assert len(api.get("/healthz").headers.get_list("X-Request-ID")) == 1


def test_health_readiness_and_docs(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    report = api.get("/readyz").json()
    assert report["status"] == "ready"
    assert set(report["components"]) == {
        "redis",
        "rabbitmq",
        "mongodb",
        "object_store",
        "model:all-minilm-l6-v2",
        "job_worker",
    }
    assert api.get("/docs").status_code == 200
    assert "/v1/embeddings" in api.get("/openapi.json").json()["paths"]


def wait_for_readiness(api, status: str, within_s: float) -> dict:
    """/readyz is cached for readiness_cache_s: a change shows within that, not at once."""
    deadline = time.monotonic() + within_s
    while (report := api.get("/readyz").json())["status"] != status and time.monotonic() < deadline:
        time.sleep(0.2)
    assert report["status"] == status, report
    return report


def test_redis_down_still_serves_and_reports_degraded(api, settings):
    redis = Redis("redis", settings)
    if not redis.process.running:
        pytest.skip("Redis is not one this project started; it will not stop another's")
    text = unique("served while redis is down")
    try:
        redis.stop()
        first, second = embed(api, text), embed(api, text)
        assert (first.status_code, second.status_code) == (200, 200)
        assert second.headers["X-Cache-Hits"] == "0"
        report = wait_for_readiness(api, "degraded", within_s=settings.readiness_cache_s + 5)
        assert report["components"]["redis"]["status"] == "down"
    finally:
        redis.ensure()
    wait_for_readiness(api, "ready", within_s=15)
    embed(api, text)
    assert embed(api, text).headers["X-Cache-Hits"] == "1"


def test_serve_cli_shows_the_application_running(settings):
    result = subprocess.run(
        [str(VENV_BIN / "serve"), "status", "--address", settings.dashboard_url],
        env=ray_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert f"{settings.serve_app_name}:\n    status: RUNNING" in result.stdout
    for deployment in ("Gateway", "EmbeddingModel"):
        assert deployment in result.stdout


def test_ray_dashboard_shows_the_deployments(settings):
    import httpx

    applications = httpx.get(
        f"{settings.dashboard_url}/api/serve/applications/", headers=ray_auth_headers(settings), timeout=30
    ).json()["applications"]
    app = applications[settings.serve_app_name]
    assert app["status"] == "RUNNING"
    for name in ("Gateway", "EmbeddingModel"):
        assert app["deployments"][name]["status"] == "HEALTHY"
        assert app["deployments"][name]["replicas"]
