"""cluster/s3_server.py: moto's S3 behind Signature V4 and POST-policy checks, on a server of its own.

Each module run starts `python -m cluster.s3_server` on a free loopback port, in a temporary
directory, with fresh keys in its environment, and stops it by its pid.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from minio import Minio
from minio.commonconfig import CopySource
from minio.datatypes import PostPolicy
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from serve_app.jobs.objects import UPLOAD_CONTENT_TYPE, JobObjects, ObjectRef
from serve_app.settings import REPO_ROOT, Settings
from tests.post_forms import post_declaring

MiB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(endpoint, access key, secret key) of a server of this module's own."""
    workdir = tmp_path_factory.mktemp("s3")
    port = _free_port()
    access_key, secret_key = f"test-{secrets.token_hex(4)}", secrets.token_urlsafe(24)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("INFER_")},
        "INFER_S3_ACCESS_KEY": access_key,
        "INFER_S3_SECRET_KEY": secret_key,
        "PYTHONPATH": str(REPO_ROOT),
    }
    log = (workdir / "s3.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.s3_server", "--host", "127.0.0.1", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the S3 server did not start: {(workdir / 's3.log').read_text()}") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", access_key, secret_key
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
    assert secret_key not in (workdir / "s3.log").read_text(), "the secret key was logged"


def _client(endpoint: str, access_key: str | None, secret_key: str | None) -> Minio:
    return Minio(
        urlsplit(endpoint).netloc, access_key=access_key, secret_key=secret_key, secure=False, region="us-east-1"
    )


@pytest.fixture(scope="module")
def client(server) -> Minio:
    endpoint, access_key, secret_key = server
    return _client(endpoint, access_key, secret_key)


@pytest.fixture(scope="module")
def bucket(client) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    client.make_bucket(name)
    return name


def _code(response: httpx.Response) -> str:
    text = response.text
    return text.split("<Code>", 1)[1].split("</Code>", 1)[0] if "<Code>" in text else ""


# -- Signature V4 -------------------------------------------------------------------------------------


def test_requests_without_credentials_are_refused(server, client, bucket):
    endpoint = server[0]
    client.put_object(bucket, "secret.txt", io.BytesIO(b"secret"), 6)
    for method, path in [
        ("GET", "/"),
        ("GET", f"/{bucket}"),
        ("GET", f"/{bucket}/secret.txt"),
        ("DELETE", f"/{bucket}"),
    ]:
        response = httpx.request(method, endpoint + path)
        assert response.status_code == 403, (method, path, response.text)
        assert _code(response) == "AccessDenied"
    put = httpx.put(f"{endpoint}/{bucket}/planted.txt", content=b"x")
    assert put.status_code == 403
    with pytest.raises(S3Error) as anonymous:
        _client(endpoint, None, None).list_objects(bucket).__next__()
    assert anonymous.value.code == "AccessDenied"
    assert [o.object_name for o in client.list_objects(bucket)] == ["secret.txt"]


def test_a_wrong_secret_or_key_is_refused(server, bucket):
    endpoint, access_key, secret_key = server
    with pytest.raises(S3Error) as wrong_secret:
        _client(endpoint, access_key, secret_key + "x").list_buckets()
    assert wrong_secret.value.code == "SignatureDoesNotMatch"
    with pytest.raises(S3Error) as wrong_key:
        _client(endpoint, "minioadmin", "minioadmin").list_buckets()
    assert wrong_key.value.code == "InvalidAccessKeyId"
    with pytest.raises(S3Error):
        _client(endpoint, access_key, "minioadmin").put_object(bucket, "x", io.BytesIO(b"x"), 1)


def test_the_minio_client_works(server, client, bucket):
    assert client.bucket_exists(bucket)
    assert bucket in {b.name for b in client.list_buckets()}
    key = "dir/a key with spaces+plus & ümlaut.txt"
    client.put_object(
        bucket, key, io.BytesIO(b"0123456789"), 10, content_type="text/plain", metadata={"x-amz-meta-tag": "v"}
    )
    stat = client.stat_object(bucket, key)
    assert stat.size == 10
    assert stat.content_type == "text/plain"
    whole = client.get_object(bucket, key)
    part = client.get_object(bucket, key, offset=2, length=3)
    try:
        assert whole.read() == b"0123456789"
        assert part.read() == b"234"
    finally:
        for r in (whole, part):
            r.close()
            r.release_conn()
    # Multipart: an unknown length in 5 MiB parts.
    big = os.urandom(11 * MiB)
    client.put_object(bucket, "dir/big.bin", io.BytesIO(big), -1, part_size=5 * MiB)
    response = client.get_object(bucket, "dir/big.bin")
    try:
        assert response.read() == big
    finally:
        response.close()
        response.release_conn()
    client.copy_object(bucket, "copy.txt", CopySource(bucket, key))
    names = {o.object_name for o in client.list_objects(bucket, prefix="dir/", recursive=True)}
    assert {key, "dir/big.bin"} <= names
    client.remove_object(bucket, "copy.txt")
    errors = list(client.remove_objects(bucket, [DeleteObject("dir/big.bin")]))
    assert errors == []
    assert "dir/big.bin" not in {o.object_name for o in client.list_objects(bucket, recursive=True)}
    with pytest.raises(S3Error) as missing:
        client.stat_object(bucket, "dir/big.bin")
    assert missing.value.code in {"NoSuchKey", "ResourceNotFound"}


def test_presigned_get_and_put(client, bucket):
    client.put_object(bucket, "shared.txt", io.BytesIO(b"shared"), 6)
    url = client.presigned_get_object(bucket, "shared.txt", expires=timedelta(minutes=5))
    assert httpx.get(url).content == b"shared"

    put_url = client.presigned_put_object(bucket, "presigned-put.txt", expires=timedelta(minutes=5))
    assert httpx.put(put_url, content=b"put").status_code == 200
    assert client.stat_object(bucket, "presigned-put.txt").size == 3


def test_a_tampered_or_expired_presigned_url_is_refused(client, bucket):
    client.put_object(bucket, "other.txt", io.BytesIO(b"other"), 5)
    url = client.presigned_get_object(bucket, "shared-2.txt", expires=timedelta(minutes=5))
    parts = urlsplit(url)
    other_object = urlunsplit(parts._replace(path=parts.path.replace("shared-2.txt", "other.txt")))
    flipped = url[:-1] + ("0" if url[-1] != "0" else "1")
    longer = url.replace("X-Amz-Expires=300", "X-Amz-Expires=3000")
    for tampered in (other_object, flipped, longer):
        response = httpx.get(tampered)
        assert response.status_code == 403, tampered
        assert _code(response) == "SignatureDoesNotMatch"

    short = client.presigned_get_object(bucket, "other.txt", expires=timedelta(seconds=2))
    assert httpx.get(short).status_code == 200  # X-Amz-Date has whole seconds: still valid for at least 1 s
    time.sleep(3.1)
    expired = httpx.get(short)
    assert expired.status_code == 403
    assert "expired" in expired.text


def test_the_moto_admin_api_is_not_served(server, client, bucket):
    endpoint = server[0]
    for method, path in [("POST", "/moto-api/reset"), ("GET", "/moto-api/"), ("GET", "/moto-api/data.json")]:
        assert httpx.request(method, endpoint + path).status_code == 404, path
    # Not even signed: the path is not S3.
    signed = client.presigned_get_object(bucket, "x")
    assert httpx.post(endpoint + "/moto-api/reset?" + urlsplit(signed).query).status_code == 404
    assert client.bucket_exists(bucket), "the buckets survived /moto-api/reset"


def test_a_request_for_another_service_is_not_served(server):
    response = httpx.post(server[0] + "/", headers={"X-Amz-Target": "DynamoDB_20120810.ListTables"}, content=b"{}")
    assert response.status_code == 404


def test_a_body_that_does_not_match_its_signed_hash_is_refused(server, bucket):
    """The signed x-amz-content-sha256 binds the body: swap the body, keep the headers, and it is refused."""
    endpoint, access_key, secret_key = server
    sent: dict = {}

    class Recorder:
        def urlopen(self, method, url, body=None, headers=None, **_):
            sent.update(method=method, url=url, body=body, headers=dict(headers))
            raise ConnectionError("recorded")

        def clear(self):
            pass

    client = Minio(urlsplit(endpoint).netloc, access_key, secret_key, secure=False, region="us-east-1")
    client._http = Recorder()
    with pytest.raises(ConnectionError):
        client.put_object(bucket, "bound.txt", io.BytesIO(b"original"), 8)
    headers = {k: v for k, v in sent["headers"].items() if k.lower() != "content-length"}
    assert httpx.put(sent["url"], content=b"original", headers=headers).status_code == 200
    swapped = httpx.put(sent["url"], content=b"tampered", headers=headers)
    assert swapped.status_code == 400
    assert _code(swapped) == "XAmzContentSHA256Mismatch"


# -- POST policy uploads ------------------------------------------------------------------------------


def _policy(bucket: str, key: str, max_bytes: int, expires: timedelta = timedelta(minutes=5)) -> PostPolicy:
    policy = PostPolicy(bucket, datetime.now(UTC) + expires)
    policy.add_equals_condition("key", key)
    policy.add_content_length_range_condition(1, max_bytes)
    return policy


def _form(client: Minio, policy: PostPolicy, key: str) -> dict[str, str]:
    return {"key": key, **client.presigned_post_policy(policy)}


def _post(server, bucket: str, fields: dict[str, str], data: bytes) -> httpx.Response:
    return httpx.post(f"{server[0]}/{bucket}", data=fields, files={"file": ("texts.jsonl", data)}, timeout=30)


def _exists(client: Minio, bucket: str, key: str) -> bool:
    try:
        client.stat_object(bucket, key)
    except S3Error:
        return False
    return True


def test_a_post_upload_within_the_policy_is_stored(server, client, bucket):
    key = f"uploads/{uuid.uuid4().hex}.jsonl"
    body = b'"a text"\n' * 1000
    response = _post(server, bucket, _form(client, _policy(bucket, key, MiB), key), body)
    assert response.status_code == 204, response.text
    stored = client.get_object(bucket, key)
    try:
        assert stored.read() == body
    finally:
        stored.close()
        stored.release_conn()


def test_a_post_uploads_host_header_cannot_move_it_to_another_bucket(server, client, bucket):
    """moto reads a bucket from a Host subdomain; the policy's bucket must be the only one written."""
    other = f"other-{uuid.uuid4().hex[:8]}"
    client.make_bucket(other)
    key = f"uploads/{uuid.uuid4().hex}.jsonl"
    response = httpx.post(
        f"{server[0]}/{bucket}",
        data=_form(client, _policy(bucket, key, MiB), key),
        files={"file": ("texts.jsonl", b'"x"\n')},
        headers={"Host": f"{other}.attacker.test"},
        timeout=30,
    )
    assert response.status_code == 204, response.text
    assert "attacker" not in response.headers.get("Location", "")
    assert _exists(client, bucket, key)
    assert not list(client.list_objects(other, recursive=True))


def test_a_post_upload_over_the_size_limit_is_refused_while_streaming(server, client, bucket):
    """A file just over the limit, in a request whose length is within the form's overhead: read, then refused."""
    key = f"uploads/{uuid.uuid4().hex}.jsonl"
    response = _post(server, bucket, _form(client, _policy(bucket, key, MiB), key), os.urandom(MiB + 5000))
    assert response.status_code == 400
    assert _code(response) == "EntityTooLarge"
    assert not _exists(client, bucket, key)


def test_a_post_upload_declaring_too_many_bytes_is_refused_before_the_file_is_read(server, client, bucket):
    """2 MB declared against a 1 MB policy: the answer comes although the file was never sent."""
    key = f"uploads/{uuid.uuid4().hex}.jsonl"
    fields = _form(client, _policy(bucket, key, MiB), key)
    status, answer = post_declaring(f"{server[0]}/{bucket}", fields, 2 * MiB)
    assert status == 400, answer[:200]
    assert "<Code>EntityTooLarge</Code>" in answer
    assert not _exists(client, bucket, key)


def test_a_post_upload_outside_its_policy_is_refused(server, client, bucket):
    key = f"uploads/{uuid.uuid4().hex}.jsonl"
    fields = _form(client, _policy(bucket, key, MiB), key)

    other_key = _post(server, bucket, {**fields, "key": "uploads/someone-else.jsonl"}, b"x")
    assert other_key.status_code == 403
    assert "Policy Condition failed" in other_key.text
    assert not _exists(client, bucket, "uploads/someone-else.jsonl")

    other_bucket = f"b-{uuid.uuid4().hex[:12]}"
    client.make_bucket(other_bucket)
    assert _post(server, other_bucket, fields, b"x").status_code == 403

    extra_field = _post(server, bucket, {**fields, "Content-Type": "text/html"}, b"x")
    assert extra_field.status_code == 403
    assert "Extra input fields" in extra_field.text

    assert _post(server, bucket, {**fields, "x-amz-signature": "0" * 64}, b"x").status_code == 403
    forged = json.dumps({"expiration": "2099-01-01T00:00:00.000Z", "conditions": [["starts-with", "$key", ""]]})
    forged_fields = {**fields, "policy": base64.b64encode(forged.encode()).decode()}
    forged_answer = _post(server, bucket, forged_fields, b"x")
    assert forged_answer.status_code == 403
    assert _code(forged_answer) == "SignatureDoesNotMatch"

    empty = _post(server, bucket, fields, b"")
    assert empty.status_code == 400
    assert _code(empty) == "EntityTooSmall"

    expired = _form(client, _policy(bucket, key, MiB, expires=timedelta(seconds=-1)), key)
    assert "expired" in _post(server, bucket, expired, b"x").text
    assert not _exists(client, bucket, key)

    server_keys = server[1:]
    stranger = _client(server[0], "minioadmin", "minioadmin")
    assert server_keys != ("minioadmin", "minioadmin")
    unknown_key = _post(server, bucket, _form(stranger, _policy(bucket, key, MiB), key), b"x")
    assert unknown_key.status_code == 403
    assert _code(unknown_key) == "InvalidAccessKeyId"


def test_a_policy_with_an_unknown_condition_is_refused(server, client, bucket):
    key = f"uploads/{uuid.uuid4().hex}.jsonl"
    policy = _policy(bucket, key, MiB)
    policy.add_equals_condition("acl", "public-read")
    response = _post(server, bucket, {**_form(client, policy, key), "acl": "public-read"}, b"x")
    assert response.status_code in (400, 403)
    assert "acl" in response.text
    assert not _exists(client, bucket, key)


def test_a_starts_with_key_condition(server, client, bucket):
    policy = PostPolicy(bucket, datetime.now(UTC) + timedelta(minutes=5))
    policy.add_starts_with_condition("key", "uploads/alice/")
    policy.add_content_length_range_condition(1, 100)
    signed = client.presigned_post_policy(policy)
    assert _post(server, bucket, {"key": "uploads/alice/1.jsonl", **signed}, b"1").status_code == 204
    assert _post(server, bucket, {"key": "uploads/bob/1.jsonl", **signed}, b"1").status_code == 403


# -- the jobs' uploads, through serve_app.jobs.objects ------------------------------------------------------


def test_job_upload_forms_bound_the_size(server, client):
    endpoint, access_key, secret_key = server
    settings = Settings(
        s3_endpoint=endpoint,
        s3_access_key=access_key,
        s3_secret_key=secret_key,
        job_bucket=f"jobs-{uuid.uuid4().hex[:8]}",
        job_max_input_bytes=MiB,
    )
    objects = JobObjects(settings)
    form = objects.new_upload("alice")
    assert form.url == f"{endpoint}/{settings.job_bucket}"
    assert form.fields["key"] == form.ref.key
    assert form.ref.key.startswith("uploads/alice/")
    assert form.max_bytes == MiB
    body = b'"first"\n{"text": "second"}\n'
    response = httpx.post(form.url, data=form.fields, files={"file": ("texts.jsonl", body, UPLOAD_CONTENT_TYPE)})
    assert response.status_code == 204, response.text
    assert objects.check_input(form.ref) == len(body)
    assert client.stat_object(form.ref.bucket, form.ref.key).content_type == UPLOAD_CONTENT_TYPE
    assert list(objects.read_lines(form.ref, 100)) == [b'"first"', b'{"text": "second"}']

    second = objects.new_upload("alice")
    too_big = httpx.post(second.url, data=second.fields, files={"file": ("t.jsonl", b"x" * (MiB + 1))})
    assert too_big.status_code == 400
    with pytest.raises(Exception, match="does not exist"):
        objects.check_input(second.ref)
    # A form is for its own key only: another user's key is refused.
    bobs = objects.upload_ref("bob", uuid.uuid4().hex)
    stolen = httpx.post(second.url, data={**second.fields, "key": bobs.key}, files={"file": ("t.jsonl", b"x")})
    assert stolen.status_code == 403
    assert not _exists(client, bobs.bucket, bobs.key)
    assert isinstance(second.ref, ObjectRef)
