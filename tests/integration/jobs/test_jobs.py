"""Asynchronous jobs end to end: NGINX -> Gateway -> MongoDB + RabbitMQ -> JobWorker -> model."""

import json
import os
import signal
import time
import uuid

import httpx
import numpy as np
import pika
import pytest
from pymongo import MongoClient

from cluster.services import RabbitMQ, load_serve_config
from serve_app.infra.rabbitmq import connection_parameters
from serve_app.jobs.queue import job_message, message_properties
from tests.integration.helpers import MODEL, job_diagnosis, submit, texts, wait_for


def upload(api, lines: list[str]) -> dict:
    """POST /v1/uploads, then the form it returns (its fields, then the file) to the object store."""
    ticket = api.post("/v1/uploads").json()
    assert ticket["method"] == "POST"
    body = "\n".join(lines).encode()
    posted = httpx.post(ticket["url"], data=ticket["fields"], files={ticket["file_field"]: ("texts.jsonl", body)})
    assert posted.status_code == 204, posted.text
    return ticket


@pytest.fixture(scope="module")
def mongo(settings):
    with MongoClient(settings.mongo_url, **settings.mongo_options()) as client:
        yield client[settings.mongo_db]


def test_inline_job_submit_poll_and_result(api):
    inputs = texts(5)
    response = submit(api, input=inputs)
    assert response.status_code == 202
    job = response.json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["progress"] == {"done": 0, "total": 5}
    finished = wait_for(api, job["id"])
    assert finished["status"] == "succeeded"
    assert finished["progress"] == {"done": 5, "total": 5}
    assert finished["started_at"]
    assert finished["finished_at"]
    result = api.get(finished["result_url"]).json()
    assert result["object"] == "list"
    assert [d["index"] for d in result["data"]] == list(range(5))
    synchronous = api.post("/v1/embeddings", json={"model": MODEL, "input": inputs})
    assert synchronous.headers["X-Cache-Hits"] == "5", "the job cached what it computed"
    np.testing.assert_array_equal(
        np.array([d["embedding"] for d in result["data"]]),
        np.array([d["embedding"] for d in synchronous.json()["data"]]),
    )


def test_uploaded_input_and_a_large_result_in_the_object_store(api, settings, tenant):
    count = settings.job_inline_result_max_items + 50
    inputs = texts(count, "upload")
    lines = [json.dumps(t) if i % 2 else json.dumps({"text": t}) for i, t in enumerate(inputs)]
    ticket = upload(api, lines)
    assert ticket["input_url"] == f"s3://{settings.job_bucket}/uploads/{tenant}/{ticket['upload_id']}.jsonl"
    job = submit(api, upload_id=ticket["upload_id"]).json()
    assert job["input"] == {"kind": "object", "url": ticket["input_url"]}
    finished = wait_for(api, job["id"])
    assert finished["status"] == "succeeded", finished["error"]
    result = api.get(finished["result_url"]).json()
    assert result["object"] == "job.result"
    assert result["count"] == count
    downloaded = httpx.get(result["url"], timeout=60)
    assert downloaded.status_code == 200
    rows = [json.loads(line) for line in downloaded.text.splitlines()]
    assert [r["index"] for r in rows] == list(range(count))
    assert len(rows[0]["embedding"]) == 384
    check = api.post("/v1/embeddings", json={"model": MODEL, "input": [inputs[7]]}).json()["data"][0]["embedding"]
    np.testing.assert_array_equal(np.float32(rows[7]["embedding"]), np.float32(check))


def test_input_url_form_is_accepted(api):
    ticket = upload(api, [json.dumps(t) for t in texts(3, "url")])
    job = submit(api, input_url=ticket["input_url"]).json()
    assert wait_for(api, job["id"])["status"] == "succeeded"


def test_jobs_are_listed_newest_first_paginated_and_filtered(api):
    ids = [submit(api, input=texts(1, "list")).json()["id"] for _ in range(3)]
    for job_id in ids:
        wait_for(api, job_id)
    first = api.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2]
    second = api.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert second["data"][0]["id"] == ids[0]
    succeeded = api.get("/v1/jobs", params={"status": "succeeded", "limit": 100}).json()["data"]
    assert {j["status"] for j in succeeded} == {"succeeded"}
    assert set(ids) <= {j["id"] for j in succeeded}
    assert api.get("/v1/jobs", params={"status": "bogus"}).status_code == 422
    assert api.get("/v1/jobs", params={"limit": 0}).status_code == 422


def job_worker_capacity(settings) -> int:
    """How many jobs the workers can hold at once: prefetch times the most replicas."""
    config = load_serve_config(settings)
    [worker] = [d for d in config["applications"][0]["deployments"] if d["name"] == "JobWorker"]
    return settings.job_prefetch * worker["autoscaling_config"]["max_replicas"]


