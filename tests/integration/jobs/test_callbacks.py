"""Job callbacks against the real cluster: public addresses only, pinned, signed, fair between tenants.

The job workers allow one non-public address, 198.18.0.2 (INFER_CALLBACK_ALLOW_NETWORKS, set by
the local bring-up for the Ray processes). The receiver runs there, in a network namespace of its
own (tests/integration/callback_receiver.py); this needs root and iproute2. Its ports:
ANSWERING (paths /200/... answer 200, /500/... answer 500) and HANGING (/hang/... never answers).
"""

import json
import os
import shutil
import time
import uuid
from datetime import datetime

import httpx
import pytest

from serve_app.jobs.callbacks import SECRET_CACHE_S
from serve_app.outbound import verify_signature
from tests.integration.callback_receiver import RECEIVER_ADDRESS, ReceiverNamespace
from tests.integration.helpers import MODEL, texts, wait_for

ANSWERING, HANGING, CLOSED = 8002, 8001, 8009
RECEIVER = f"http://{RECEIVER_ADDRESS}"


@pytest.fixture(scope="session")
def receiver(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("the callback receiver's network namespace needs root and iproute2")
    with ReceiverNamespace([HANGING, ANSWERING], tmp_path_factory.mktemp("callbacks") / "received.jsonl") as ns:
        yield ns


@pytest.fixture
def new_tenant(make_key, settings):
    """Makes a client for a fresh tenant (no callback secret yet) with no rate limit or job quota."""

    def make(label: str) -> httpx.Client:
        owner = f"cb-{label}-{uuid.uuid4().hex[:8]}"
        key = make_key(owner, name="callback tests", scopes=["jobs"], rate_per_s=0, max_jobs=0)
        return httpx.Client(base_url=settings.public_url, timeout=60, headers={"Authorization": f"Bearer {key}"})

    return make


def submit(client, callback_url: str, n: int = 2, tag: str = "callback"):
    return client.post("/v1/jobs", json={"model": MODEL, "input": texts(n, tag), "callback_url": callback_url})


def callback_state(client, job_id: str, state: str, timeout_s: float = 90) -> dict:
    return wait_for(client, job_id, done=lambda j: (j["callback"] or {}).get("status") == state, timeout_s=timeout_s)


def received(receiver, job_id: str) -> list[dict]:
    return [r for r in receiver.records() if r["headers"].get("x-callback-id") == job_id]


def test_a_callback_is_delivered_signed_with_the_tenants_secret(new_tenant, settings, receiver):
    with new_tenant("signed") as client:
        first = submit(client, f"{RECEIVER}:{ANSWERING}/200/hook?tenant=signed")
        assert first.status_code == 202, first.text
        secret = first.json()["callback_secret"]
        assert secret.startswith("whsec_")
        job = first.json()
        assert job["callback"] == {
            "url": f"{RECEIVER}:{ANSWERING}/200/hook?tenant=signed",
            "status": "waiting",
            "attempts": 0,
            "last_error": None,
            "delivered_at": None,
        }
        delivered = callback_state(client, job["id"], "delivered")
        assert delivered["callback"]["attempts"] == 1
        [record] = received(receiver, job["id"])
        assert record["path"] == "/200/hook?tenant=signed"
        assert record["headers"]["host"] == f"{RECEIVER_ADDRESS}:{ANSWERING}"
        assert record["headers"]["content-type"] == "application/json"
        assert verify_signature(secret, record["headers"]["x-signature"], record["body"])
        assert not verify_signature(secret, record["headers"]["x-signature"], record["body"].replace("succ", "fail"))
        assert not verify_signature("whsec_" + "x" * 43, record["headers"]["x-signature"], record["body"])
        posted = json.loads(record["body"])
        assert (posted["id"], posted["status"]) == (job["id"], "succeeded")
        assert posted["result_url"] == f"/v1/jobs/{job['id']}/result"

        # The secret is shown once: the next submission does not carry it.
        second = submit(client, f"{RECEIVER}:{ANSWERING}/200/again")
        assert second.status_code == 202
        assert "callback_secret" not in second.json()
        # Rotation: a new secret, shown once; deliveries use it once the workers' cache has lapsed.
        rotated = client.post("/v1/callbacks/secret")
        assert rotated.status_code == 201, rotated.text
        new_secret = rotated.json()["secret"]
        assert new_secret.startswith("whsec_")
        assert new_secret != secret
        time.sleep(SECRET_CACHE_S + 0.5)
        third = submit(client, f"{RECEIVER}:{ANSWERING}/200/rotated").json()
        callback_state(client, third["id"], "delivered")
        [record] = received(receiver, third["id"])
        assert verify_signature(new_secret, record["headers"]["x-signature"], record["body"])
        assert not verify_signature(secret, record["headers"]["x-signature"], record["body"])


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://127.0.0.1:8000/-/routes", "resolves to 127.0.0.1, a loopback address"),
        ("http://2130706433/", "resolves to 127.0.0.1, a loopback address"),
        ("http://0x7f.1/", "resolves to 127.0.0.1, a loopback address"),
        ("http://[::1]/", "resolves to ::1, a loopback address"),
        ("http://[::ffff:127.0.0.1]:9000/", "an IPv4-mapped form of 127.0.0.1, a loopback address"),
        ("http://169.254.169.254/latest/meta-data", "resolves to 169.254.169.254, a link-local address"),
        ("http://10.0.0.1/", "resolves to 10.0.0.1, a private address"),
        ("http://localhost/", "a loopback address"),
        ("http://198.18.0.1/", "resolves to 198.18.0.1, a private address"),  # beside the allowed one
        (f"http://user:pass@{RECEIVER_ADDRESS}:{ANSWERING}/", "must not hold a user name or password"),
    ],
)
def test_a_callback_url_that_is_not_public_is_refused_at_submit_and_no_job_is_made(new_tenant, settings, url, fragment):
    with new_tenant("refused") as client:
        response = submit(client, url)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == "callback_url"
        assert fragment in error["message"]
        if "resolves to" in fragment:
            assert error["message"].endswith("callbacks go only to public addresses")
        assert client.get("/v1/jobs").json()["data"] == []


