"""Authentication through a MongoDB outage longer than the key cache's TTL.

Keys used in the last INFER_AUTH_FALLBACK_TTL_S keep working from their fallback copy in Redis;
a key never seen gets 503; a key revoked meanwhile (the admin CLI, which cannot write MongoDB and
says so, but leaves a deny entry in Redis) is refused at once, and stays refused when MongoDB is
back until the revocation is recorded by running the command again.
"""

import subprocess
import sys
import threading
import time
import uuid
from collections import Counter

import httpx
import pytest

from cluster.services import MongoDB
from serve_app.auth.credentials import Credential
from serve_app.settings import REPO_ROOT

MODEL = "all-minilm-l6-v2"
OUTAGE_S = 30


def embed(client: httpx.Client, key: str) -> httpx.Response:
    text = f"through the outage {uuid.uuid4().hex[:8]}"
    return client.post(
        "/v1/embeddings", json={"model": MODEL, "input": text}, headers={"Authorization": f"Bearer {key}"}
    )


def revoke_with_the_cli(key: str) -> subprocess.CompletedProcess:
    key_id = Credential.parse(key).key_id
    return subprocess.run(
        [sys.executable, "-m", "serve_app.admin", "keys", "revoke", key_id],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_keys_seen_before_outlive_a_mongodb_outage_and_revocation_still_lands(make_key, settings, tenant):
    mongodb = MongoDB("mongodb", settings)
    if not mongodb.process.running:
        pytest.skip("MongoDB is not one this project started; it will not stop another's")
    steady = make_key(tenant, name="outage: steady", rate_per_s=0)
    to_revoke = make_key(tenant, name="outage: revoked during it", rate_per_s=0)
    never_seen = make_key(tenant, name="outage: never used before it", rate_per_s=0)
    with httpx.Client(base_url=settings.public_url, timeout=30) as client:
        assert embed(client, steady).status_code == 200  # looked up: cached, and its fallback copy kept
        assert embed(client, to_revoke).status_code == 200

        statuses: Counter[int] = Counter()
        stop = threading.Event()

        def steady_loop() -> None:
            with httpx.Client(base_url=settings.public_url, timeout=30) as own:
                while not stop.is_set():
                    statuses[embed(own, steady).status_code] += 1
                    time.sleep(0.1)

        loop = threading.Thread(target=steady_loop, daemon=True)
        try:
            mongodb.stop()
            stopped_at = time.monotonic()
            loop.start()
            time.sleep(settings.auth_cache_ttl_s + 1)  # past the fast path's TTL: only the fallback is left

            unknown = embed(client, never_seen)
            assert unknown.status_code == 503, unknown.text
            assert "key store" in unknown.json()["error"]["message"]

            revoked = revoke_with_the_cli(to_revoke)
            assert revoked.returncode == 1, revoked.stdout + revoked.stderr
            assert "not stored" in revoked.stderr  # loud: MongoDB did not record it
            refused = embed(client, to_revoke)
            assert refused.status_code == 401, refused.text
            assert "revoked" in refused.json()["error"]["message"]

            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))
            stop.set()
            loop.join(60)
            assert statuses[200] > 50, statuses
            assert set(statuses) == {200}, statuses  # rate 0: every answer through the outage is a 200
        finally:
            stop.set()
            mongodb.ensure()

        deadline = time.monotonic() + 30  # the gateway tries MongoDB again within seconds
        while embed(client, never_seen).status_code != 200:
            assert time.monotonic() < deadline, "a new key still fails after MongoDB came back"
            time.sleep(0.5)
        assert embed(client, to_revoke).status_code == 401  # the deny entry holds until the revocation is stored
        recorded = revoke_with_the_cli(to_revoke)
        assert recorded.returncode == 0, recorded.stderr
        assert '"revoked": true' in recorded.stdout
        assert embed(client, to_revoke).status_code == 401
        assert embed(client, steady).status_code == 200