def test_cancel_a_queued_and_a_running_job(api, settings, mongo):
    # Fill every worker's prefetch with long jobs, so the next one waits in the queue.
    capacity = job_worker_capacity(settings)
    long_jobs = [submit(api, input=texts(3000, f"long{i}")).json()["id"] for i in range(capacity)]
    waiting = submit(api, input=texts(10, "waiting")).json()["id"]
    cancelled = api.delete(f"/v1/jobs/{waiting}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    running = wait_for(api, long_jobs[0], done=lambda j: j["status"] == "running" and j["progress"]["done"] > 0)
    stopping = api.delete(f"/v1/jobs/{running['id']}").json()
    assert stopping["cancel_requested"] is True
    stopped = wait_for(api, running["id"])
    assert stopped["status"] == "cancelled"
    assert stopped["progress"]["done"] < stopped["progress"]["total"]
    for job_id in long_jobs[1:]:
        api.delete(f"/v1/jobs/{job_id}")
        wait_for(api, job_id)
    never_ran = mongo["jobs"].find_one({"_id": waiting})
    assert never_ran["started_at"] is None
    assert never_ran["attempts"] == 0
    assert api.delete(f"/v1/jobs/{waiting}").status_code == 409
    assert api.get(f"/v1/jobs/{waiting}/result").status_code == 409


def test_a_worker_killed_mid_job_has_its_job_redelivered_and_finished_once(api, mongo, settings):
    count = settings.job_inline_result_max_items + 1000
    job_id = submit(api, input=texts(count, "killed")).json()["id"]
    wait_for(api, job_id, done=lambda j: j["status"] == "running" and j["progress"]["done"] > 0)
    worker_pid = mongo["jobs"].find_one({"_id": job_id})["worker"]["pid"]
    os.kill(worker_pid, signal.SIGKILL)
    try:
        finished = wait_for(api, job_id, timeout_s=300)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{job_diagnosis(settings, job_id)}") from None
    assert finished["status"] == "succeeded", finished["error"]
    assert finished["attempts"] == 2
    assert mongo["jobs"].find_one({"_id": job_id})["worker"]["pid"] != worker_pid
    result = api.get(finished["result_url"]).json()
    rows = httpx.get(result["url"], timeout=60).text.splitlines()
    assert len(rows) == count
    assert [json.loads(r)["index"] for r in rows] == list(range(count))


def test_rabbitmq_restarted_with_jobs_queued_loses_none(api, settings, mongo):
    rabbitmq = RabbitMQ("rabbitmq", settings)
    if not rabbitmq.process.running:
        pytest.skip("RabbitMQ is not one this project started; it will not stop another's")
    running = submit(api, input=texts(2500, "running-through-restart")).json()["id"]
    wait_for(api, running, done=lambda j: j["status"] == "running" and j["progress"]["done"] > 0)
    ids = [submit(api, input=texts(300, f"restart{i}")).json()["id"] for i in range(6)]
    try:
        rabbitmq.stop()
        refused = submit(api, input=texts(1, "refused"))
        assert refused.status_code == 503
        assert "not accepted" in refused.json()["error"]["message"]
        orphan = mongo["jobs"].find_one(
            {
                "status": {"$in": ["queued", "running"]},
                "progress.total": 1,
                "input.count": 1,
                "created_at": {"$gte": mongo["jobs"].find_one({"_id": ids[-1]})["created_at"]},
            }
        )
        assert orphan is None, "a refused job must not stay queued"
    finally:
        rabbitmq.ensure()
    for job_id in ids:
        assert wait_for(api, job_id, timeout_s=300)["status"] == "succeeded"
    survivor = wait_for(api, running, timeout_s=300)
    assert survivor["status"] == "succeeded"
    assert survivor["attempts"] == 1, "the job running through the restart was run again"


def test_a_poison_message_lands_in_the_dead_letter_queue(settings):
    marker = f"poison {uuid.uuid4().hex}".encode()
    connection = pika.BlockingConnection(connection_parameters(settings))
    channel = connection.channel()
    channel.basic_publish("", settings.job_queue, marker, message_properties("poison"))
    connection.close()
    deadline = time.monotonic() + 30
    found = False
    while not found and time.monotonic() < deadline:
        # Read without acknowledging: closing the connection puts every message back.
        connection = pika.BlockingConnection(connection_parameters(settings))
        channel = connection.channel()
        while (message := channel.basic_get(settings.job_dead_letter_queue))[0] is not None:
            found = found or message[2] == marker
        connection.close()
        time.sleep(0.2)
    assert found


def queue_drained(settings, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        connection = pika.BlockingConnection(connection_parameters(settings))
        ready = connection.channel().queue_declare(settings.job_queue, passive=True).method.message_count
        connection.close()
        if ready == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the job queue was not consumed")


def test_a_redelivered_message_for_a_finished_job_changes_nothing(api, settings):
    job = wait_for(api, submit(api, input=texts(2, "redeliver")).json()["id"])
    connection = pika.BlockingConnection(connection_parameters(settings))
    connection.channel().basic_publish("", settings.job_queue, job_message(job["id"]), message_properties(job["id"]))
    connection.close()
    queue_drained(settings)
    time.sleep(1)  # taken from the queue; give the worker a moment to act on it
    again = api.get(f"/v1/jobs/{job['id']}").json()
    assert (again["status"], again["attempts"], again["finished_at"]) == ("succeeded", 1, job["finished_at"])


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"model": "nope", "input": ["x"]}, 404, "does not exist"),
        ({"model": MODEL, "input": []}, 422, "at least one text"),
        ({"model": MODEL, "input": [""]}, 422, "is empty"),
        ({"model": MODEL}, 422, "exactly one of"),
        ({"model": MODEL, "input": ["x"], "upload_id": "0" * 32}, 422, "exactly one of"),
        ({"model": MODEL, "upload_id": "0" * 32}, 400, "does not exist"),
        ({"model": MODEL, "upload_id": "../etc"}, 422, "upload_id"),
        ({"model": MODEL, "input_url": "s3://models/all-minilm-l6-v2/1/config.json"}, 400, "only"),
        ({"model": MODEL, "input_url": "http://example.com/x"}, 400, "s3://"),
        ({"model": MODEL, "input": ["x"], "callback_url": "ftp://host/x"}, 422, "callback_url"),
    ],
)
def test_bad_job_requests_are_refused_at_submit(api, body, status, fragment):
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


