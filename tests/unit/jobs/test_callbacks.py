"""serve_app/jobs/callbacks.py: concurrent callback delivery with global, per-destination and per-tenant
bounds, against an in-memory store and a receiver that can be made to hang."""

import asyncio
import copy
import time

from serve_app.errors import NotFoundError
from serve_app.jobs.callbacks import CallbackDispatcher, SecretCache
from serve_app.outbound import CALLBACK_ID_HEADER, SIGNATURE_HEADER, Delivery, destination, verify_signature
from serve_app.settings import Settings


class FakeStore:
    """The JobStore's callback methods over a dict, with MongoDB's semantics ($nin matches a missing field)."""

    def __init__(self) -> None:
        self.docs: dict[str, dict] = {}
        self.claims = 0
        self.released: list[tuple[str, str | None]] = []

    def add(self, job_id: str, owner: str, url: str, *, legacy: bool = False) -> None:
        callback = {"url": url, "status": "pending", "attempts": 0, "next": time.monotonic()}
        if not legacy:
            callback["destination"] = destination(url)
        self.docs[job_id] = {
            "_id": job_id,
            "owner": owner,
            "model": "m",
            "status": "succeeded",
            "input": {"kind": "inline", "count": 1},
            "callback": callback,
        }

    async def claim_due_callback(self, lease_s, *, skip_destinations=(), skip_owners=()):
        self.claims += 1
        now = time.monotonic()
        due = [
            d
            for d in self.docs.values()
            if d["callback"]["status"] == "pending"
            and d["callback"]["next"] <= now
            and d["callback"].get("destination") not in skip_destinations
            and d["owner"] not in skip_owners
        ]
        if not due:
            return None
        doc = min(due, key=lambda d: d["callback"]["next"])
        doc["callback"]["next"] = now + lease_s
        return copy.deepcopy(doc)

    async def release_callback(self, job_id, *, delay_s, destination=None):
        self.released.append((job_id, destination))
        callback = self.docs[job_id]["callback"]
        callback["next"] = time.monotonic() + delay_s
        if destination is not None:
            callback["destination"] = destination

    async def record_callback(self, job_id, *, delivered, error, retry_in_s):
        callback = self.docs[job_id]["callback"]
        callback["attempts"] += 1
        callback["last_error"] = error
        if delivered:
            callback["status"] = "delivered"
        elif retry_in_s is None:
            callback["status"] = "failed"
        else:
            callback["next"] = time.monotonic() + retry_in_s

    def status(self, job_id: str) -> str:
        return self.docs[job_id]["callback"]["status"]


