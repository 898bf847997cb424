"""System events from every replica in MongoDB's system_logs, read at GET /v1/admin/logs: a job that
fails in a JobWorker replica, and a gateway replica's start-up."""

from datetime import UTC, datetime, timedelta

import pytest

from cluster.processes import wait_until
from serve_app.jobs.client import JobsClient
from tests.integration.helpers import MODEL


@pytest.fixture(scope="module")
def failed_job(settings, api_key) -> dict:
    client = JobsClient(settings.public_url, api_key)
    try:
        upload_id = client.upload(b'"fine"\n42\n', "bad.jsonl")  # line 2 is not a JSON string
        job = client.wait(client.submit(MODEL, upload_id)["id"], show=False)
    finally:
        client.close()
    assert job["status"] == "failed", job
    return job


def logs(api, **params) -> dict:
    answer = api.get("/v1/admin/logs", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_failed_job_is_a_warning_of_the_job_worker_with_its_id(api, failed_job):
    def entries() -> list[dict]:
        page = logs(api, component="JobWorker", level="warning", limit=200)["data"]
        return [e for e in page if e.get("job_id") == failed_job["id"]]

    assert wait_until(entries, 30), "the job's failure did not reach system_logs"
    (entry,) = entries()
    assert entry["level"] == "warning"
    assert "invalid input" in entry["message"]
    assert "line 2 must be a JSON string" in entry["message"]
    assert entry["pid"] > 0
    assert not [
        e
        for e in logs(api, component="JobWorker", level="error", limit=200)["data"]
        if e.get("job_id") == failed_job["id"]
    ]


def test_a_gateway_replicas_start_up_is_an_info_event(api):
    """Paged back through every gateway event at info or worse until a start-up is found."""
    started, cursor = [], None
    for _ in range(50):
        page = logs(api, component="gateway", level="info", limit=200, **({"cursor": cursor} if cursor else {}))
        started = [e for e in page["data"] if "replica started" in e["message"]]
        cursor = page["next_cursor"]
        if started or cursor is None:
            break
    assert started, "no gateway start-up in system_logs"
    assert started[0]["level"] == "info"


def test_pages_go_back_in_time_and_since_narrows(api, failed_job):
    first = logs(api, limit=1)
    assert len(first["data"]) == 1
    assert first["next_cursor"]
    second = logs(api, limit=1, cursor=first["next_cursor"])
    assert second["data"][0]["ts"] <= first["data"][0]["ts"]
    assert second["data"][0]["id"] != first["data"][0]["id"]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert logs(api, since=future)["data"] == []


def test_bad_filters_are_a_clear_422(api):
    for params in ({"level": "loud"}, {"cursor": "nope"}, {"since": "yesterday"}, {"limit": 0}):
        answer = api.get("/v1/admin/logs", params=params)
        assert answer.status_code == 422, (params, answer.text)
        assert next(iter(params)) in answer.text
