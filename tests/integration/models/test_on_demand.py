"""Models the Serve config does not pin, served on demand by the multiplexed pool, and reranking.

Tiny models with random weights are built with transformers, pushed with the CLI, and called
through NGINX; what the cluster answers must equal transformers' own output on the same weights.
"""

import shutil
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

from cluster.seed import default_model_dir
from serve_app.model_repository import ModelRepository
from serve_app.settings import REPO_ROOT
from tests.integration.test_e2e import wait_for_history

TEXTS = ["The giant panda lives in China.", "Bamboo is its food.", "Paris is the capital of France.", "x"]
QUERY = "what do pandas eat?"


def push(directory, name: str, version: str, *options: str) -> subprocess.CompletedProcess:
    pushed = try_push(directory, name, version, *options)
    assert pushed.returncode == 0, pushed.stderr
    return pushed


def try_push(directory, name: str, version: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster",
            "models",
            "push",
            str(directory),
            "--name",
            name,
            "--version",
            version,
            "--no-progress",
            *options,
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )


def tiny(directory, model_class, seed: int, **config):
    source = default_model_dir()
    vocab = len((source / "vocab.txt").read_text().splitlines())
    torch.manual_seed(seed)
    bert = BertConfig(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, **config
    )
    model_class(bert).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def models(settings, tmp_path_factory):
    """An embedding model in two versions and a reranker, pushed under fresh names; deleted after."""
    suffix = uuid.uuid4().hex[:8]
    names = {"embed": f"itest-embed-{suffix}", "rerank": f"itest-rerank-{suffix}", "broken": f"itest-broken-{suffix}"}
    dirs = {
        "embed:1": tiny(tmp_path_factory.mktemp("embed1"), BertModel, seed=1),
        "embed:2": tiny(tmp_path_factory.mktemp("embed2"), BertModel, seed=2),
        "rerank:1": tiny(tmp_path_factory.mktemp("rerank1"), BertForSequenceClassification, seed=3, num_labels=1),
    }
    push(dirs["embed:1"], names["embed"], "1")
    push(dirs["rerank:1"], names["rerank"], "1")
    yield names, dirs
    repository = ModelRepository.from_settings(settings)
    for name in names.values():
        for manifest in repository.versions(name):
            repository.delete(name, manifest.version)


def reference_embeddings(directory, texts: list[str]) -> np.ndarray:
    """Mean pooling over the attention mask: what a plain transformers directory means (no pooling config)."""
    tokenizer = BertTokenizerFast.from_pretrained(directory)
    model = BertModel.from_pretrained(directory).eval()
    with torch.inference_mode():
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def reference_scores(directory, query: str, documents: list[str]) -> np.ndarray:
    tokenizer = BertTokenizerFast.from_pretrained(directory)
    model = BertForSequenceClassification.from_pretrained(directory).eval()
    with torch.inference_mode():
        batch = tokenizer([query] * len(documents), documents, padding=True, truncation=True, return_tensors="pt")
        return torch.sigmoid(model(**batch).logits[:, 0]).numpy()


def embed(api, model: str, texts: list[str]):
    return api.post("/v1/embeddings", json={"model": model, "input": texts})


def test_an_unpinned_model_is_loaded_on_first_use_and_equals_transformers(api, settings, models):
    names, dirs = models
    fresh = [f"{t} {uuid.uuid4().hex[:6]}" for t in TEXTS]
    response = embed(api, names["embed"], fresh)
    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Version"] == "1"
    assert response.headers["X-Cache-Hits"] == "0"
    body = response.json()
    assert body["model"] == names["embed"]
    vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert vectors.shape == (len(fresh), 128)
    np.testing.assert_allclose(vectors, reference_embeddings(dirs["embed:1"], fresh), atol=1e-4)

    again = embed(api, f"{names['embed']}:1", fresh)
    assert again.headers["X-Cache-Hits"] == str(len(fresh))
    np.testing.assert_allclose(np.array([d["embedding"] for d in again.json()["data"]]), vectors, atol=1e-6)
    record = wait_for_history(settings, response.headers["X-Request-ID"])
    assert (record["model"], record["version"]) == (names["embed"], "1")
    manifest = ModelRepository.from_settings(settings).manifest(names["embed"], "1")
    assert "onnx/model.onnx" in {f.path for f in manifest.files}  # so the pool ran it with ONNX Runtime
    assert manifest.onnx_max_difference <= 1e-4


