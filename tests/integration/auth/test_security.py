"""Keys, scopes, sessions, tenants and per-key limits, against the real gateway, Redis and MongoDB.

Everything goes through NGINX; the HTTPS door is exercised alongside the HTTP one.
"""

import json
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import redis
from pymongo import MongoClient

from serve_app.auth.credentials import digest, new_credential
from serve_app.jobs.quota import active_jobs_key
from serve_app.settings import REPO_ROOT

MODEL = "all-minilm-l6-v2"
SECRETS: list[str] = []  # every credential this module makes; none may be written anywhere


def bearer(key: str) -> dict[str, str]:
    SECRETS.append(key)
    return {"Authorization": f"Bearer {key}"}


def embed(client, headers=None, text="security"):
    return client.post("/v1/embeddings", json={"model": MODEL, "input": text}, headers=headers)


@pytest.fixture(scope="module")
def mongo(settings):
    with MongoClient(settings.mongo_url, tz_aware=True, **settings.mongo_options()) as client:
        yield client[settings.mongo_db]


@pytest.fixture(scope="module")
def rds(settings):
    client = redis.Redis.from_url(settings.redis_url, **settings.redis_options())
    yield client
    client.close()


@pytest.fixture(scope="module")
def https(settings, auth_headers):
    """A client of the HTTPS door that trusts the bring-up's local CA."""
    with httpx.Client(
        base_url=settings.https_url, verify=str(settings.tls_ca_file), timeout=60, headers=auth_headers
    ) as client:
        yield client


def new_user(api) -> str:
    name = f"sec-{uuid.uuid4().hex[:10]}"
    response = api.post("/v1/admin/users", json={"name": name, "description": "security tests"})
    assert response.status_code == 201, response.text
    return name


def new_key(api, owner: str, **body) -> dict:
    response = api.post("/v1/admin/keys", json={"owner": owner, **body})
    assert response.status_code == 201, response.text
    created = response.json()
    SECRETS.append(created["key"])
    return created


# -- 401 and 403 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer"}, "missing_api_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing_api_key"),
        ({"Authorization": "Bearer not-a-key"}, "invalid_api_key"),
        ({"X-API-Key": "ik_0000_short"}, "invalid_api_key"),
        ({"Authorization": f"Bearer {new_credential('ik', '0123456789abcdef')}"}, "invalid_api_key"),
        ({"Authorization": f"Bearer {new_credential('is', '0123456789abcdef')}"}, "invalid_session"),
    ],
)
def test_missing_malformed_and_unknown_credentials_are_401(anonymous, https, headers, code):
    for client in (anonymous, https):
        response = client.post(
            "/v1/embeddings", json={"model": MODEL, "input": "x"}, headers={"Authorization": "", **headers}
        )
        assert response.status_code == 401, response.text
        assert response.headers["WWW-Authenticate"] == "Bearer"
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("authentication_error", code)
        assert error["message"]


def test_a_key_works_as_bearer_and_as_x_api_key(api, anonymous):
    owner = new_user(api)
    key = new_key(api, owner, scopes=["infer"])["key"]
    assert embed(anonymous, bearer(key)).status_code == 200
    assert embed(anonymous, {"X-API-Key": key}).status_code == 200
    me = anonymous.get("/v1/auth/whoami", headers={"X-API-Key": key}).json()
    assert (me["owner"], me["scopes"], me["via"]) == (owner, ["infer"], "key")


def test_a_key_without_the_scope_is_403(api, anonymous):
    owner = new_user(api)
    infer_only = bearer(new_key(api, owner, scopes=["infer"])["key"])
    jobs_only = bearer(new_key(api, owner, scopes=["jobs"])["key"])
    for method, path, headers in [
        ("GET", "/v1/jobs", infer_only),
        ("POST", "/v1/uploads", infer_only),
        ("GET", "/v1/admin/keys", infer_only),
        ("POST", "/v1/embeddings", jobs_only),
        ("GET", "/v1/models", jobs_only),
        ("POST", "/v1/admin/users", jobs_only),
    ]:
        response = anonymous.request(method, path, headers=headers, json={"name": "never-made"})
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"]["code"] == "insufficient_scope"
    assert api.get("/v1/admin/users").json()["data"]  # an admin key lists users
    assert "never-made" not in {u["name"] for u in api.get("/v1/admin/users").json()["data"]}


