import asyncio

import numpy as np
import pytest

from serve_app.embeddings.model_client import ModelClient
from serve_app.embeddings.service import EmbeddingService
from serve_app.errors import InvalidRequestError, ModelNotFoundError, ServiceUnavailableError
from tests.unit.fakes import DictCache, FakeModelHandle, fake_vector


def make_service(handle: FakeModelHandle, cache: DictCache) -> EmbeddingService:
    client = ModelClient(handle.name, handle, refresh_s=60, timeout_s=5)
    return EmbeddingService({handle.name: client}, cache)


def run(coro):
    return asyncio.run(coro)


def test_only_unseen_texts_reach_the_model():
    handle, cache = FakeModelHandle(), DictCache()
    service = make_service(handle, cache)
    seen = [f"seen {i}" for i in range(7)]
    run(service.embed(handle.name, seen))
    texts = [*seen, "new a", "new b", "new c"]
    outcome = run(service.embed(handle.name, texts))
    assert outcome.cache_hits == 7
    assert handle.embedded[-1] == ["new a", "new b", "new c"]
    for i, text in enumerate(texts):
        np.testing.assert_allclose(outcome.vectors[i], fake_vector("1" + text, handle.dims))


def test_duplicates_within_a_request_are_computed_once_and_kept_in_order():
    handle, cache = FakeModelHandle(), DictCache()
    outcome = run(make_service(handle, cache).embed(handle.name, ["a", "b", "a"]))
    assert handle.embedded == [["a", "b"]]
    np.testing.assert_array_equal(outcome.vectors[0], outcome.vectors[2])
    assert outcome.token_counts == [3, 3, 3]
    assert outcome.cache_hits == 0


def test_a_version_switch_never_mixes_versions_in_one_answer():
    handle, cache = FakeModelHandle(), DictCache()
    service = make_service(handle, cache)
    run(service.embed(handle.name, ["old"]))
    handle.version = "2"  # the model switched; the gateway still believes version 1
    outcome = run(service.embed(handle.name, ["old", "fresh"]))
    assert outcome.version == "2"
    assert outcome.cache_hits == 0
    np.testing.assert_allclose(outcome.vectors[0], fake_vector("2old", handle.dims))


def test_unknown_model_and_wrong_dimensions_are_client_errors():
    handle = FakeModelHandle()
    service = make_service(handle, DictCache())
    with pytest.raises(ModelNotFoundError, match="served models: fake-model"):
        run(service.embed("other", ["x"]))
    with pytest.raises(InvalidRequestError, match="makes 8"):
        run(service.embed(handle.name, ["x"], dimensions=3))
    assert run(service.embed(handle.name, ["x"], dimensions=8)).vectors.shape == (1, 8)


def test_a_call_whose_replica_died_is_made_once_more_and_only_once():
    handle, cache = FakeModelHandle(), DictCache()
    service = make_service(handle, cache)
    handle.replica_deaths = 1  # its node lost: Serve routes the second call to a replica that lives
    outcome = run(service.embed(handle.name, ["after a node loss"]))
    np.testing.assert_allclose(outcome.vectors[0], fake_vector("1after a node loss", handle.dims))
    assert handle.embedded == [["after a node loss"]]
    handle.replica_deaths = 2
    with pytest.raises(ServiceUnavailableError, match="ActorDiedError"):
        run(service.embed(handle.name, ["two deaths in a row"]))
    assert handle.replica_deaths == 0
    assert handle.embedded == [["after a node loss"]]


def test_a_failing_model_is_service_unavailable():
    handle = FakeModelHandle()
    handle.fail = True
    with pytest.raises(ServiceUnavailableError, match="unavailable"):
        run(make_service(handle, DictCache()).embed(handle.name, ["x"]))


def test_each_model_call_goes_in_its_clients_lane():
    """The job workers' clients ask for the background lane (the pinned replicas run it when no one waits)."""
    handle, cache = FakeModelHandle(), DictCache()
    background = ModelClient(handle.name, handle, refresh_s=60, timeout_s=5, lane="background")
    run(EmbeddingService({handle.name: background}, cache).embed(handle.name, ["a", "b"]))
    run(make_service(handle, cache).embed(handle.name, ["c"]))
    assert handle.lanes == ["background", "interactive"]


def test_the_job_workers_service_asks_for_the_background_lane_and_waits_longer():
    from serve_app.settings import Settings

    settings = Settings(model_timeout_s=60, job_model_timeout_s=600)
    handle = FakeModelHandle()
    jobs = EmbeddingService.from_settings(settings, {handle.name: handle}, redis=None, lane="background")
    people = EmbeddingService.from_settings(settings, {handle.name: handle}, redis=None)
    assert (jobs.models[handle.name].lane, jobs.models[handle.name].timeout_s) == ("background", 600)
    assert (people.models[handle.name].lane, people.models[handle.name].timeout_s) == ("interactive", 60)
