"""The pool's loads: one per model however many requests want it, before any eviction, failures kept."""

import asyncio

import pytest

from deployments.model_pool import StagedLoads
from serve_app.embeddings.contract import ModelLoadError


class Loader:
    def __init__(self, delay_s: float = 0.02) -> None:
        self.calls: list[str] = []
        self.broken: set[str] = set()
        self.delay_s = delay_s
        self.active = 0
        self.most_active = 0

    async def __call__(self, model_id: str) -> str:
        self.calls.append(model_id)
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        await asyncio.sleep(self.delay_s)
        self.active -= 1
        if model_id in self.broken:
            raise OSError(f"{model_id}: the weights are not safetensors")
        return f"model {model_id}"


def test_requests_for_one_model_share_one_load_and_the_multiplexer_takes_it_once():
    async def scenario():
        loader = Loader()
        loads = StagedLoads(loader)
        await asyncio.gather(*(loads.prepare("m:1") for _ in range(5)))
        return loader.calls, loads.take("m:1"), loads.take("m:1")

    calls, taken, again = asyncio.run(scenario())
    assert calls == ["m:1"]
    assert taken == "model m:1"
    assert again is None  # taken: the multiplexer holds it now


def test_a_failed_load_raises_its_reason_and_is_remembered_until_the_retry_time():
    async def scenario():
        loader = Loader()
        loader.broken.add("m:2")
        loads = StagedLoads(loader, retry_after_s=0.2)
        errors = []
        for _ in range(2):
            with pytest.raises(ModelLoadError) as failed:
                await loads.prepare("m:2")
            errors.append(str(failed.value))
        first_calls = list(loader.calls)
        await asyncio.sleep(0.25)
        loader.broken.clear()  # fixed (pushed again under a new version, say): tried again after the wait
        await loads.prepare("m:2")
        return errors, first_calls, loader.calls, loads.take("m:2")

    errors, first_calls, calls, taken = asyncio.run(scenario())
    # The kind of failure, not its details (paths, endpoints): those go to the replica's log.
    assert errors[0] == errors[1] == "m:2 could not be loaded (OSError); the model pool's log says why"
    assert first_calls == ["m:2"]  # the second request did not load it again
    assert calls == ["m:2", "m:2"]
    assert taken == "model m:2"


def test_a_caller_that_leaves_does_not_cancel_the_load_others_wait_for():
    async def scenario():
        loader = Loader(delay_s=0.1)
        loads = StagedLoads(loader)
        leaving = asyncio.ensure_future(loads.prepare("m:3"))
        staying = asyncio.ensure_future(loads.prepare("m:3"))
        await asyncio.sleep(0.02)
        leaving.cancel()
        await staying
        return loader.calls, loads.take("m:3")

    calls, taken = asyncio.run(scenario())
    assert calls == ["m:3"]
    assert taken == "model m:3"


def test_loads_of_different_models_run_one_at_a_time():
    """As inside the multiplexer's lock: a burst for many versions never holds more than one extra model."""

    async def scenario():
        loader = Loader()
        loads = StagedLoads(loader)
        await asyncio.gather(*(loads.prepare(f"m:{i}") for i in range(4)))
        return loader

    loader = asyncio.run(scenario())
    assert sorted(loader.calls) == ["m:0", "m:1", "m:2", "m:3"]
    assert loader.most_active == 1