def test_a_revoked_key_is_refused_at_once(api, anonymous, mongo):
    owner = new_user(api)
    created = new_key(api, owner)
    headers = bearer(created["key"])
    assert embed(anonymous, headers).status_code == 200  # now cached in Redis
    revoked = api.delete(f"/v1/admin/keys/{created['id']}")
    assert revoked.status_code == 200
    assert revoked.json()["revoked"] is True
    response = embed(anonymous, headers)
    assert response.status_code == 401
    assert "revoked" in response.json()["error"]["message"]
    stored = mongo["api_keys"].find_one({"_id": created["id"]})
    assert stored["hash"] == digest(created["key"])
    assert created["key"] not in json.dumps(stored, default=str)
    assert stored["last_used_at"] is not None


def test_a_revocation_redis_missed_still_lands_within_the_cache_ttl(api, anonymous, mongo, settings):
    """The README's bound: a key revoked behind Redis's back is refused after auth_cache_ttl_s."""
    owner = new_user(api)
    created = new_key(api, owner)
    headers = bearer(created["key"])
    assert embed(anonymous, headers).status_code == 200
    mongo["api_keys"].update_one({"_id": created["id"]}, {"$set": {"revoked": True}})
    revoked_at = time.monotonic()
    while embed(anonymous, headers).status_code == 200:
        assert time.monotonic() - revoked_at < settings.auth_cache_ttl_s + 2
        time.sleep(0.5)
    assert embed(anonymous, headers).status_code == 401


def test_an_expired_key_is_401(make_key, settings, api, anonymous):
    owner = new_user(api)
    key = make_key(owner, expires_at=datetime.now(UTC) + timedelta(seconds=2))
    headers = bearer(key)
    assert embed(anonymous, headers).status_code == 200
    time.sleep(2.5)  # the cached lookup lapses with the key: no TTL outlives an expiry
    response = embed(anonymous, headers)
    assert response.status_code == 401
    assert "expired" in response.json()["error"]["message"]