def test_a_refused_submission_makes_no_secret(new_tenant, settings, receiver):
    with new_tenant("nosecret") as client:
        assert submit(client, "http://127.0.0.1/").status_code == 422
        accepted = submit(client, f"{RECEIVER}:{ANSWERING}/200/after-refusal")
        assert accepted.status_code == 202
        assert accepted.json()["callback_secret"].startswith("whsec_")


def test_failed_deliveries_record_generic_errors_only(new_tenant, settings, receiver):
    with new_tenant("failing") as client:
        failing = submit(client, f"{RECEIVER}:{ANSWERING}/500/hook").json()
        closed = submit(client, f"{RECEIVER}:{CLOSED}/hook").json()
        errors = {}
        for name, job in (("500", failing), ("closed", closed)):
            failed = callback_state(client, job["id"], "failed")
            assert failed["status"] == "succeeded"
            assert failed["callback"]["attempts"] == settings.callback_max_attempts
            errors[name] = failed["callback"]["last_error"]
        assert errors == {"500": "HTTP 500 from receiver", "closed": "connection refused"}
        assert len(received(receiver, failing["id"])) == settings.callback_max_attempts


def test_a_tenants_callback_is_not_delayed_by_another_tenants_receiver_that_never_answers(
    new_tenant, settings, receiver
):
    """Tenant A's six callbacks hang on one receiver; tenant B's is delivered within BOUND_S of its job ending.

    (B's receiver is another port: the per-destination bound also shields a receiver, so callbacks to
    the very host:port that hangs share its slots.)
    """
    bound_s = 5.0
    with new_tenant("slow") as slow, new_tenant("fast") as fast:
        hanging = [submit(slow, f"{RECEIVER}:{HANGING}/hang/{i}", n=1, tag=f"hang{i}").json()["id"] for i in range(6)]
        for job_id in hanging:
            wait_for(slow, job_id)
        deadline = time.monotonic() + 30
        while sum(1 for r in receiver.records() if r["path"].startswith("/hang/")) < 4:
            assert time.monotonic() < deadline, "tenant A's callbacks never reached the receiver"
            time.sleep(0.1)

        job = submit(fast, f"{RECEIVER}:{ANSWERING}/200/fast", n=1, tag="fast").json()
        ended = wait_for(fast, job["id"])
        delivered = callback_state(fast, job["id"], "delivered", timeout_s=30)
        [record] = received(receiver, job["id"])
        delay_s = record["received_at"] - datetime.fromisoformat(ended["finished_at"]).timestamp()
        assert delay_s < bound_s, f"B's callback arrived {delay_s:.1f}s after its job ended"
        assert delivered["callback"]["attempts"] == 1
        still_hanging = [slow.get(f"/v1/jobs/{j}").json()["callback"] for j in hanging]
        assert sum(1 for c in still_hanging if c["status"] == "pending") >= 4, still_hanging