def test_a_new_version_is_what_the_bare_name_means_and_the_old_stays_callable(api, settings, models):
    names, dirs = models
    push(dirs["embed:2"], names["embed"], "2")
    deadline = time.monotonic() + settings_listing_ttl(settings) + 10
    while True:  # a gateway trusts its listing for a few seconds
        probe = embed(api, names["embed"], [f"probe {uuid.uuid4().hex[:6]}"])
        assert probe.status_code == 200, probe.text
        if probe.headers["X-Model-Version"] == "2" or time.monotonic() > deadline:
            break
        time.sleep(1)
    texts = [f"version check {uuid.uuid4().hex[:6]}"]
    newest = embed(api, names["embed"], texts)
    assert newest.headers["X-Model-Version"] == "2"
    np.testing.assert_allclose(
        [d["embedding"] for d in newest.json()["data"]], reference_embeddings(dirs["embed:2"], texts), atol=1e-4
    )
    old = embed(api, f"{names['embed']}:1", texts)
    assert old.headers["X-Model-Version"] == "1"
    assert old.headers["X-Cache-Hits"] == "0"  # the cache is keyed by version: no vector of v2 for v1
    np.testing.assert_allclose(
        [d["embedding"] for d in old.json()["data"]], reference_embeddings(dirs["embed:1"], texts), atol=1e-4
    )
    pinned = embed(api, f"{settings.default_model}:{settings.default_model_version}", texts)
    assert pinned.status_code == 200
    assert pinned.headers["X-Model-Version"] == settings.default_model_version


def pool_holds(settings) -> set[str]:
    """The model ids the pool's replicas say they hold (the hash GET /v1/models reads)."""
    import json

    import redis

    from serve_app.embeddings.contract import LOADED_KEY

    with redis.Redis.from_url(settings.redis_url, socket_timeout=5, **settings.redis_options()) as client:
        return {i for value in client.hgetall(LOADED_KEY).values() for i in json.loads(value)["ids"]}


def test_a_version_that_fails_to_load_is_a_clear_503_remembered_and_evicts_nothing(api, settings, models, tmp_path):
    """Serve's multiplexer evicts before it loads: without loading first, a broken version would cost
    the replica holding both versions of the embedding model one of them."""
    names, dirs = models
    broken = tmp_path / "broken"
    shutil.copytree(dirs["embed:1"], broken)
    (broken / "model.safetensors").write_bytes(b"these are not weights " * 64)
    refused = try_push(broken, names["broken"], "1")  # the ONNX export loads the weights: refused
    assert refused.returncode == 1
    assert "SafetensorError" in refused.stderr
    push(broken, names["broken"], "1", "--no-onnx")  # without it, nothing loads them before a replica does
    good = {f"{names['embed']}:1", f"{names['embed']}:2"}
    assert good <= pool_holds(settings)  # the test before loaded both

    first = embed(api, names["broken"], ["never embedded"])
    assert first.status_code == 503, first.text
    message = first.json()["error"]["message"]
    assert f"{names['broken']}:1 could not be loaded" in message
    again = embed(api, f"{names['broken']}:1", ["never embedded"])
    assert again.status_code == 503
    assert again.json()["error"]["message"] == message  # remembered, not loaded again

    assert good <= pool_holds(settings)
    for version in ("1", "2"):
        still = embed(api, f"{names['embed']}:{version}", [f"after the broken one {uuid.uuid4().hex[:6]}"])
        assert still.status_code == 200, still.text


def settings_listing_ttl(settings) -> float:
    from serve_app.settings import get_settings

    return get_settings().model_listing_ttl_s