def test_the_admin_cli_creates_lists_rotates_and_revokes(api, anonymous):
    owner = new_user(api)

    def cli(*args: str) -> dict | list:
        done = subprocess.run(
            [sys.executable, "-m", "serve_app.admin", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        )
        return json.loads(done.stdout)

    created = cli("keys", "create", owner, "--scopes", "infer", "--name", "cli", "--rate", "5")
    SECRETS.append(created["key"])
    assert embed(anonymous, bearer(created["key"])).status_code == 200
    listed = cli("keys", "list", "--owner", owner)
    assert [k["_id"] for k in listed] == [created["_id"]]
    assert "hash" not in listed[0]
    assert "key" not in listed[0]
    rotated = cli("keys", "rotate", created["_id"], "--grace-s", "0")
    SECRETS.append(rotated["key"])
    assert embed(anonymous, bearer(rotated["key"])).status_code == 200
    assert embed(anonymous, bearer(created["key"])).status_code == 401
    assert rotated["new"]["scopes"] == ["infer"]
    assert rotated["new"]["rate_per_s"] == 5
    cli("keys", "revoke", rotated["new"]["_id"])
    assert embed(anonymous, bearer(rotated["key"])).status_code == 401
    failed = subprocess.run(
        [sys.executable, "-m", "serve_app.admin", "keys", "create", "no-such-user"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 1
    assert "no user" in failed.stderr


def test_rotation_over_http_keeps_the_old_key_for_the_grace_period(api, anonymous):
    owner = new_user(api)
    old = new_key(api, owner, scopes=["infer", "jobs"], max_concurrent_jobs=3)
    rotated = api.post(f"/v1/admin/keys/{old['id']}/rotate", json={"grace_s": 600})
    assert rotated.status_code == 201, rotated.text
    body = rotated.json()
    SECRETS.append(body["key"])
    assert body["new"]["scopes"] == ["infer", "jobs"]
    assert body["new"]["max_concurrent_jobs"] == 3
    assert body["old"]["expires_at"] is not None
    assert embed(anonymous, bearer(body["key"])).status_code == 200
    assert embed(anonymous, bearer(old["key"])).status_code == 200  # still within its grace


def test_disabling_a_user_revokes_its_keys(api, anonymous):
    owner = new_user(api)
    headers = bearer(new_key(api, owner)["key"])
    assert embed(anonymous, headers).status_code == 200
    assert api.delete(f"/v1/admin/users/{owner}").json()["disabled"] is True
    assert embed(anonymous, headers).status_code == 401
    refused = api.post("/v1/admin/keys", json={"owner": owner})
    assert refused.status_code == 409
    assert "disabled" in refused.json()["error"]["message"]
    assert api.post("/v1/admin/keys", json={"owner": "nobody-by-this-name"}).status_code == 404
    assert api.post("/v1/admin/users", json={"name": owner}).status_code == 409
    assert api.post("/v1/admin/users", json={"name": "Bad Name!"}).status_code == 422


# -- sessions --------------------------------------------------------------------------------


def test_a_session_token_stands_in_for_its_key_until_logout(api, anonymous, rds, settings):
    owner = new_user(api)
    created = new_key(api, owner, scopes=["infer"])
    login = anonymous.post("/v1/auth/login", headers=bearer(created["key"]))
    assert login.status_code == 200, login.text
    session = login.json()
    token = session["token"]
    SECRETS.append(token)
    assert token.startswith("is_")
    assert session["expires_in_s"] == settings.session_ttl_s
    assert 0 < rds.pttl(f"session:{digest(token)}") <= settings.session_ttl_s * 1000
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Max-Age=" in cookie
    me = anonymous.get("/v1/auth/whoami", headers=bearer(token)).json()
    assert (me["via"], me["owner"], me["key_id"]) == ("session", owner, created["id"])
    assert embed(anonymous, bearer(token)).status_code == 200
    with httpx.Client(base_url=settings.public_url, cookies={"infer_session": token}) as browser:
        assert embed(browser).status_code == 200
    again = anonymous.post("/v1/auth/login", headers=bearer(token))
    assert again.status_code == 400  # a session does not make sessions
    assert anonymous.post("/v1/auth/logout", headers=bearer(created["key"])).status_code == 400
    out = anonymous.post("/v1/auth/logout", headers=bearer(token))
    assert out.status_code == 200
    assert out.json()["ended"] is True
    refused = embed(anonymous, bearer(token))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_session"


def test_a_session_outlives_a_revocation_redis_missed_by_no_more_than_the_cache_ttl(api, anonymous, mongo, settings):
    owner = new_user(api)
    created = new_key(api, owner)
    token = anonymous.post("/v1/auth/login", headers=bearer(created["key"])).json()["token"]
    SECRETS.append(token)
    assert embed(anonymous, bearer(token)).status_code == 200
    mongo["api_keys"].update_one({"_id": created["id"]}, {"$set": {"revoked": True}})  # behind Redis's back
    login = anonymous.post("/v1/auth/login", headers=bearer(created["key"]))
    assert login.status_code == 401  # a login reads the key as stored, not as cached
    revoked_at = time.monotonic()
    while embed(anonymous, bearer(token)).status_code == 200:
        assert time.monotonic() - revoked_at < settings.auth_cache_ttl_s + 2
        time.sleep(0.5)
    assert embed(anonymous, bearer(token)).status_code == 401


def test_a_session_expires_no_later_than_its_key(make_key, settings, api, anonymous):
    owner = new_user(api)
    key = make_key(owner, expires_at=datetime.now(UTC) + timedelta(seconds=3))
    session = anonymous.post("/v1/auth/login", headers=bearer(key)).json()
    SECRETS.append(session["token"])
    assert session["expires_in_s"] <= 3
    assert embed(anonymous, bearer(session["token"])).status_code == 200
    time.sleep(3.5)
    assert embed(anonymous, bearer(session["token"])).status_code == 401


def test_make_up_wrote_a_private_working_development_key(settings, anonymous):
    path = settings.dev_key_file
    assert path.stat().st_mode & 0o777 == 0o600
    me = anonymous.get("/v1/auth/whoami", headers=bearer(path.read_text().strip()))
    assert me.status_code == 200
    assert (me.json()["owner"], me.json()["scopes"]) == (settings.dev_owner, ["infer", "jobs", "admin"])


def test_revoking_a_key_ends_its_sessions(api, anonymous):
    owner = new_user(api)
    created = new_key(api, owner)
    token = anonymous.post("/v1/auth/login", headers=bearer(created["key"])).json()["token"]
    SECRETS.append(token)
    assert embed(anonymous, bearer(token)).status_code == 200
    api.delete(f"/v1/admin/keys/{created['id']}")
    assert embed(anonymous, bearer(token)).status_code == 401


# -- tenants ---------------------------------------------------------------------------------


def test_a_tenant_sees_only_its_own_jobs_uploads_and_history(api, anonymous, settings, tenant):
    other = new_user(api)
    theirs = bearer(new_key(api, other, scopes=["infer", "jobs"])["key"])
    mine = api.post("/v1/jobs", json={"model": MODEL, "input": ["tenant a"]}).json()
    missing = anonymous.get("/v1/jobs/000000000000000000000000", headers=theirs)
    for method, path in [
        ("GET", f"/v1/jobs/{mine['id']}"),
        ("GET", f"/v1/jobs/{mine['id']}/result"),
        ("DELETE", f"/v1/jobs/{mine['id']}"),
    ]:
        response = anonymous.request(method, path, headers=theirs)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == missing.json()["error"]["code"] == "job_not_found"
    assert mine["id"] not in {j["id"] for j in anonymous.get("/v1/jobs", headers=theirs).json()["data"]}
    assert mine["id"] in {j["id"] for j in api.get("/v1/jobs", params={"limit": 100}).json()["data"]}
    assert (mine["owner"], mine["key_id"]) == (tenant, api.get("/v1/auth/whoami").json()["key_id"])

    ticket = api.post("/v1/uploads").json()
    upload = {"file": ("t.jsonl", b'"tenant a upload"\n')}
    httpx.post(ticket["url"], data=ticket["fields"], files=upload).raise_for_status()
    by_id = anonymous.post("/v1/jobs", json={"model": MODEL, "upload_id": ticket["upload_id"]}, headers=theirs)
    assert by_id.status_code == 400
    assert "does not exist" in by_id.json()["error"]["message"]
    by_url = anonymous.post("/v1/jobs", json={"model": MODEL, "input_url": ticket["input_url"]}, headers=theirs)
    assert by_url.status_code == 400
    assert "your own uploads" in by_url.json()["error"]["message"]

    request_id = f"tenant-{uuid.uuid4().hex}"
    assert embed(anonymous, theirs, "their request").status_code == 200
    assert embed(api, {"X-Request-ID": request_id}).status_code == 200
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        records = api.get("/v1/history", params={"limit": 100}).json()["data"]
        if request_id in {r["request_id"] for r in records}:
            break
        time.sleep(0.3)
    assert request_id in {r["request_id"] for r in records}
    theirs_history = anonymous.get("/v1/history", params={"limit": 100}, headers=theirs).json()["data"]
    assert theirs_history
    assert request_id not in {r["request_id"] for r in theirs_history}


def test_history_records_carry_the_caller(api, mongo, tenant):
    request_id = f"who-{uuid.uuid4().hex}"
    key_id = api.get("/v1/auth/whoami").json()["key_id"]
    api.post("/v1/embeddings", json={"model": MODEL, "input": "who"}, headers={"X-Request-ID": request_id})
    deadline = time.monotonic() + 15
    while (record := mongo["requests"].find_one({"request_id": request_id})) is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert (record["owner"], record["key_id"]) == (tenant, key_id)


# -- limits ----------------------------------------------------------------------------------


def test_a_key_over_its_rate_is_429_with_retry_after_and_recovers(api, anonymous):
    owner = new_user(api)
    headers = bearer(new_key(api, owner, scopes=["infer"], rate_limit_per_s=1, burst=3)["key"])
    statuses = [anonymous.get("/v1/models", headers=headers) for _ in range(8)]
    codes = [r.status_code for r in statuses]
    assert codes[:3] == [200, 200, 200], codes
    assert 429 in codes, codes
    limited = next(r for r in statuses if r.status_code == 429)
    assert limited.json()["error"]["code"] == "rate_limited"
    retry_after = int(limited.headers["Retry-After"])
    assert 1 <= retry_after <= 2
    time.sleep(retry_after)
    assert anonymous.get("/v1/models", headers=headers).status_code == 200
    # Another key of the same user has a bucket of its own.
    assert anonymous.get("/v1/models", headers=bearer(new_key(api, owner)["key"])).status_code == 200


def test_a_key_at_its_job_quota_is_429_until_a_job_ends(api, anonymous, rds):
    owner = new_user(api)
    created = new_key(api, owner, scopes=["jobs"], max_concurrent_jobs=1)
    headers = bearer(created["key"])
    long_job = {"model": MODEL, "input": [f"quota {i} {uuid.uuid4().hex}" for i in range(3000)]}
    first = anonymous.post("/v1/jobs", json=long_job, headers=headers)
    assert first.status_code == 202, first.text
    refused = anonymous.post("/v1/jobs", json={"model": MODEL, "input": ["one more"]}, headers=headers)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "job_quota_exceeded"
    assert int(refused.headers["Retry-After"]) >= 1
    assert anonymous.delete(f"/v1/jobs/{first.json()['id']}", headers=headers).status_code == 200
    deadline = time.monotonic() + 60
    while anonymous.get(f"/v1/jobs/{first.json()['id']}", headers=headers).json()["status"] != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    second = anonymous.post("/v1/jobs", json={"model": MODEL, "input": ["after cancel"]}, headers=headers)
    assert second.status_code == 202, second.text
    # A release Redis missed (a job that ended while it was down) is found and dropped at the next refusal.
    deadline = time.monotonic() + 60
    while anonymous.get(f"/v1/jobs/{second.json()['id']}", headers=headers).json()["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    rds.zadd(active_jobs_key(created["id"]), {second.json()["id"]: time.time() - 120})
    third = anonymous.post("/v1/jobs", json={"model": MODEL, "input": ["after a lost release"]}, headers=headers)
    assert third.status_code == 202, third.text


# -- abuse -----------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_4xx_and_the_service_keeps_serving(api):
    depth = 100_000
    body = '{"model": "all-minilm-l6-v2", "input": ' + "[" * depth + "]" * depth + "}"
    response = api.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert "error" in response.json()
    assert embed(api).status_code == 200


@pytest.mark.parametrize(
    ("value", "says"),
    [("[" * 1500 + "]" * 1500, "nested too deeply"), ("1" * 5000, "digits")],
)
def test_json_past_the_parsers_limits_is_a_422_that_says_which_limit(api, value, says):
    body = '{"model": "all-minilm-l6-v2", "input": ' + value + "}"
    response = api.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert says in response.json()["error"]["message"]
    assert "UTF-8" not in response.json()["error"]["message"]


def test_invalid_utf8_is_a_4xx(api):
    body = b'{"model": "all-minilm-l6-v2", "input": "caf\xe9 \xff\xfe"}'
    response = api.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert "UTF-8" in response.json()["error"]["message"]
    assert embed(api).status_code == 200


def test_a_huge_number_of_items_is_refused_with_the_limit(api, settings):
    response = api.post("/v1/embeddings", json={"model": MODEL, "input": ["x"] * 200_000})
    assert response.status_code == 422
    assert f"at most {settings.max_items_per_request}" in response.json()["error"]["message"]
    job = api.post("/v1/jobs", json={"model": MODEL, "input": ["x"] * 200_000})
    assert job.status_code == 422
    assert embed(api).status_code == 200


def test_oversized_headers_and_bodies_are_refused_by_nginx(api):
    huge_header = api.get("/v1/models", headers={"X-Padding": "a" * 20_000})
    assert huge_header.status_code == 431
    assert huge_header.json()["error"]["code"] == "headers_too_large"
    huge_body = api.post("/v1/embeddings", content=b"x" * (5 * 1024 * 1024))
    assert huge_body.status_code == 413
    assert embed(api).status_code == 200


# -- last: nothing secret was written anywhere ---------------------------------------------


def test_a_key_sent_every_way_a_client_might_is_written_nowhere(make_key, settings, anonymous, mongo):
    """Header, X-API-Key, a query parameter (refused, yet once logged in clear) and a cookie."""
    key = make_key(f"sec-{uuid.uuid4().hex[:10]}", name="sent every way", scopes=["infer"])
    SECRETS.append(key)
    assert anonymous.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert anonymous.get("/v1/models", headers={"X-API-Key": key}).status_code == 200
    for query in (f"api_key={key}", f"limit=1&key={key}", f"access_token={key}", f"TOKEN={key}"):
        refused = anonymous.get(f"/v1/models?{query}")
        assert refused.status_code == 400, query
        assert refused.json()["error"]["code"] == "credential_in_url"
    assert anonymous.get("/v1/jobs?limit=1", headers={"X-API-Key": key}).status_code in (200, 403)  # other queries pass
    assert anonymous.get("/v1/models", headers={"Cookie": f"infer_session={key}; api_key={key}"}).status_code in (
        200,
        401,
    )
    time.sleep(1.5)  # NGINX flushes its access log every second
    assert not leaked([key], stored_documents(mongo), state_files(settings))


def stored_documents(mongo) -> str:
    return "".join(
        json.dumps(list(mongo[name].find({}, {"_id": 0})), default=str)
        for name in ("requests", "api_keys", "users", "jobs")
    )


def state_files(settings) -> list:
    """Every log-like file under the state dir but the development key's own file."""
    files = [p for p in settings.state_dir.rglob("*") if p.is_file() and p.suffix in {".log", ".out", ".err", ""}]
    return [p for p in files if p.stat().st_size < 200 * 1024 * 1024 and p != settings.dev_key_file]


def leaked(credentials: list[str], stored: str, files: list) -> list[str]:
    secrets = [c.split("_", 2)[2] for c in credentials if c.count("_") >= 2]
    found = [f"stored: {s[:6]}..." for s in secrets if s in stored]
    for path in files:
        text = path.read_bytes().decode("utf-8", "replace")
        found += [f"{path}: {s[:6]}..." for s in secrets if s in text]
    return found


def test_no_secret_reaches_logs_history_or_stored_documents(settings, mongo, api_key):
    time.sleep(1.5)  # history flushes every 0.5 s; NGINX's access log every second
    credentials = [*SECRETS, api_key]
    assert len(credentials) > 10
    files = state_files(settings)
    assert any("nginx" in str(p) for p in files)
    assert any("ray" in str(p) for p in files)
    assert not leaked(credentials, stored_documents(mongo), files)
