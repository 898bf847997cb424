"""The cluster's S3 server (cluster/s3_server.py): signed requests only, no admin API, bounded uploads."""

from __future__ import annotations

import json
import time
import uuid
from urllib.parse import urlsplit

import httpx
import pytest
from minio import Minio
from minio.error import S3Error

from serve_app.infra.s3 import object_store_client
from tests.post_forms import post_declaring

MODEL = "all-minilm-l6-v2"


def _client(settings, access_key: str | None, secret_key: str | None) -> Minio:
    url = urlsplit(settings.s3_endpoint)
    return Minio(url.netloc, access_key, secret_key, secure=url.scheme == "https", region=settings.s3_region)


def test_the_store_refuses_anonymous_and_default_credentials(settings):
    assert (settings.s3_access_key, settings.s3_secret_key.get_secret_value()) != ("minioadmin", "minioadmin"), (
        "the bring-up should give the object store keys of its own"
    )
    assert httpx.get(settings.s3_endpoint + "/").status_code == 403
    assert httpx.get(f"{settings.s3_endpoint}/{settings.model_bucket}").status_code == 403
    assert httpx.put(f"{settings.s3_endpoint}/{settings.job_bucket}/planted", content=b"x").status_code == 403
    with pytest.raises(S3Error) as anonymous:
        next(iter(_client(settings, None, None).list_objects(settings.model_bucket)))
    assert anonymous.value.code == "AccessDenied"
    for access_key, secret_key in [("minioadmin", "minioadmin"), (settings.s3_access_key, "minioadmin")]:
        with pytest.raises(S3Error) as refused:
            _client(settings, access_key, secret_key).list_buckets()
        assert refused.value.code in {"InvalidAccessKeyId", "SignatureDoesNotMatch"}
    names = {b.name for b in object_store_client(settings, 5).list_buckets()}
    assert settings.model_bucket in names


def test_the_moto_admin_api_is_not_served(settings):
    for path in ("/moto-api/reset", "/moto-api/", "/moto-api/data.json"):
        assert httpx.post(settings.s3_endpoint + path).status_code == 404, path
    assert object_store_client(settings, 5).bucket_exists(settings.model_bucket), "the models are still there"


def test_an_upload_over_the_input_limit_is_refused_by_the_store(api, settings):
    ticket = api.post("/v1/uploads").json()
    assert ticket["method"] == "POST"
    assert ticket["max_bytes"] == settings.job_max_input_bytes
    assert ticket["fields"]["key"].endswith(f"{ticket['upload_id']}.jsonl")

    status, body = post_declaring(ticket["url"], ticket["fields"], settings.job_max_input_bytes + 1024 * 1024)
    assert status == 400, body
    assert "<Code>EntityTooLarge</Code>" in body
    refused = api.post("/v1/jobs", json={"model": MODEL, "upload_id": ticket["upload_id"]})
    assert refused.status_code == 400
    assert "does not exist" in refused.json()["error"]["message"]

    # The form is for its own key and bucket only.
    fields = {**ticket["fields"], "key": f"uploads/someone-else/{uuid.uuid4().hex}.jsonl"}
    stolen = httpx.post(ticket["url"], data=fields, files={"file": ("t.jsonl", b'"x"\n')})
    assert stolen.status_code == 403


def test_an_upload_within_the_limit_is_stored_and_a_job_reads_it(api, settings):
    ticket = api.post("/v1/uploads").json()
    texts = [f"object store upload {uuid.uuid4().hex[:8]} number {i}" for i in range(5)]
    body = "\n".join(json.dumps(t) for t in texts).encode()
    posted = httpx.post(ticket["url"], data=ticket["fields"], files={ticket["file_field"]: ("texts.jsonl", body)})
    assert posted.status_code == 204, posted.text
    # The same form again cannot replace it with something over the limit.
    status, _ = post_declaring(ticket["url"], ticket["fields"], settings.job_max_input_bytes + 1024 * 1024)
    assert status in (400, 403)

    job = api.post("/v1/jobs", json={"model": MODEL, "upload_id": ticket["upload_id"]})
    assert job.status_code == 202, job.text
    deadline = time.monotonic() + 180
    while (doc := api.get(f"/v1/jobs/{job.json()['id']}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, doc
        time.sleep(0.2)
    assert doc["status"] == "succeeded", doc["error"]
    assert doc["progress"] == {"done": 5, "total": 5}
