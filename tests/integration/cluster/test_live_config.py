"""Live Serve config changes: a model version switch (user_config) and a second replica, with no failed request."""

import shutil
import threading
import time
import uuid

import httpx
import numpy as np
from safetensors.torch import load_file, save_file

from cluster import local
from cluster.secrets import ray_auth_headers
from cluster.seed import default_model_dir, push_model
from cluster.services import Nginx, load_serve_config
from deployments.encoder import SentenceEncoder

MODEL = "all-minilm-l6-v2"


def perturbed_copy(destination):
    """The default model with one layer changed: weights that exist only in the object store."""
    shutil.copytree(default_model_dir(), destination)
    tensors = load_file(destination / "model.safetensors")
    tensors["encoder.layer.5.output.dense.bias"] = tensors["encoder.layer.5.output.dense.bias"] + 0.25
    save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    return destination


def model_deployment(config: dict) -> dict:
    [model] = [d for d in config["applications"][0]["deployments"] if d["name"] == "EmbeddingModel"]
    return model


def config_with_version(settings, version: str) -> dict:
    config = load_serve_config(settings)
    model_deployment(config)["user_config"]["version"] = version
    return config


def running_model_replicas(settings) -> int:
    applications = httpx.get(
        f"{settings.dashboard_url}/api/serve/applications/", headers=ray_auth_headers(settings), timeout=30
    ).json()["applications"]
    replicas = applications[settings.serve_app_name]["deployments"]["EmbeddingModel"]["replicas"]
    return sum(1 for r in replicas if r["state"] == "RUNNING")


def wait_for_version(api, version: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if api.get(f"/v1/models/{MODEL}").json().get("version") == version:
            return
        time.sleep(0.5)
    raise AssertionError(f"the model did not switch to version {version} within {timeout_s}s")


class Traffic(threading.Thread):
    """Requests with fresh texts, one after another, until stopped; keeps every status."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.base_url = base_url
        self.headers = headers
        self.statuses: list[int] = []
        self.versions: set[str] = set()
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=60, headers=self.headers) as client:
            while not self.halt.is_set():
                response = client.post(
                    "/v1/embeddings", json={"model": MODEL, "input": [f"traffic {uuid.uuid4().hex}"]}
                )
                self.statuses.append(response.status_code)
                self.versions.add(response.headers.get("X-Model-Version", "?"))


def test_switching_version_applies_live_with_no_failed_request(api, settings, tmp_path, auth_headers):
    version = f"test-{uuid.uuid4().hex[:8]}"
    weights = perturbed_copy(tmp_path / "model")
    push_model(settings, weights, MODEL, version)
    text = f"which weights answer this? {uuid.uuid4().hex}"
    expected = SentenceEncoder(weights).encode([text]).vectors[0]

    traffic = Traffic(settings.public_url, auth_headers)
    traffic.start()
    try:
        local.deploy(settings, config_with_version(settings, version))
        wait_for_version(api, version)
        response = api.post("/v1/embeddings", json={"model": MODEL, "input": text})
        assert response.headers["X-Model-Version"] == version
        served = np.array(response.json()["data"][0]["embedding"], dtype=np.float32)
        np.testing.assert_allclose(served, expected, atol=1e-4)
        card = api.get(f"/v1/models/{MODEL}").json()
        assert card["source"] == f"s3://{settings.model_bucket}/{MODEL}/{version}/"
    finally:
        local.deploy(settings)
        wait_for_version(api, settings.default_model_version)
        traffic.halt.set()
        traffic.join(60)
    assert len(traffic.statuses) > 10
    assert set(traffic.statuses) == {200}, f"failed during the switch: {sorted(set(traffic.statuses))}"
    assert {settings.default_model_version, version} <= traffic.versions


def test_nginx_answers_json_when_no_serve_proxy_does(settings, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    isolated = settings.model_copy(
        update={"state_dir": tmp_path, "nginx_port": port, "nginx_tls_port": None, "nginx_upstreams": ["127.0.0.1:9"]}
    )
    nginx = Nginx("nginx", isolated)
    assert nginx.ensure() == "started"
    try:
        response = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"model": MODEL, "input": "x"})
    finally:
        nginx.stop()
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "bad_gateway"
    assert not nginx.process.running


def test_a_second_model_replica_fits_on_two_cores_and_serves(api, settings):
    """Fractional CPUs in the Serve config leave room for the autoscaler's second replica."""
    config = load_serve_config(settings)
    model_deployment(config)["autoscaling_config"]["min_replicas"] = 2
    try:
        local.deploy(settings, config)
        deadline = time.monotonic() + 180
        while running_model_replicas(settings) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert running_model_replicas(settings) == 2
        texts = [f"two replicas {uuid.uuid4().hex}" for _ in range(8)]
        responses = [api.post("/v1/embeddings", json={"model": MODEL, "input": [t]}) for t in texts]
        assert {r.status_code for r in responses} == {200}
    finally:
        local.deploy(settings)
