"""ModelCatalog: which deployment answers a request's `model` (pinned, or the pool with which model id)."""

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from serve_app.embeddings.catalog import ModelCatalog, parse_model, version_state
from serve_app.embeddings.model_client import ModelClient
from serve_app.errors import InvalidRequestError, ModelNotFoundError, ServiceUnavailableError
from serve_app.model_repository import Manifest
from tests.unit.fakes import FakeModelHandle


def manifest(name: str, version: str, task: str = "embed", age_s: int = 0) -> Manifest:
    return Manifest(
        name=name,
        version=version,
        framework="transformers",
        task=task,
        dims=1 if task == "rerank" else 8,
        files=[],
        created=datetime(2026, 1, 1, tzinfo=UTC) - timedelta(seconds=age_s),
    )


class FakeRepository:
    def __init__(self, manifests: list[Manifest]) -> None:
        self.manifests = manifests
        self.calls = 0
        self.name_listings = 0
        self.down = False

    def versions(self, name: str) -> list[Manifest]:
        self.calls += 1
        if self.down:
            raise OSError("connection refused")
        return sorted((m for m in self.manifests if m.name == name), key=lambda m: m.created)

    def names(self) -> list[str]:
        self.name_listings += 1
        return sorted({m.name for m in self.manifests})


class FakePool:
    """A DeploymentHandle to the pool: options(multiplexed_model_id=...) remembers the id."""

    def __init__(self, model_id: str = "") -> None:
        self.model_id = model_id

    def options(self, *, multiplexed_model_id: str) -> "FakePool":
        return FakePool(multiplexed_model_id)


@pytest.fixture
def repository():
    return FakeRepository(
        [
            manifest("fake-model", "1", age_s=100),
            manifest("fake-model", "2"),
            manifest("other", "a", age_s=50),
            manifest("other", "b", age_s=10),
            manifest("ranker", "1", task="rerank"),
        ]
    )


@pytest.fixture
def catalog(repository):
    pinned = {"fake-model": ModelClient("fake-model", FakeModelHandle(), refresh_s=60, timeout_s=5)}
    return ModelCatalog(pinned, FakePool(), repository, refresh_s=60, timeout_s=5, listing_ttl_s=60)


def test_a_pinned_name_and_its_served_version_go_to_its_deployment(catalog):
    asyncio.run(_a_pinned_name_and_its_served_version_go_to_its_deployment(catalog))


async def _a_pinned_name_and_its_served_version_go_to_its_deployment(catalog):
    for spec in ("fake-model", "fake-model:1"):
        resolved = await catalog.resolve(spec, "embed")
        assert resolved.pinned
        assert resolved.client is catalog.pinned["fake-model"]


def test_another_version_of_a_pinned_model_goes_to_the_pool_by_model_id(catalog):
    asyncio.run(_another_version_of_a_pinned_model_goes_to_the_pool_by_model_id(catalog))


async def _another_version_of_a_pinned_model_goes_to_the_pool_by_model_id(catalog):
    resolved = await catalog.resolve("fake-model:2", "embed")
    assert not resolved.pinned
    assert resolved.client.handle.model_id == "fake-model:2"
    assert resolved.client.name == "fake-model"  # cache keys are by name and version, as the pinned one's


def test_an_unpinned_name_means_its_newest_version_and_clients_are_reused(catalog, repository):
    asyncio.run(_an_unpinned_name_means_its_newest_version_and_clients_are_reused(catalog, repository))


async def _an_unpinned_name_means_its_newest_version_and_clients_are_reused(catalog, repository):
    first = await catalog.resolve("other", "embed")
    assert first.client.handle.model_id == "other:b"
    assert (await catalog.resolve("other:a", "embed")).client.handle.model_id == "other:a"
    assert (await catalog.resolve("other", "embed")).client is first.client
    assert repository.calls == 1  # the listing is cached for listing_ttl_s


def test_unknown_models_and_versions_are_404_with_what_exists(catalog):
    asyncio.run(_unknown_models_and_versions_are_404_with_what_exists(catalog))


async def _unknown_models_and_versions_are_404_with_what_exists(catalog):
    with pytest.raises(ModelNotFoundError, match="the repository has no such model"):
        await catalog.resolve("missing", "embed")
    with pytest.raises(ModelNotFoundError, match="has no version '9'; versions: a, b"):
        await catalog.resolve("other:9", "embed")


def test_a_model_of_another_task_is_a_400_that_names_its_route(catalog):
    asyncio.run(_a_model_of_another_task_is_a_400_that_names_its_route(catalog))


async def _a_model_of_another_task_is_a_400_that_names_its_route(catalog):
    with pytest.raises(InvalidRequestError, match="is a rerank model, not an embed model: use POST /v1/rerank"):
        await catalog.resolve("ranker", "embed")
    with pytest.raises(InvalidRequestError, match="use POST /v1/embeddings"):
        await catalog.resolve("other", "rerank")
    assert (await catalog.resolve("ranker", "rerank")).client.handle.model_id == "ranker:1"


