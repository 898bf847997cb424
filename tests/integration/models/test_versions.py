"""Versions of a pinned model without downtime: promote and rollback under load, and a canary split,
all through `python -m cluster models`."""

import collections
import subprocess
import sys
import time
import uuid

import pytest

from cluster import local
from cluster.seed import push_model
from serve_app.settings import REPO_ROOT
from tests.integration.cluster.test_live_config import MODEL, Traffic, perturbed_copy, wait_for_version
from tests.integration.test_e2e import wait_for_history


def models(*argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "cluster", "models", *argv], capture_output=True, text=True, cwd=REPO_ROOT, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def second_version(settings, tmp_path_factory):
    version = f"test-{uuid.uuid4().hex[:8]}"
    push_model(settings, perturbed_copy(tmp_path_factory.mktemp("v2") / "model"), MODEL, version)
    yield version
    local.deploy(settings)  # back to cluster/serve_config.yaml, whatever a test left


def test_promote_and_rollback_switch_versions_under_load_with_no_failed_request(
    api, settings, second_version, auth_headers
):
    traffic = Traffic(settings.public_url, auth_headers)
    traffic.start()
    try:
        promoted = models("promote", f"{MODEL}:{second_version}")
        assert f"serves {second_version} (was {settings.default_model_version})" in promoted.stdout
        wait_for_version(api, second_version, timeout_s=30)
        text = f"promoted {uuid.uuid4().hex}"
        assert (
            api.post("/v1/embeddings", json={"model": MODEL, "input": text}).headers["X-Model-Version"]
            == second_version
        )
        rolled = models("rollback", MODEL)
        assert f"serves {settings.default_model_version} again" in rolled.stdout
        wait_for_version(api, settings.default_model_version, timeout_s=30)
        time.sleep(1)
    finally:
        traffic.halt.set()
        traffic.join(60)
    assert len(traffic.statuses) > 10
    assert set(traffic.statuses) == {200}, f"failed during the switch: {collections.Counter(traffic.statuses)}"
    assert {settings.default_model_version, second_version} <= traffic.versions


def test_a_canary_gets_its_percentage_of_requests_and_history_says_which(api, settings, second_version):
    models("canary", f"{MODEL}:{second_version}", "--percent", "10")
    try:
        deadline = time.monotonic() + 30
        while api.get(f"/v1/models/{MODEL}").json().get("canary_version") != second_version:
            assert time.monotonic() < deadline, "the gateway never saw the canary"
            time.sleep(0.5)
        time.sleep(2.5)  # every gateway replica has refreshed what the model serves
        texts = [f"canary {i} {uuid.uuid4().hex[:6]}" for i in range(5)]
        seen: collections.Counter[str] = collections.Counter()
        canary_request = None
        for i in range(1000):
            response = api.post("/v1/embeddings", json={"model": MODEL, "input": texts[i % len(texts)]})
            assert response.status_code == 200, response.text
            version = response.headers["X-Model-Version"]
            seen[version] += 1
            if version == second_version and canary_request is None:
                canary_request = response.headers["X-Request-ID"]
        assert set(seen) == {settings.default_model_version, second_version}
        assert 70 <= seen[second_version] <= 130, seen  # 10% +- 3% of 1,000
        assert wait_for_history(settings, canary_request)["version"] == second_version
    finally:
        models("canary", MODEL, "--off")
    assert api.get(f"/v1/models/{MODEL}").json().get("canary_version") is None


def test_the_backend_switches_live_with_no_failed_request_and_both_compute_the_same(api, settings, auth_headers):
    """`models backend` rebuilds each replica's engine beside the old one; torch and ONNX Runtime give
    sentence-transformers' vectors (the push checked the export; this checks what the replicas serve)."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from cluster.seed import default_model_dir

    reference = SentenceTransformer(str(default_model_dir()), device="cpu")

    def backend() -> str:
        return api.get(f"/v1/models/{MODEL}").json()["backend"]

    assert backend() == "onnx"  # auto, on CPU, for a version `models push` exported
    traffic = Traffic(settings.public_url, auth_headers)
    traffic.start()
    try:
        for wanted in ("torch", "onnx"):
            done = models("backend", MODEL, wanted)
            assert f"backend {wanted}" in done.stdout
            # Every replica applied it; the gateway re-reads what a model serves every model_info_refresh_s.
            deadline = time.monotonic() + settings.model_info_refresh_s + 5
            while backend() != wanted:
                assert time.monotonic() < deadline, f"the gateway still says {backend()}, not {wanted}"
                time.sleep(0.5)
            texts = [f"backend {wanted} {uuid.uuid4().hex[:8]} and a few more words" for _ in range(4)]
            response = api.post("/v1/embeddings", json={"model": MODEL, "input": texts})
            assert response.headers["X-Cache-Hits"] == "0"
            served = np.array([d["embedding"] for d in response.json()["data"]])
            np.testing.assert_allclose(served, reference.encode(texts), atol=1e-5)
    finally:
        traffic.halt.set()
        traffic.join(60)
        models("backend", MODEL, "auto")
    assert len(traffic.statuses) > 10
    assert set(traffic.statuses) == {200}, f"failed during the switch: {collections.Counter(traffic.statuses)}"
