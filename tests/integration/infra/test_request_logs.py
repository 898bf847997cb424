"""One request's lines, and one job's, found by the X-Request-ID in every process they crossed: NGINX's access
log, the gateway replica's, the model replica's, and for the job the job worker's, each a JSON line."""

import json
import time
import uuid
from pathlib import Path

import pytest

from cluster.processes import wait_until
from cluster.services import Nginx, Ray
from tests.integration.helpers import MODEL, wait_for


def serve_logs(settings) -> Path:
    return Path(Ray("ray", settings).temp_dir) / "session_latest" / "logs" / "serve"


def lines_with(path_glob: str, settings, request_id: str) -> list[dict]:
    """The JSON log lines of the replicas whose files match, that name request_id (as theirs or in a batch)."""
    found = []
    for log in sorted(serve_logs(settings).glob(path_glob)):
        for line in log.read_text(errors="replace").splitlines():
            if request_id not in line:
                continue
            record = json.loads(line)  # every line of a replica's log is JSON (logging_config.encoding)
            if record.get("request_id") == request_id or request_id in str(record.get("batch_requests", "")):
                found.append(record)
    return found


def nginx_lines(settings, request_id: str) -> list[dict]:
    log = Nginx("nginx", settings).prefix / "logs" / "access.log"
    return [json.loads(line) for line in log.read_text(errors="replace").splitlines() if request_id in line]


@pytest.fixture
def request_id() -> str:
    return f"trace-{uuid.uuid4().hex}"


def test_one_request_is_found_by_its_id_in_nginx_the_gateway_and_the_model(settings, api, request_id):
    text = f"a request followed through every log {time.time()}"  # new: a cache miss, so the model runs
    response = api.post("/v1/embeddings", json={"model": MODEL, "input": [text]}, headers={"X-Request-ID": request_id})
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-ID"] == request_id

    def everywhere() -> bool:
        return bool(
            nginx_lines(settings, request_id)
            and lines_with("replica_*Gateway*.log", settings, request_id)
            and lines_with("replica_*EmbeddingModel*.log", settings, request_id)
        )

    assert wait_until(everywhere, 15), (
        nginx_lines(settings, request_id),
        lines_with("replica_*Gateway*.log", settings, request_id),
        lines_with("replica_*EmbeddingModel*.log", settings, request_id),
    )
    [door] = nginx_lines(settings, request_id)
    assert door["status"] == 200
    access = [r for r in lines_with("replica_*Gateway*.log", settings, request_id) if r.get("http_route")]
    assert len(access) == 1, access
    assert access[0]["http_route"] == "/v1/embeddings"
    assert access[0]["status"] == 200
    assert access[0]["model"] == MODEL
    assert access[0]["tenant"]
    assert access[0]["latency_ms"] > 0
    batches = lines_with("replica_*EmbeddingModel*.log", settings, request_id)
    assert any(b.get("batch_texts", 0) >= 1 and b.get("forward_ms", 0) > 0 for b in batches), batches


def test_one_job_is_found_by_its_submitting_requests_id_in_the_gateway_the_worker_and_the_model(
    settings, api, request_id
):
    inputs = [f"a job followed through every log {i} {time.time()}" for i in range(3)]
    response = api.post("/v1/jobs", json={"model": MODEL, "input": inputs}, headers={"X-Request-ID": request_id})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert wait_for(api, job_id)["status"] == "succeeded"

    def events(glob: str) -> set[str]:
        return {r.get("job_event", "") for r in lines_with(glob, settings, request_id)}

    def everywhere() -> bool:
        return (
            "accepted" in events("replica_*Gateway*.log")
            and {"running", "succeeded"} <= events("replica_*JobWorker*.log")
            and bool(lines_with("replica_*EmbeddingModel*.log", settings, request_id))
        )

    assert wait_until(everywhere, 15), (
        events("replica_*Gateway*.log"),
        events("replica_*JobWorker*.log"),
        lines_with("replica_*EmbeddingModel*.log", settings, request_id),
    )
    worker_lines = lines_with("replica_*JobWorker*.log", settings, request_id)
    assert all(r.get("job") == job_id for r in worker_lines if r.get("job_event")), worker_lines
    submitted = [r for r in lines_with("replica_*Gateway*.log", settings, request_id) if r.get("http_route")]
    assert [(r["http_route"], r["status"], r.get("job")) for r in submitted] == [("/v1/jobs", 202, job_id)]