@pytest.mark.parametrize("spec", ["a:b:c", "../etc", "name:", "with space", ":1", "x" * 129])
def test_a_malformed_model_is_a_400(spec):
    with pytest.raises(InvalidRequestError, match="NAME or NAME:VERSION"):
        parse_model(spec)


def test_without_a_pool_only_pinned_models_exist(repository):
    asyncio.run(_without_a_pool_only_pinned_models_exist(repository))


async def _without_a_pool_only_pinned_models_exist(repository):
    pinned = {"fake-model": ModelClient("fake-model", FakeModelHandle(), refresh_s=60, timeout_s=5)}
    catalog = ModelCatalog(pinned, None, repository, refresh_s=60, timeout_s=5)
    with pytest.raises(ModelNotFoundError, match="served models: fake-model"):
        await catalog.resolve("other", "embed")
    assert await catalog.listing() == {}


def test_the_repository_down_is_a_503_for_unpinned_models_only(catalog, repository):
    asyncio.run(_the_repository_down_is_a_503_for_unpinned_models_only(catalog, repository))


async def _the_repository_down_is_a_503_for_unpinned_models_only(catalog, repository):
    repository.down = True
    with pytest.raises(ServiceUnavailableError, match="model repository did not answer"):
        await catalog.resolve("other", "embed")
    assert (await catalog.resolve("fake-model", "embed")).pinned


def test_states():
    served, loaded = {"m": "1"}, {"m:2", "x:1"}
    assert [version_state("m", v, served, loaded) for v in ("1", "2", "3")] == ["pinned", "loaded", "available"]
    assert version_state("x", "1", served, loaded) == "loaded"


def test_a_canary_gets_its_share_of_bare_name_requests_only(catalog):
    asyncio.run(_canary_share(catalog))


async def _canary_share(catalog):
    handle = catalog.pinned["fake-model"].handle
    original = handle._info

    def with_canary():
        return replace(original(), canary_version="2", canary_percent=20.0)

    handle._info = with_canary
    catalog._random.seed(1)
    picked = [(await catalog.resolve("fake-model", "embed")).pinned for _ in range(2000)]
    share = picked.count(False) / len(picked)
    assert 0.17 < share < 0.23
    canary = next(r for r in [await catalog.resolve("fake-model", "embed") for _ in range(50)] if not r.pinned)
    assert canary.client.handle.model_id == "fake-model:2"
    assert all([(await catalog.resolve("fake-model:1", "embed")).pinned for _ in range(100)])  # a named version


def test_a_canary_the_repository_lacks_leaves_the_pinned_version_answering(catalog):
    async def run():
        handle = catalog.pinned["fake-model"].handle
        original = handle._info
        handle._info = lambda: replace(original(), canary_version="9", canary_percent=100.0)
        assert all([(await catalog.resolve("fake-model", "embed")).pinned for _ in range(10)])

    asyncio.run(run())


def test_made_up_names_cost_one_listing_not_one_each(catalog, repository):
    async def run():
        for i in range(50):
            with pytest.raises(ModelNotFoundError):
                await catalog.resolve(f"made-up-{i}", "embed")

    asyncio.run(run())
    assert repository.name_listings == 1
    assert repository.calls == 0  # no versions listed for names the repository lacks


def test_an_asked_for_version_is_never_answered_by_another():
    from serve_app.embeddings.service import EmbeddingService
    from tests.unit.fakes import DictCache

    class Pool:
        def options(self, *, multiplexed_model_id: str) -> FakeModelHandle:
            name, _, version = multiplexed_model_id.partition(":")
            return FakeModelHandle(name=name, version=version)

    handle = FakeModelHandle(version="1")
    pinned = {"fake-model": ModelClient("fake-model", handle, refresh_s=60, timeout_s=5)}
    repository = FakeRepository([manifest("fake-model", "1", age_s=10), manifest("fake-model", "2")])
    catalog = ModelCatalog(pinned, Pool(), repository, refresh_s=60, timeout_s=5)
    service = EmbeddingService(pinned, DictCache(), catalog=catalog)

    async def run():
        assert (await service.embed("fake-model:1", ["a"])).version == "1"  # the pinned deployment answers
        handle.version = "2"  # a promote lands; the gateway still believes it serves 1
        asked = await service.embed("fake-model:1", ["b"])
        bare = await service.embed("fake-model", ["c"])
        return asked, bare

    asked, bare = asyncio.run(run())
    assert asked.version == "1"  # from the pool, not the deployment that moved on
    assert bare.version == "2"


def test_the_pools_clients_ask_for_the_catalogs_lane(repository):
    pinned = {"fake-model": ModelClient("fake-model", FakeModelHandle(), refresh_s=60, timeout_s=5, lane="background")}
    catalog = ModelCatalog(pinned, FakePool(), repository, refresh_s=60, timeout_s=5, lane="background")
    resolved = asyncio.run(catalog.resolve("other:a", "embed"))
    assert resolved.client.handle.model_id == "other:a"
    assert resolved.client.lane == "background"