def test_rerank_ranks_like_transformers_caches_pairs_and_is_recorded(api, settings, models):
    names, dirs = models
    documents = [f"{t} {uuid.uuid4().hex[:6]}" for t in TEXTS]
    response = api.post(
        "/v1/rerank",
        json={"model": names["rerank"], "query": QUERY, "documents": documents, "return_documents": True},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reference_scores(dirs["rerank:1"], QUERY, documents)
    assert [r["index"] for r in body["results"]] == list(np.argsort(-expected, kind="stable"))
    for result in body["results"]:
        assert result["relevance_score"] == pytest.approx(float(expected[result["index"]]), abs=1e-4)
        assert result["document"] == {"text": documents[result["index"]]}
    assert body["model"] == names["rerank"]
    assert body["id"] == response.headers["X-Request-ID"]
    assert body["usage"]["total_tokens"] > 0
    assert response.headers["X-Model-Version"] == "1"

    top = api.post(
        "/v1/rerank",
        json={"model": names["rerank"], "query": QUERY, "documents": [{"text": d} for d in documents[:3]], "top_n": 2},
    )
    assert top.status_code == 200, top.text
    assert top.headers["X-Cache-Hits"] == "3"  # pairs scored by the first request
    assert len(top.json()["results"]) == 2
    assert "document" not in top.json()["results"][0]
    record = wait_for_history(settings, response.headers["X-Request-ID"])
    assert (record["endpoint"], record["model"], record["version"], record["items"]) == (
        "/v1/rerank",
        names["rerank"],
        "1",
        len(documents),
    )


def test_wrong_models_and_bodies_are_clear_4xx(api, models):
    names, _ = models
    missing = embed(api, f"itest-missing-{uuid.uuid4().hex[:6]}", ["a"])
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    no_version = embed(api, f"{names['embed']}:99", ["a"])
    assert no_version.status_code == 404
    assert "has no version '99'" in no_version.json()["error"]["message"]
    wrong_task = embed(api, names["rerank"], ["a"])
    assert wrong_task.status_code == 400
    assert "use POST /v1/rerank" in wrong_task.json()["error"]["message"]
    wrong_route = api.post("/v1/rerank", json={"model": names["embed"], "query": "q", "documents": ["a"]})
    assert wrong_route.status_code == 400
    assert "use POST /v1/embeddings" in wrong_route.json()["error"]["message"]
    empty = api.post("/v1/rerank", json={"model": names["rerank"], "query": "q", "documents": []})
    assert empty.status_code == 422
    assert "documents must hold at least one text" in empty.json()["error"]["message"]
    malformed = embed(api, "a:b:c", ["a"])
    assert malformed.status_code == 400
    assert malformed.json()["error"]["param"] == "model"


def test_models_lists_every_model_with_its_state(api, settings, models):
    names, _ = models
    assert embed(api, names["embed"], ["state check"]).status_code == 200
    listed = {card["id"]: card for card in api.get("/v1/models").json()["data"]}
    assert listed[settings.default_model]["state"] == "pinned"
    assert listed[names["embed"]]["task"] == "embed"
    states = {v["version"]: v["state"] for v in listed[names["embed"]]["versions"]}
    assert states[listed[names["embed"]]["version"]] == "loaded"
    assert listed[names["rerank"]]["task"] == "rerank"
    one = api.get(f"/v1/models/{names['rerank']}")
    assert one.status_code == 200
    assert one.json()["dims"] == 1


def test_admin_lists_shows_and_deletes_versions(api, settings, models, make_key):
    names, dirs = models
    push(dirs["embed:1"], names["embed"], "scratch")
    rows = api.get("/v1/admin/models").json()["data"]
    mine = {(r["name"], r["version"]): r for r in rows}
    assert mine[(settings.default_model, settings.default_model_version)]["state"] == "pinned"
    assert mine[(names["embed"], "scratch")]["state"] == "available"
    shown = api.get(f"/v1/admin/models/{names['embed']}/versions/scratch").json()
    assert {f["path"] for f in shown["files"]} >= {"config.json", "model.safetensors"}
    refused = api.delete(f"/v1/admin/models/{settings.default_model}/versions/{settings.default_model_version}")
    assert refused.status_code == 409
    assert api.delete(f"/v1/admin/models/{names['embed']}/versions/scratch").status_code == 200
    assert api.get(f"/v1/admin/models/{names['embed']}/versions/scratch").status_code == 404
    not_admin = make_key(f"itest-{uuid.uuid4().hex[:6]}", scopes=["infer"])
    assert api.get("/v1/admin/models", headers={"Authorization": f"Bearer {not_admin}"}).status_code == 403


def test_a_rerank_job_scores_every_document_like_transformers(api, models):
    from tests.integration.helpers import wait_for

    names, dirs = models
    documents = [f"document {i} about {'pandas' if i % 2 else 'cities'} {uuid.uuid4().hex[:4]}" for i in range(40)]
    submitted = api.post("/v1/jobs", json={"model": names["rerank"], "query": QUERY, "input": documents})
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["input"]["query"] == QUERY
    finished = wait_for(api, submitted.json()["id"])
    assert finished["status"] == "succeeded", finished["error"]
    result = api.get(finished["result_url"]).json()
    assert result["version"] == "1"
    assert [d["index"] for d in result["data"]] == list(range(len(documents)))
    np.testing.assert_allclose(
        [d["relevance_score"] for d in result["data"]], reference_scores(dirs["rerank:1"], QUERY, documents), atol=1e-4
    )
    wrong = api.post("/v1/jobs", json={"model": names["embed"], "query": QUERY, "input": ["a"]})
    assert wrong.status_code == 400
    assert "is an embed model, not a rerank model" in wrong.json()["error"]["message"]


def test_a_reranker_pinned_by_the_serve_config_gets_its_own_deployment(api, settings, models):
    from cluster import local
    from cluster.services import load_serve_config
    from serve_app.embeddings.contract import pinned_deployment

    names, dirs = models
    config = load_serve_config(settings)
    [app] = config["applications"]
    app["args"]["pinned"] = [names["rerank"]]
    deployment = pinned_deployment(names["rerank"])
    app["deployments"].append(
        {"name": deployment, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}, "user_config": {"version": "1"}}
    )
    local.deploy(settings, config)
    try:
        deadline = time.monotonic() + 180
        states = []
        while True:
            # While the new deployment starts, the listing still answers: the reranker is "unavailable"
            # (or not yet pinned by the gateway replica that answered) until its replica says what it serves.
            listing = api.get("/v1/models")
            assert listing.status_code == 200, listing.text
            cards = {c["id"]: c for c in listing.json()["data"]}
            states.append(cards.get(names["rerank"], {}).get("state"))
            if states[-1] == "pinned":
                break
            assert time.monotonic() < deadline, f"the pinned reranker never became ready: {states}"
            time.sleep(1)
        assert set(states) <= {"available", "loaded", "unavailable", "pinned"}, states
        documents = [f"pinned {i} {uuid.uuid4().hex[:6]}" for i in range(5)]
        response = api.post("/v1/rerank", json={"model": names["rerank"], "query": QUERY, "documents": documents})
        assert response.status_code == 200, response.text
        scores = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
        np.testing.assert_allclose(
            [scores[i] for i in range(len(documents))], reference_scores(dirs["rerank:1"], QUERY, documents), atol=1e-4
        )
        assert cards[names["rerank"]]["device"] == "cpu"  # a replica of its own answered its info
    finally:
        local.deploy(settings)