class FakeOutbound:
    """A receiver per URL: 'hang' never answers until released, 'fail' answers 500, the rest 200."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.in_flight: set[str] = set()
        self.most_in_flight = 0
        self.seen: list[tuple[str, bytes, dict]] = []

    async def post(self, url: str, body: bytes, headers: dict) -> Delivery:
        job_id = headers[CALLBACK_ID_HEADER]
        self.seen.append((url, body, headers))
        self.in_flight.add(job_id)
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        try:
            if "hang" in url:
                await self.release.wait()
            if "fail" in url:
                return Delivery(False, "HTTP 500 from receiver", 500)
            return Delivery(True, None, 200)
        finally:
            self.in_flight.discard(job_id)


async def _secret(owner: str) -> str | None:
    if owner == "gone":
        raise NotFoundError("no user 'gone'")
    return None if owner == "secretless" else f"whsec_{owner}"


def settings(**overrides) -> Settings:
    values = {
        "callback_concurrency": 32,
        "callback_per_destination": 4,
        "callback_per_tenant": 8,
        "callback_timeout_s": 10.0,
        "callback_retry_delay_s": 0.01,
        "callback_max_attempts": 3,
    }
    return Settings(**{**values, **overrides})


async def until(condition, timeout_s: float = 3.0) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


class Running:
    def __init__(self, store: FakeStore, outbound: FakeOutbound, **overrides) -> None:
        self.dispatcher = CallbackDispatcher(settings(**overrides), store, SecretCache(_secret), outbound, poll_s=0.05)

    async def __aenter__(self) -> CallbackDispatcher:
        self.task = asyncio.get_running_loop().create_task(self.dispatcher.run())
        return self.dispatcher

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await self.dispatcher.close()


def test_a_hanging_receiver_holds_its_own_slots_only_and_another_tenant_is_delivered_at_once():
    async def scenario():
        store, outbound = FakeStore(), FakeOutbound()
        for i in range(6):
            store.add(f"a{i}", "tenant-a", f"http://hang.test/a{i}")
        async with Running(store, outbound):
            await until(lambda: len(outbound.in_flight) == 4)
            await asyncio.sleep(0.2)
            assert len(outbound.in_flight) == 4, "at most 4 to one destination"
            assert {d["_id"] for d in store.docs.values() if d["callback"]["next"] > time.monotonic() + 5} == {
                "a0",
                "a1",
                "a2",
                "a3",
            }, "the two waiting are not claimed (no lease holds them back)"
            store.add("b0", "tenant-b", "http://ok.test/b0")
            waited = await until(lambda: store.status("b0") == "delivered")
            assert waited < 0.5
            _, body, headers = next(s for s in outbound.seen if s[2][CALLBACK_ID_HEADER] == "b0")
            assert verify_signature("whsec_tenant-b", headers[SIGNATURE_HEADER], body)
            assert not verify_signature("whsec_tenant-a", headers[SIGNATURE_HEADER], body)
            outbound.release.set()
            await until(lambda: all(store.status(j) == "delivered" for j in store.docs))
        assert all(d["callback"]["attempts"] == 1 for d in store.docs.values())

    asyncio.run(scenario())


def test_one_tenant_holds_at_most_its_bound_whatever_its_destinations():
    async def scenario():
        store, outbound = FakeStore(), FakeOutbound()
        for i in range(12):
            store.add(f"a{i}", "tenant-a", f"http://hang{i}.test/")
        async with Running(store, outbound):
            await until(lambda: len(outbound.in_flight) == 8)
            await asyncio.sleep(0.2)
            assert len(outbound.in_flight) == 8
            store.add("c0", "tenant-c", "http://hang-c.test/")
            await until(lambda: "c0" in outbound.in_flight)
            outbound.release.set()
            await until(lambda: all(store.status(j) == "delivered" for j in store.docs))

    asyncio.run(scenario())


def test_the_global_bound_holds_and_the_loop_does_not_spin_while_full_or_idle():
    async def scenario():
        store, outbound = FakeStore(), FakeOutbound()
        for i in range(6):
            store.add(f"t{i}", f"tenant-{i}", f"http://hang{i}.test/")
        async with Running(store, outbound, callback_concurrency=3):
            await until(lambda: len(outbound.in_flight) == 3)
            claims = store.claims
            await asyncio.sleep(0.5)
            assert outbound.most_in_flight == 3
            assert store.claims == claims, "a full replica does not claim"
            outbound.release.set()
            await until(lambda: all(store.status(j) == "delivered" for j in store.docs))
            claims = store.claims
            await asyncio.sleep(0.5)
            assert store.claims - claims <= 12, "an idle loop polls every poll_s, no faster"

    asyncio.run(scenario())


def test_a_callback_stored_without_its_destination_is_given_back_when_that_destination_is_full():
    async def scenario():
        store, outbound = FakeStore(), FakeOutbound()
        for i in range(4):
            store.add(f"a{i}", "tenant-a", "http://hang.test/")
        store.add("old", "tenant-b", "http://hang.test/old", legacy=True)
        async with Running(store, outbound):
            await until(lambda: ("old", "hang.test:80") in store.released)
            await asyncio.sleep(0.3)
            assert store.released.count(("old", "hang.test:80")) == 1, "skipped by the query from then on"
            assert "old" not in outbound.in_flight
            outbound.release.set()
            await until(lambda: store.status("old") == "delivered")

    asyncio.run(scenario())


def test_failures_are_retried_with_backoff_then_recorded_as_failed():
    async def scenario():
        store, outbound = FakeStore(), FakeOutbound()
        store.add("f0", "tenant-a", "http://fail.test/")
        store.add("g0", "gone", "http://ok.test/")
        store.add("s0", "secretless", "http://ok.test/")
        async with Running(store, outbound):
            await until(lambda: all(store.status(j) == "failed" for j in ("f0", "g0", "s0")))
        failed = store.docs["f0"]["callback"]
        assert (failed["attempts"], failed["last_error"]) == (3, "HTTP 500 from receiver")
        gone = store.docs["g0"]["callback"]
        assert (gone["attempts"], gone["last_error"]) == (1, "refused: the job's owner no longer exists")
        unsigned = store.docs["s0"]["callback"]  # never sent unsigned, never signed with a secret nobody saw
        assert unsigned["attempts"] == 1
        assert unsigned["last_error"].startswith("refused: the tenant has no callback secret")
        assert [h[CALLBACK_ID_HEADER] for _, _, h in outbound.seen] == ["f0"] * 3
        attempts = [h["X-Callback-Attempt"] for _, _, h in outbound.seen]
        assert attempts == ["1", "2", "3"]

    asyncio.run(scenario())


def test_secrets_are_cached_briefly():
    async def scenario():
        calls = []

        async def fetch(owner):
            calls.append(owner)
            return f"whsec_{len(calls)}"

        cache = SecretCache(fetch, ttl_s=0.2)
        assert await cache.get("a") == "whsec_1"
        assert await cache.get("a") == "whsec_1"
        await asyncio.sleep(0.25)
        assert await cache.get("a") == "whsec_2"

    asyncio.run(scenario())
