"""Credentials and principals without services; the refusals the gateway makes before any lookup."""

import time
from datetime import UTC, datetime, timedelta

import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from serve_app.auth import Credential, Principal, digest, new_credential, refusal
from serve_app.deps import authenticate
from serve_app.errors import AuthenticationError, PermissionDeniedError
from tests.unit.test_api import CALLER, app, handle  # noqa: F401  (fixtures)

KEY = new_credential("ik", "0123456789abcdef")


def test_a_credential_names_its_kind_and_key():
    key = Credential.parse(KEY)
    session = Credential.parse(new_credential("is", "0123456789abcdef"))
    assert (key.kind, key.key_id) == ("key", "0123456789abcdef")
    assert (session.kind, session.key_id) == ("session", "0123456789abcdef")
    assert key.sha == digest(KEY) != KEY
    assert key.cache_key == f"auth:{digest(KEY)}"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (None, "no API key"),
        ("", "no API key"),
        ("sk-abc", "malformed"),
        ("ik_0123456789abcdef_short", "malformed"),
        ("ik_XYZ3456789abcdef_" + "a" * 43, "malformed"),
        (KEY + "x", "malformed"),
    ],
)
def test_bad_credentials_are_refused_before_any_lookup(raw, fragment):
    with pytest.raises(AuthenticationError, match=fragment) as caught:
        Credential.parse(raw)
    assert KEY not in caught.value.message


def test_refusals_name_the_reason_but_never_the_secret():
    now = datetime.now(UTC)
    doc = {"_id": "0123456789abcdef", "revoked": False, "expires_at": None, "hash": digest(KEY)}
    assert refusal(None) == "invalid API key"
    assert refusal(doc) is None
    assert "revoked" in refusal({**doc, "revoked": True})
    assert "expired" in refusal({**doc, "expires_at": now - timedelta(seconds=1)})
    assert refusal({**doc, "expires_at": now + timedelta(hours=1)}) is None


def test_a_principal_survives_its_cache_format_and_caps_its_ttl_at_expiry():
    soon = time.time() + 5
    principal = Principal("0123456789abcdef", "alice", ("infer",), 10.0, 20, 2, soon)
    assert Principal.from_json(principal.to_json()) == principal
    assert 4 < principal.ttl_s(60) <= 5
    assert CALLER.ttl_s(60) == 60
    assert principal.require("infer") is principal
    with pytest.raises(PermissionDeniedError, match="lacks the 'jobs' scope"):
        principal.require("jobs")


@pytest.fixture
def anonymous(app):  # noqa: F811
    with TestClient(app) as client:
        yield client


def test_no_key_is_a_401_in_the_api_error_shape(anonymous):
    response = anonymous.post("/v1/embeddings", json={"model": "fake-model", "input": "x"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "missing_api_key"
    assert anonymous.get("/v1/jobs", headers={"Authorization": "Bearer nonsense"}).status_code == 401
    assert anonymous.get("/v1/models", headers={"X-API-Key": "nonsense"}).json()["error"]["type"] == (
        "authentication_error"
    )


def test_probes_and_docs_need_no_key(anonymous):
    assert anonymous.get("/healthz").status_code == 200
    assert anonymous.get("/openapi.json").status_code == 200


def test_a_key_cannot_be_checked_while_the_key_store_is_down(anonymous):
    response = anonymous.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 503
    assert "key store" in response.json()["error"]["message"]
    assert KEY not in response.text


def test_a_session_needs_redis(anonymous):
    response = anonymous.get("/v1/models", headers={"Authorization": f"Bearer {new_credential('is', 'ab' * 8)}"})
    assert response.status_code == 503
    assert "sessions are unavailable" in response.json()["error"]["message"]


def test_a_key_without_the_scope_is_a_403(app):  # noqa: F811
    infer_only = Principal("0123456789abcdef", "alice", ("infer",), 0, 1, 0, None)

    async def as_infer_only(request: Request) -> Principal:
        return infer_only

    app.dependency_overrides[authenticate] = as_infer_only
    with TestClient(app) as client:
        response = client.get("/v1/jobs")
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "insufficient_scope"
        assert client.get("/v1/admin/keys").status_code == 403
        assert client.get("/v1/auth/whoami").json()["scopes"] == ["infer"]