def test_an_admin_pushes_a_version_over_http_as_an_archive(api, settings, models, make_key, tmp_path):
    import io
    import tarfile

    names, dirs = models
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(dirs["embed:1"], arcname="my-model")  # one folder at the top, as `tar czf` makes it
    url = f"/v1/admin/models/{names['embed']}/versions/http"
    headers = {"Content-Type": "application/gzip"}
    pushed = api.post(url, content=archive.getvalue(), headers=headers)
    assert pushed.status_code == 201, pushed.text
    assert (pushed.json()["version"], pushed.json()["task"], pushed.json()["dims"]) == ("http", "embed", 128)
    texts = [f"pushed over http {uuid.uuid4().hex[:6]}"]
    served = embed(api, f"{names['embed']}:http", texts)
    assert served.status_code == 200, served.text
    np.testing.assert_allclose(
        [d["embedding"] for d in served.json()["data"]], reference_embeddings(dirs["embed:1"], texts), atol=1e-4
    )
    assert api.post(url, content=archive.getvalue(), headers=headers).status_code == 201  # the same files: no change

    not_a_model = io.BytesIO()
    with tarfile.open(fileobj=not_a_model, mode="w:gz") as tar:
        info = tarfile.TarInfo("README.md")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    refused = api.post(
        f"/v1/admin/models/{names['embed']}/versions/bad", content=not_a_model.getvalue(), headers=headers
    )
    assert refused.status_code == 400
    assert "not a transformers model directory: no config.json" in refused.json()["error"]["message"]
    garbage = api.post(f"/v1/admin/models/{names['embed']}/versions/bad", content=b"\x1f\x8b not gzip", headers=headers)
    assert garbage.status_code == 400
    assert garbage.json()["error"]["message"].startswith("not a model archive")
    not_admin = make_key(f"itest-{uuid.uuid4().hex[:6]}", scopes=["infer"])
    forbidden = api.post(url, content=archive.getvalue(), headers={**headers, "Authorization": f"Bearer {not_admin}"})
    assert forbidden.status_code == 403
