"""The benchmark's fused experiment calls the model in-process through a handle-shaped object."""

import asyncio

from loadtests.fused_app import LocalHandle, application_config


class Target:
    def info(self) -> str:
        return "sync"

    async def embed(self, texts: list[str], lane: str = "interactive") -> list[int]:
        await asyncio.sleep(0)
        return [len(t) for t in texts] if lane == "interactive" else []


def test_a_local_handle_awaits_sync_and_async_methods_alike():
    handle = LocalHandle(Target())

    async def calls():
        return await handle.info.remote(), await handle.embed.remote(["ab", "c"], lane="interactive")

    assert asyncio.run(calls()) == ("sync", [2, 1])  # keyword arguments too: ModelClient passes its lane


def test_the_experiment_deploys_beside_the_main_application():
    config = application_config("all-minilm-l6-v2")
    assert config["route_prefix"] == "/fused"
    assert config["deployments"][0]["user_config"]["torch_threads"] == 1
    assert config["deployments"][0]["ray_actor_options"] == {"num_cpus": 0}  # placeable beside the main app
