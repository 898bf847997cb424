"""Credentials and principals without services; the refusals the gateway makes before any lookup."""

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from serve_app.auth.credentials import Credential, Principal, digest, new_credential
from serve_app.auth.key_store import refusal
from serve_app.errors import AuthenticationError, PermissionDeniedError, RateLimitError, ServiceUnavailableError
from serve_app.http.deps import authenticate
from tests.unit.fakes import CALLER

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
def anonymous(app):
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


def test_a_key_without_the_scope_is_a_403(app):
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


# -- MongoDB down: the fallback copy, and revocation through Redis -----------------------------


def key_doc(key: str, **fields) -> dict:
    return {
        "_id": Credential.parse(key).key_id,
        "hash": digest(key),
        "owner": "alice",
        "scopes": ["infer"],
        "revoked": False,
        "expires_at": None,
        "rate_per_s": 0,
        **fields,
    }


def stores(redis_url: str, **settings):
    """An authenticator on the private Redis and a fake key collection (made inside the test's event loop)."""
    from redis.asyncio import Redis

    from serve_app.auth.authenticator import Authenticator
    from serve_app.auth.key_store import KeyStore
    from serve_app.infra.redis import GuardedRedis
    from serve_app.settings import Settings
    from tests.unit.fakes import FakeKeyCollection

    config = Settings(redis_url=redis_url, **settings)
    guard = GuardedRedis(Redis.from_url(redis_url), retry_after_s=2.0)
    keys = FakeKeyCollection()
    store = KeyStore({"users": FakeKeyCollection(), "api_keys": keys}, guard, config)
    return Authenticator(config, store, guard), store, keys


def lapse(auth, key: str):
    """The fast path's entry expires (auth_cache_ttl_s has passed)."""
    return auth.redis.redis.delete(f"auth:{digest(key)}")


def test_a_key_seen_before_keeps_working_while_mongodb_is_down(redis_url):
    from serve_app.auth.authenticator import MONGO_RETRY_AFTER_S

    async def scenario():
        auth, _, keys = stores(redis_url)
        keys.docs["k"] = key_doc(KEY)
        assert (await auth.authenticate(KEY)).owner == "alice"  # looked up, cached, fallback copy kept
        fallback_ttl = await auth.redis.redis.pttl(f"authlast:{digest(KEY)}")
        keys.down = True
        await lapse(auth, KEY)
        served = await auth.authenticate(KEY)
        fast_ttl = await auth.redis.redis.pttl(f"auth:{digest(KEY)}")  # put back on the fast path
        calls = keys.calls
        await lapse(auth, KEY)
        await auth.authenticate(KEY)  # within MONGO_RETRY_AFTER_S: MongoDB is not asked again
        never_seen = new_credential("ik", "fedcba9876543210")
        keys.docs["n"] = key_doc(never_seen)
        with pytest.raises(ServiceUnavailableError, match="not used recently") as refused:
            await auth.authenticate(never_seen)
        await auth.redis.close()
        return fallback_ttl, served, fast_ttl, calls, keys.calls, refused.value

    fallback_ttl, served, fast_ttl, calls, calls_after, refused = run(scenario())
    assert 590_000 < fallback_ttl <= 600_000
    assert served.key_id == Credential.parse(KEY).key_id
    assert 0 < fast_ttl <= 10_000
    assert calls_after == calls
    assert refused.status_code == 503
    assert MONGO_RETRY_AFTER_S > 0


def test_a_key_revoked_while_mongodb_is_down_is_refused_everywhere_and_the_failure_is_reported(redis_url):
    async def scenario():
        auth, store, keys = stores(redis_url)
        doc = key_doc(KEY)
        keys.docs["k"] = doc
        await auth.authenticate(KEY)
        keys.down = True
        with pytest.raises(ServiceUnavailableError, match="not stored") as reported:
            await store.revoke_key(doc["_id"])
        with pytest.raises(AuthenticationError, match="revoked"):
            await auth.authenticate(KEY)  # the fast-path entry is still there: the deny entry comes first
        await lapse(auth, KEY)
        with pytest.raises(AuthenticationError, match="revoked"):
            await auth.authenticate(KEY)  # and the fallback never serves it
        keys.down = False
        auth._mongo_retry_at = 0
        with pytest.raises(AuthenticationError, match="revoked"):
            await auth.authenticate(KEY)  # MongoDB back, revocation not yet recorded: still refused
        assert (await store.revoke_key(doc["_id"]))["revoked"] is True  # recorded on the second try
        await auth.redis.close()
        return reported.value

    assert "Revoke it again" in run(scenario()).message