def test_too_many_inline_texts_are_refused(api, settings):
    response = submit(api, input=["x"] * (settings.job_max_inline_items + 1))
    assert response.status_code == 422
    assert f"at most {settings.job_max_inline_items}" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        (['"fine"', '"also fine"', "{not json"], "line 3 is not valid JSON"),
        (['"fine"', "42"], "line 2 must be a JSON string"),
        (['"fine"', '""'], "line 2 is empty"),
        (["", "   "], "no texts"),
        (['"fine"', '"' + "x" * 120_000 + '"'], "line 2 is longer than"),
    ],
)
def test_a_bad_upload_fails_the_job_with_a_clear_error(api, lines, fragment):
    ticket = upload(api, lines)
    job = submit(api, upload_id=ticket["upload_id"]).json()
    finished = wait_for(api, job["id"])
    assert finished["status"] == "failed"
    assert fragment in finished["error"]["message"]
    assert api.get(f"/v1/jobs/{job['id']}/result").status_code == 409


def test_unknown_job_ids_are_404(api):
    for path in ("/v1/jobs/000000000000000000000000", "/v1/jobs/nope/result"):
        response = api.get(path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "job_not_found"
    assert api.delete("/v1/jobs/000000000000000000000000").status_code == 404


def test_a_job_accepted_but_never_published_is_published_by_the_sweeper(api, settings, mongo, tenant):
    from datetime import UTC, datetime, timedelta

    from serve_app.jobs.store import new_job_id

    job_id = new_job_id()
    created = datetime.now(UTC) - timedelta(seconds=settings.job_publish_grace_s + 1)
    mongo["job_inputs"].insert_one({"_id": job_id, "texts": texts(2, "orphan")})
    mongo["jobs"].insert_one(
        {
            "_id": job_id,
            "owner": tenant,
            "model": MODEL,
            "status": "queued",
            "input": {"kind": "inline", "count": 2},
            "progress": {"done": 0, "total": 2},
            "attempts": 0,
            "cancel_requested": False,
            "created_at": created,
            "started_at": None,
            "finished_at": None,
            "published_at": None,
            "error": None,
            "result": None,
            "callback": None,
        }
    )
    finished = wait_for(api, job_id, timeout_s=settings.job_sweep_interval_s * 3 + 30)
    assert finished["status"] == "succeeded"


def test_a_retried_submission_with_the_same_idempotency_key_makes_one_job(api):
    """A client (or proxy) that retries POST /v1/jobs with its Idempotency-Key gets the first job back."""
    from concurrent.futures import ThreadPoolExecutor

    body = {"model": MODEL, "input": texts(3, "idempotent")}
    key = f"retry-{uuid.uuid4().hex}"

    def post(_=None):
        return api.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(post, range(4)))  # retries racing each other
    answers.append(post())  # and one long after
    assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1, f"one key made {len(ids)} jobs"
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == len(answers) - 1
    assert wait_for(api, ids.pop())["status"] == "succeeded"

    other = api.post("/v1/jobs", json={**body, "input": texts(3, "other")}, headers={"Idempotency-Key": key})
    assert other.status_code == 422
    assert other.json()["error"]["param"] == "Idempotency-Key"
    assert "different request" in other.json()["error"]["message"]

    fresh = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"new-{uuid.uuid4().hex}"})
    assert fresh.status_code == 202
    assert fresh.json()["id"] not in {a.json()["id"] for a in answers}
