"""The Open Inference Protocol through NGINX, spoken by Triton's own client (tritonclient.http), unchanged."""

import uuid

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.integration.models.test_on_demand import QUERY, models, reference_embeddings, reference_scores  # noqa: F401


@pytest.fixture
def headers(auth_headers) -> dict[str, str]:
    """A copy per test: tritonclient writes Inference-Header-Content-Length into the dict it is given,
    so a dict shared across calls would carry one binary request's header into the next."""
    return dict(auth_headers)


@pytest.fixture(scope="module")
def client(settings):
    url = settings.public_url.split("://", 1)[1]
    with triton.InferenceServerClient(url=url, network_timeout=120.0, connection_timeout=30.0) as client:
        yield client


def texts_tensor(name: str, texts: list[str], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary_data=binary)
    return tensor


def test_server_and_model_metadata_and_health(client, headers, settings, models):  # noqa: F811
    names, _ = models
    assert client.is_server_live(headers=dict(headers))
    assert client.is_server_ready(headers=dict(headers))
    assert client.get_server_metadata(headers=dict(headers))["extensions"] == ["binary_tensor_data"]
    pinned = client.get_model_metadata(settings.default_model, headers=dict(headers))
    assert pinned["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert settings.default_model_version in pinned["versions"]
    ranker = client.get_model_metadata(names["rerank"], "1", headers=dict(headers))
    assert [i["name"] for i in ranker["inputs"]] == ["query", "documents"]
    assert client.is_model_ready(names["embed"], headers=dict(headers))
    assert not client.is_model_ready(f"itest-missing-{uuid.uuid4().hex[:6]}", headers=dict(headers))


@pytest.mark.parametrize("binary", [True, False])
def test_embeddings_through_tritonclient_equal_transformers(client, headers, models, binary):  # noqa: F811
    names, dirs = models
    texts = [f"triton {uuid.uuid4().hex[:6]}", "second text", "ünïcode 文本"]
    result = client.infer(
        names["embed"],
        [texts_tensor("text", texts, binary)],
        model_version="1",
        outputs=[triton.InferRequestedOutput("embedding", binary_data=binary)],
        headers=dict(headers),
    )
    vectors = result.as_numpy("embedding")
    assert vectors.shape == (3, 128)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, reference_embeddings(dirs["embed:1"], texts), atol=1e-4)
    assert result.get_response()["model_version"] == "1"


def test_rerank_through_tritonclient_equals_transformers(client, headers, models):  # noqa: F811
    names, dirs = models
    documents = ["Pandas eat bamboo.", f"Unrelated {uuid.uuid4().hex[:6]}", "Bears and pandas."]
    result = client.infer(
        names["rerank"],
        [texts_tensor("query", [QUERY]), texts_tensor("documents", documents)],
        headers=dict(headers),
    )
    scores = result.as_numpy("scores")
    np.testing.assert_allclose(scores, reference_scores(dirs["rerank:1"], QUERY, documents), atol=1e-4)


def test_errors_come_back_in_the_protocol_shape(client, headers, anonymous, models):  # noqa: F811
    names, _ = models
    with pytest.raises(InferenceServerException, match="does not exist"):
        client.infer(f"itest-missing-{uuid.uuid4().hex[:6]}", [texts_tensor("text", ["a"])], headers=dict(headers))
    with pytest.raises(InferenceServerException, match='takes the inputs "query" and "documents"'):
        client.infer(names["rerank"], [texts_tensor("text", ["a"])], headers=dict(headers))
    assert not client.is_server_live()  # no credential: a 401
    refused = anonymous.get("/v2/health/live")
    assert refused.status_code == 401
    assert isinstance(refused.json()["error"], str)
