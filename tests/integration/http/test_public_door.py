"""NGINX as the one public door: TLS, redirects, security headers, its own limits, and what stays inside."""

import json
import os
import random
import signal
import socket
import ssl
import string
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import psutil
import pytest

from cluster.processes import wait_until
from cluster.secrets import ray_auth_headers
from cluster.services import Nginx
from tests.integration.helpers import listener_pid

MODEL = "all-minilm-l6-v2"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def handshake(settings, minimum: ssl.TLSVersion, maximum: ssl.TLSVersion) -> str:
    """The TLS version NGINX agrees to within [minimum, maximum]; raises ssl.SSLError if none."""
    context = ssl.create_default_context(cafile=str(settings.tls_ca_file))
    context.set_ciphers("ALL:@SECLEVEL=0")  # let the client offer old versions, so the server decides
    context.minimum_version, context.maximum_version = minimum, maximum
    with (
        socket.create_connection((settings.nginx_host, settings.nginx_tls_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.version() or ""


def test_https_serves_the_api_with_the_local_ca(settings, auth_headers):
    with httpx.Client(verify=str(settings.tls_ca_file), headers=auth_headers, timeout=60) as client:
        response = client.post(f"{settings.https_url}/v1/embeddings", json={"model": MODEL, "input": "over TLS"})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["embedding"]) == 384
    # No HSTS on loopback, where plain HTTP serves too: it would pin every http://localhost port.
    assert "Strict-Transport-Security" not in response.headers


def test_plain_http_to_the_https_port_is_a_json_400(settings):
    response = httpx.get(f"http://{settings.nginx_host}:{settings.nginx_tls_port}/v1/models")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "https_required"


def test_only_tls_1_2_and_1_3_are_spoken(settings):
    assert handshake(settings, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert handshake(settings, ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises(ssl.SSLError):
            handshake(settings, old, old)


def test_security_headers_on_api_answers_and_on_nginx_errors(api, anonymous):
    for response in (api.get("/v1/models"), anonymous.get("/v1/models"), api.get("/-/routes")):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        assert "Strict-Transport-Security" not in response.headers  # plain HTTP: HSTS means nothing here
    docs = anonymous.get("/docs")
    assert docs.status_code == 200
    assert "cdn.jsdelivr.net" in docs.headers["Content-Security-Policy"]


@pytest.mark.parametrize(
    "path",
    ["/-/routes", "/-/healthz", "/api/serve/applications/", "/api/jobs/", "/metrics", "/dashboard/"],
)
def test_serve_internals_the_dashboard_and_metrics_are_not_behind_the_public_door(anonymous, path):
    response = anonymous.get(path)
    assert response.status_code == 404, (path, response.text[:200])
    assert response.headers["Content-Type"].startswith("application/json")


def test_internal_services_listen_on_loopback_only(settings):
    """What a client on the network can reach of the local cluster: NGINX (and on loopback here). In the
    netns layout the stores also listen on the node bridge, which only this machine's nodes reach."""
    ports = {
        settings.nginx_port,
        settings.nginx_tls_port,
        settings.serve_port,
        settings.ray_dashboard_port,
        urlparse(settings.redis_url).port or 6379,
        urlparse(settings.mongo_url).port or 27017,
        urlparse(settings.rabbitmq_url).port or 5672,
        (urlparse(settings.rabbitmq_url).port or 5672) + 20000,
        urlparse(settings.s3_endpoint).port,
    }
    listening: dict[int, set[str]] = {}
    for conn in psutil.net_connections("inet"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port in ports:
            listening.setdefault(conn.laddr.port, set()).add(conn.laddr.ip)
    assert set(listening) == ports, f"not listening: {ports - set(listening)}"
    private = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    if settings.netns_layout:
        private |= {settings.bridge_address, f"::ffff:{settings.bridge_address}"}
    exposed = {port: ips for port, ips in listening.items() if not ips <= private}
    assert not exposed, exposed


@pytest.fixture(scope="module")
def guarded_door(settings, tmp_path_factory):
    """A second NGINX like production's: HTTP redirects to HTTPS, and a tiny per-address limit."""
    door = settings.model_copy(
        update={
            "state_dir": tmp_path_factory.mktemp("door"),
            "nginx_port": free_port(),
            "nginx_tls_port": free_port(),
            "nginx_http_redirect": True,
            "nginx_limit_req_per_s": 1,
            "nginx_limit_req_burst": 2,
        }
    )
    nginx = Nginx("nginx", door)
    assert nginx.ensure() == "started"
    yield door
    nginx.stop()
    assert not nginx.process.running


def test_http_redirects_to_https_where_tls_faces_the_network(guarded_door):
    assert guarded_door.public_url == guarded_door.https_url
    response = httpx.get(f"{guarded_door.http_url}/v1/models?x=1", follow_redirects=False)
    assert response.status_code == 308
    assert response.headers["Location"] == f"https://127.0.0.1:{guarded_door.nginx_tls_port}/v1/models?x=1"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_nginx_limits_each_address_with_a_json_429(guarded_door, auth_headers):
    with httpx.Client(
        base_url=guarded_door.https_url, verify=str(guarded_door.tls_ca_file), headers=auth_headers, timeout=30
    ) as client:
        responses = [client.get("/v1/models") for _ in range(8)]
    codes = [r.status_code for r in responses]
    assert codes[0] == 200, codes
    assert 429 in codes, codes
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.json()["error"]["code"] == "rate_limited"
    assert limited.headers["Retry-After"] == "1"
    assert limited.headers["Strict-Transport-Security"].startswith("max-age=")


def raw_exchange(settings, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are to NGINX's HTTP port; (status, headers, body) of the answer."""
    with socket.create_connection((settings.nginx_host, settings.nginx_port), timeout=10) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def test_an_unsupported_transfer_encoding_is_a_json_400(settings):
    status, headers, body = raw_exchange(
        settings,
        b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n",
    )
    assert status == 400, (status, body[:200])
    assert headers["content-type"].startswith("application/json")
    assert "Transfer-Encoding" in json.loads(body)["error"]["message"]


def serve_replicas(settings, deployment: str) -> list[dict]:
    applications = httpx.get(
        f"{settings.dashboard_url}/api/serve/applications/", headers=ray_auth_headers(settings), timeout=30
    ).json()["applications"]
    return applications[settings.serve_app_name]["deployments"][deployment]["replicas"]


def slow_request(api, request_id: str):
    """An embeddings request of seconds of model work, sent from a thread: (its future, the pool)."""
    words = "".join(random.choices(string.ascii_lowercase + " ", k=8000))
    texts = [f"{i} {uuid.uuid4().hex} {words}" for i in range(256)]
    pool = ThreadPoolExecutor(1)
    future = pool.submit(
        api.post, "/v1/embeddings", json={"model": MODEL, "input": texts}, headers={"X-Request-ID": request_id}
    )
    return future, pool


def upstreams_tried(settings, request_id: str) -> list[str]:
    """The upstream addresses NGINX tried for a request, in order, from its access log."""
    log = settings.state_dir / "nginx" / "logs" / "access.log"
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if f'"request_id":"{request_id}"' in line:
            return [part.strip() for part in json.loads(line)["upstream"].split(",")]
    return []


def back_to_serving(api) -> None:
    assert wait_until(
        lambda: api.post("/v1/embeddings", json={"model": MODEL, "input": "back"}).status_code == 200, 180, 1.0
    ), "the gateway did not come back"


def test_a_request_whose_gateway_replica_dies_is_retried_on_the_backup_proxy_and_answered(settings, api):
    """Direct ingress: NGINX retries the (pure) embeddings request on the head's Serve proxy, its backup,
    which holds it until Serve has replaced the replica: the client gets its answer, not the replica's death."""
    if not settings.serve_direct_ingress:
        pytest.skip("the proxy is the door without direct ingress: test_a_request_nothing_can_answer_... covers it")
    (gateway,) = [r for r in serve_replicas(settings, "Gateway") if r["state"] == "RUNNING"]
    request_id = f"replica-dies-{uuid.uuid4().hex}"
    pending, pool = slow_request(api, request_id)
    try:
        time.sleep(1.5)
        assert not pending.done(), "the request ended before the replica could be stopped"
        os.kill(gateway["pid"], signal.SIGKILL)
        response = pending.result(timeout=120)
    finally:
        pool.shutdown(wait=False)
    try:
        assert response.status_code == 200, response.text[:300]
        assert len(response.json()["data"]) == 256
        assert wait_until(lambda: len(upstreams_tried(settings, request_id)) == 2, 10)
        assert upstreams_tried(settings, request_id)[-1] == f"{settings.serve_host}:{settings.serve_port}"
    finally:  # whatever happened, the next test finds a serving cluster
        back_to_serving(api)


def test_a_request_nothing_can_answer_gets_a_json_error(settings, api):
    """The gateway replica and the Serve proxy behind NGINX killed while a request runs: NGINX's retry finds
    nothing that answers, and NGINX answers in the API's JSON shape (Serve's own would be text/plain)."""
    (gateway,) = [r for r in serve_replicas(settings, "Gateway") if r["state"] == "RUNNING"]
    proxy = listener_pid(settings.serve_port, host=settings.serve_host)
    assert proxy is not None, "no Serve proxy listens"
    pending, pool = slow_request(api, f"nothing-answers-{uuid.uuid4().hex}")
    try:
        time.sleep(1.5)
        assert not pending.done(), "the request ended before the replica could be stopped"
        os.kill(proxy, signal.SIGKILL)
        os.kill(gateway["pid"], signal.SIGKILL)
        response = pending.result(timeout=120)
    finally:
        pool.shutdown(wait=False)
    try:
        assert response.status_code >= 500, response.text[:300]
        assert response.headers["content-type"].startswith("application/json"), response.text[:300]
        assert response.json()["error"]["message"]
    finally:
        back_to_serving(api)
