"""The gateway's HTTP behaviour, with a fake model and stateful services that are unreachable."""

import base64

import numpy as np
import pytest


def embed(client, **body):
    return client.post("/v1/embeddings", json={"model": "fake-model", **body})


def test_embeddings_have_the_openai_shape(client):
    response = embed(client, input=["one text", "another text"])
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert body["model"] == "fake-model"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 8 for d in body["data"])
    assert body["usage"] == {"prompt_tokens": 8, "total_tokens": 8}
    assert response.headers["X-Cache-Hits"] == "0"  # Redis is down: served uncached
    assert response.headers["X-Model-Version"] == "1"


def test_base64_encoding_is_little_endian_float32(client):
    floats = embed(client, input="same").json()["data"][0]["embedding"]
    encoded = embed(client, input="same", encoding_format="base64").json()["data"][0]["embedding"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), np.float32(floats))


def test_request_id_is_passed_through_or_made(client):
    assert embed(client, input="x").headers["X-Request-ID"]
    assert client.get("/healthz", headers={"X-Request-ID": "trace-42"}).headers["X-Request-ID"] == "trace-42"
    replaced = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"}).headers["X-Request-ID"]
    assert replaced != "bad id with spaces"
    assert len(replaced) == 32


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"model": "fake-model", "input": []}, 422, "at least one text"),
        ({"model": "fake-model", "input": ["a"] * 5}, 422, "at most 4"),
        ({"model": "nope", "input": "x"}, 404, "does not exist"),
        ({"model": "fake-model", "input": "x", "dimensions": 3}, 400, "makes 8"),
        ({"model": "fake-model", "input": {"text": "x"}}, 422, "input"),
    ],
)
def test_bad_input_is_a_4xx_that_says_what_is_wrong(client, body, status, fragment):
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"


def test_malformed_json_and_unknown_routes_answer_in_json(client):
    response = client.post("/v1/embeddings", content=b'{"model": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert "not valid JSON" in response.json()["error"]["message"]
    assert client.get("/v1/embeddings").status_code == 405
    missing = client.get("/nothing-here")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('{"model": "fake-model", "input": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
        ('{"model": "fake-model", "input": "x", "dimensions": ' + "9" * 5000 + "}", "more than 4300 digits"),
    ],
)
def test_json_beyond_the_parsers_limits_is_a_422_that_says_which_limit(client, body, fragment):
    response = client.post("/v1/embeddings", content=body.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert fragment in error["message"]
    assert "UTF-8" not in error["message"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "validation_error")
    assert response.json()["detail"][0]["type"] == "json_invalid"
    assert embed(client, input="still serving").status_code == 200


def test_bytes_that_are_not_utf8_are_still_a_400_that_says_so(client):
    body = b'{"model": "fake-model", "input": "caf\xe9 \xff\xfe"}'
    response = client.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "UTF-8" in response.json()["error"]["message"]


def test_a_failing_model_is_503_and_makes_readiness_unavailable(client, handle):
    assert client.get("/readyz").json()["status"] == "degraded"  # stores down, model up
    handle.fail = True
    response = embed(client, input="x")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"
    ready = client.get("/readyz")
    assert ready.status_code == 503
    report = ready.json()
    assert report["status"] == "unavailable"
    assert report["components"]["model:fake-model"]["status"] == "down"
    assert report["components"]["redis"]["status"] == "down"


def test_models_lists_version_and_source(client):
    card = client.get("/v1/models").json()["data"][0]
    assert card["id"] == "fake-model"
    assert card["version"] == "1"
    assert card["source"] == "s3://models/fake-model/1/"
    assert client.get("/v1/models/fake-model").json()["dims"] == 8
    assert client.get("/v1/models/other").status_code == 404


def test_a_pinned_model_that_does_not_answer_is_listed_as_unavailable_not_a_503(app, handle, monkeypatch):
    """A second pinned deployment starting (or down) must not take GET /v1/models down with it."""
    import time

    from fastapi import Request
    from fastapi.testclient import TestClient

    from serve_app.http.deps import authenticate
    from serve_app.http.routes import models
    from tests.unit.fakes import CALLER, FakeModelHandle

    monkeypatch.setattr(models, "PINNED_WAIT_S", 0.3)
    slow = FakeModelHandle("slow-model")
    services = app.state.services
    catalog = services.embeddings.catalog
    catalog.pinned[slow.name] = type(catalog.pinned[handle.name])(slow.name, slow, refresh_s=0, timeout_s=5)

    async def as_caller(request: Request):
        request.state.principal = CALLER
        return CALLER

    app.dependency_overrides[authenticate] = as_caller
    with TestClient(app) as client:
        first = client.get("/v1/models")
        assert first.status_code == 200, first.text
        assert [c["state"] for c in first.json()["data"]] == ["pinned", "pinned"]
        slow.fail = True  # its replicas die: it was seen once, so its card stays, marked
        listed = client.get("/v1/models")
        assert listed.status_code == 200, listed.text
        assert [(c["id"], c["state"]) for c in listed.json()["data"]] == [
            ("fake-model", "pinned"),
            ("slow-model", "unavailable"),
        ]
        assert client.get("/v1/models/slow-model").json()["state"] == "unavailable"
        slow.fail, slow.delay_s = False, 30.0  # a deployment that hangs: the listing waits a bounded time

        async def hang():
            import asyncio

            await asyncio.sleep(30)

        slow._info = hang
        started = time.monotonic()
        listed = client.get("/v1/models")
        assert time.monotonic() - started < 5
        assert [c["state"] for c in listed.json()["data"]] == ["pinned", "unavailable"]


def test_docs_are_served(client):
    assert client.get("/docs").status_code == 200
    assert "/v1/embeddings" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("path", ["/v1/history", "/v1/admin/users", "/v1/admin/keys"])
def test_mongodb_down_is_a_503_not_a_500(client, path):
    response = client.get(path)
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "MongoDB is unavailable; try again shortly"


def test_a_stuck_dependency_does_not_hold_the_gateways_shutdown(app, monkeypatch, caplog):
    import asyncio

    from serve_app.http import container

    services = app.state.services
    closed = []

    async def hangs() -> None:
        await asyncio.Event().wait()

    async def closes() -> None:
        closed.append("clients")

    monkeypatch.setattr(container, "STOP_STEP_TIMEOUT_S", 0.1)
    monkeypatch.setattr(services.history, "stop", hangs)
    monkeypatch.setattr(services.clients, "close", closes)
    asyncio.run(services.stop())
    assert closed == ["clients"]  # the steps after the stuck one still ran
    assert "shutdown: history did not close within 0.1s" in caplog.text