def test_revoking_deletes_the_fallback_copy_and_a_refusal_is_kept_instead(redis_url):
    async def scenario():
        auth, store, keys = stores(redis_url)
        doc = key_doc(KEY)
        keys.docs["k"] = doc
        await auth.authenticate(KEY)
        await store.revoke_key(doc["_id"])
        copy = await auth.redis.redis.get(f"authlast:{digest(KEY)}")
        keys.down = True
        with pytest.raises(AuthenticationError, match="revoked"):
            await auth.authenticate(KEY)  # no copy left, and the revocation's deny entry refuses it
        await auth.redis.redis.delete(f"revoked:{doc['_id']}")
        with pytest.raises(ServiceUnavailableError):
            await auth.authenticate(KEY)  # without the deny entry: refused as never seen, never served
        keys.down = False
        auth._mongo_retry_at = 0
        with pytest.raises(AuthenticationError, match="revoked"):
            await auth.authenticate(KEY)  # looked up: the refusal becomes the copy
        keys.down = True
        await lapse(auth, KEY)
        with pytest.raises(AuthenticationError, match="revoked"):
            await auth.authenticate(KEY)
        await auth.redis.close()
        return copy

    assert run(scenario()) is None


def test_the_fallback_never_outlives_a_keys_expiry(redis_url):
    from serve_app.auth.credentials import Principal, fallback_key

    async def scenario():
        auth, _, keys = stores(redis_url)
        keys.docs["k"] = key_doc(KEY, expires_at=datetime.now(UTC) + timedelta(seconds=30))
        await auth.authenticate(KEY)
        ttl = await auth.redis.redis.pttl(f"authlast:{digest(KEY)}")
        keys.down = True
        stale = Principal(Credential.parse(KEY).key_id, "alice", ("infer",), 0, 1, 0, time.time() - 1)
        await auth.redis.redis.set(fallback_key(digest(KEY)), stale.to_json(), px=60_000)
        await lapse(auth, KEY)
        for _ in range(2):  # and nothing expired was put back on the fast path
            with pytest.raises(AuthenticationError, match="expired"):
                await auth.authenticate(KEY)
        await auth.redis.close()
        return ttl

    assert 0 < run(scenario()) <= 30_000


def test_the_fallback_can_be_turned_off(redis_url):
    async def scenario():
        auth, _, keys = stores(redis_url, auth_fallback_ttl_s=0)
        keys.docs["k"] = key_doc(KEY)
        await auth.authenticate(KEY)
        copy = await auth.redis.redis.exists(f"authlast:{digest(KEY)}")
        keys.down = True
        await lapse(auth, KEY)
        with pytest.raises(ServiceUnavailableError):
            await auth.authenticate(KEY)
        await auth.redis.close()
        return copy

    assert run(scenario()) == 0


def test_a_rated_key_reports_its_request_budget_in_headers(redis_url):
    async def scenario():
        auth, _, keys = stores(redis_url)
        keys.docs["k"] = key_doc(KEY, rate_per_s=1, burst=2)
        headers: dict[str, str] = {}
        await auth.authenticate(KEY, headers=headers)
        await auth.authenticate(KEY)
        with pytest.raises(RateLimitError) as refused:
            await auth.authenticate(KEY)
        await auth.redis.close()
        return headers, refused.value

    headers, refused = run(scenario())
    assert headers == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": headers["x-ratelimit-reset-requests"],
    }
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert refused.headers["Retry-After"] == "1"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_reset_times_are_written_as_openai_does():
    from serve_app.auth.authenticator import _duration

    assert [_duration(s) for s in (0, 0.02, 1.5, 59.9999, 360, 3723)] == ["0s", "20ms", "1.5s", "60s", "6m0s", "1h2m3s"]


def run(coro):
    return asyncio.run(coro)
