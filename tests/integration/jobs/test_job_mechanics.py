"""Job delivery mechanics on real RabbitMQ, MongoDB and Redis, on queues of their own (no workers)."""

import asyncio
import itertools
import threading
import time
import uuid
from types import SimpleNamespace

import numpy as np
import pika
import pytest
from pymongo.errors import DuplicateKeyError

from serve_app import metrics
from serve_app.embeddings.service import EmbeddingOutcome
from serve_app.infra.mongo import mongo_client
from serve_app.infra.rabbitmq import connection_parameters
from serve_app.infra.redis import GuardedRedis
from serve_app.jobs.objects import JobObjects
from serve_app.jobs.queue import (
    Disposition,
    JobConsumer,
    JobPublisher,
    declare_topology,
    job_message,
    message_properties,
)
from serve_app.jobs.runner import JobRunner
from serve_app.jobs.store import JobEnded, JobMissing, JobStatus, JobStore, LeaseHeld, new_job_id, now


@pytest.fixture
def queue_settings(settings):
    """Settings naming queues of this test alone, deleted afterwards."""
    own = settings.model_copy(update={"job_queue": f"test-{uuid.uuid4().hex[:8]}", "job_prefetch": 4})
    yield own
    connection = pika.BlockingConnection(connection_parameters(own))
    channel = connection.channel()
    for queue in (own.job_queue, own.job_retry_queue, own.job_dead_letter_queue):
        channel.queue_delete(queue)
    connection.close()


def get_one(settings, queue: str, timeout_s: float = 10.0) -> bytes | None:
    connection = pika.BlockingConnection(connection_parameters(settings))
    try:
        channel = connection.channel()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            if method is not None:
                return body
            time.sleep(0.1)
        return None
    finally:
        connection.close()


def test_published_messages_are_persistent_and_confirmed(queue_settings):
    async def publish():
        publisher = JobPublisher(queue_settings)
        await publisher.publish("job-a")
        publisher.close()

    asyncio.run(publish())
    connection = pika.BlockingConnection(connection_parameters(queue_settings))
    _, properties, body = connection.channel().basic_get(queue_settings.job_queue, auto_ack=True)
    connection.close()
    assert body == job_message("job-a")
    assert properties.delivery_mode == 2
    assert properties.message_id == "job-a"


def test_publishing_to_a_broker_that_is_down_raises(queue_settings):
    from serve_app.jobs.queue import PublishError

    down = queue_settings.model_copy(update={"rabbitmq_url": "amqp://127.0.0.1:9/infer"})

    async def publish():
        publisher = JobPublisher(down)
        try:
            await publisher.publish("job-b")
        finally:
            publisher.close()

    with pytest.raises(PublishError, match="did not take job job-b"):
        asyncio.run(publish())


def test_the_retry_queue_returns_a_message_after_its_delay(queue_settings):
    connection = pika.BlockingConnection(connection_parameters(queue_settings))
    channel = connection.channel()
    declare_topology(channel, queue_settings)
    channel.basic_publish(
        "", queue_settings.job_retry_queue, job_message("later"), message_properties("later", delay_s=0.3)
    )
    assert channel.basic_get(queue_settings.job_queue, auto_ack=True)[2] is None, "not before its delay"
    connection.close()
    assert get_one(queue_settings, queue_settings.job_queue) == job_message("later")


def test_consumer_settles_each_disposition_and_dead_letters_malformed_messages(queue_settings):
    outcomes = {"ack-me": Disposition.ACK, "dead-me": Disposition.DEAD, "retry-me": Disposition.RETRY}
    seen: list[str] = []
    lock = threading.Lock()

    def handle(job_id, settle, request_id):
        with lock:
            seen.append(job_id)
            first_time = seen.count(job_id) == 1
        # A retried job comes back once, and is acknowledged then.
        settle(outcomes[job_id] if first_time else Disposition.ACK, 0.2)

    consumer = JobConsumer(queue_settings, handle)
    consumer.start()
    assert consumer.connected.wait(10)
    connection = pika.BlockingConnection(connection_parameters(queue_settings))
    channel = connection.channel()
    for job_id in outcomes:
        channel.basic_publish("", queue_settings.job_queue, job_message(job_id), message_properties(job_id))
    channel.basic_publish("", queue_settings.job_queue, b"this is not a job", message_properties("x"))
    connection.close()
    deadline = time.monotonic() + 10
    while seen.count("retry-me") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    consumer.stop()
    assert sorted(seen) == ["ack-me", "dead-me", "retry-me", "retry-me"]
    dead = {get_one(queue_settings, queue_settings.job_dead_letter_queue, 2) for _ in range(3)}
    assert dead == {job_message("dead-me"), b"this is not a job", None}


class FakeClient:
    def __init__(self, name: str) -> None:
        self.name = name

    async def info(self):
        return SimpleNamespace(version="1")


class FailingEmbeddings:
    """An embedding service whose model always fails, for the retry path."""

    async def model(self, name, task="embed"):
        return FakeClient(name)

    async def embed(self, model, texts, dimensions=None):
        raise RuntimeError("model replica crashed")


class WorkingEmbeddings(FailingEmbeddings):
    def __init__(self):
        self.calls = 0

    async def embed(self, model, texts, dimensions=None):
        self.calls += 1
        return EmbeddingOutcome(model, "1", np.ones((len(texts), 4), dtype=np.float32), [3] * len(texts), 0)


def _runner_and_job(settings, embeddings, texts=("a", "b", "c")):
    redis = GuardedRedis.from_settings(settings)
    mongo = mongo_client(settings)
    store = JobStore(mongo[settings.mongo_db], settings, redis)
    runner = JobRunner(settings, store, embeddings, JobObjects(settings))
    job_id = new_job_id()
    doc = {
        "_id": job_id,
        "owner": "test",
        "model": "m",
        "status": JobStatus.QUEUED,
        "input": {"kind": "inline", "count": len(texts)},
        "progress": {"done": 0, "total": len(texts)},
        "attempts": 0,
        "cancel_requested": False,
        "created_at": now(),
        "published_at": now(),
        "callback": None,
    }
    return runner, store, doc, (redis, mongo)


def test_a_job_that_keeps_failing_is_retried_with_backoff_then_dead_lettered_and_failed(settings):
    async def scenario():
        runner, store, doc, clients = _runner_and_job(settings, FailingEmbeddings())
        await store.create(doc, ["a", "b", "c"])
        settlements = [await runner.run(doc["_id"]) for _ in range(settings.job_max_attempts)]
        final = await store.get(doc["_id"])
        for client in clients:
            await client.close()
        return settlements, final

    settlements, final = asyncio.run(scenario())
    delays = [s.delay_s for s in settlements[:-1]]
    assert [s.disposition for s in settlements] == [Disposition.RETRY] * (settings.job_max_attempts - 1) + [
        Disposition.DEAD
    ]
    assert delays == [settings.job_retry_delay_s * 2**i for i in range(settings.job_max_attempts - 1)]
    assert final["attempts"] == settings.job_max_attempts
    assert final["status"] == JobStatus.FAILED
    assert final["error"]["type"] == "attempts_exhausted"
    assert "model replica crashed" in final["error"]["message"]


def test_a_redelivered_finished_job_is_not_recomputed(settings):
    async def scenario():
        embeddings = WorkingEmbeddings()
        runner, store, doc, clients = _runner_and_job(settings, embeddings)
        await store.create(doc, ["a", "b", "c"])
        first = await runner.run(doc["_id"])
        done = await store.get(doc["_id"])
        calls = embeddings.calls
        again = await runner.run(doc["_id"])  # the broker delivers the same message again
        after = await store.get(doc["_id"])
        for client in clients:
            await client.close()
        return first, again, done, after, calls, embeddings.calls

    first, again, done, after, calls_before, calls_after = asyncio.run(scenario())
    assert first.disposition == again.disposition == Disposition.ACK
    assert done["status"] == after["status"] == JobStatus.SUCCEEDED
    assert calls_after == calls_before, "the redelivered job was computed again"
    assert after["finished_at"] == done["finished_at"]
    assert after["attempts"] == done["attempts"] == 1


def test_a_delivery_that_finds_a_live_lease_waits_without_counting_an_attempt(settings):
    """A redelivery while the job still runs elsewhere (a broker blip) must not run it twice."""

    async def scenario():
        embeddings = WorkingEmbeddings()
        runner, store, doc, clients = _runner_and_job(settings, embeddings)
        await store.create(doc, ["a", "b", "c"])
        await store.claim(doc["_id"], {"host": "elsewhere"}, "the-other-delivery")
        settlement = await runner.run(doc["_id"])
        job = await store.get(doc["_id"])
        for client in clients:
            await client.close()
        return settlement, job, embeddings.calls

    settlement, job, calls = asyncio.run(scenario())
    assert settlement.disposition == Disposition.RETRY
    assert settings.job_lease_s - 5 < settlement.delay_s <= settings.job_lease_s + 1
    assert job["attempts"] == 1
    assert job["lease"]["owner"] == "the-other-delivery"
    assert calls == 0


def test_a_claim_is_one_update_that_starts_a_job_once_and_says_why_it_refused(settings):
    """The claim sets status, lease, attempt and started_at together; a takeover after the lease
    lapses keeps the first start; a missing or ended job is refused with its own reason."""

    async def scenario():
        _, store, doc, clients = _runner_and_job(settings, WorkingEmbeddings())
        await store.create(doc, ["a", "b", "c"])
        first = await store.claim(doc["_id"], {"host": "one"}, "first-delivery")
        await store.jobs.update_one({"_id": doc["_id"]}, {"$set": {"lease.until": now()}})  # its worker died
        second = await store.claim(doc["_id"], {"host": "two"}, "second-delivery")
        with pytest.raises(LeaseHeld):
            await store.claim(doc["_id"], {"host": "three"}, "third-delivery")
        await store.finish(doc["_id"], JobStatus.SUCCEEDED, lease_owner="second-delivery", result={"kind": "x"})
        with pytest.raises(JobEnded):
            await store.claim(doc["_id"], {"host": "three"}, "third-delivery")
        with pytest.raises(JobMissing):
            await store.claim(new_job_id(), {"host": "three"}, "third-delivery")
        for client in clients:
            await client.close()
        return first, second

    first, second = asyncio.run(scenario())
    assert first["status"] == second["status"] == JobStatus.RUNNING
    assert (first["attempts"], second["attempts"]) == (1, 2)
    assert first["started_at"] is not None
    assert second["started_at"] == first["started_at"], "a takeover is not a new start"
    assert second["lease"]["owner"] == "second-delivery"
    assert second["worker"] == {"host": "two"}


def test_a_job_asked_to_cancel_is_ended_at_its_next_delivery_even_while_another_holds_it(settings):
    """A redelivery of a job whose worker died after a cancel request ends it at once: no claim, no
    attempt counted, no wait for the dead worker's lease."""

    async def scenario():
        embeddings = WorkingEmbeddings()
        runner, store, doc, clients = _runner_and_job(settings, embeddings)
        await store.create(doc, ["a", "b", "c"])
        await store.claim(doc["_id"], {"host": "died"}, "the-dead-delivery")
        await store.request_cancel(doc["_id"], "test")
        settlement = await runner.run(doc["_id"])
        job = await store.get(doc["_id"])
        for client in clients:
            await client.close()
        return settlement, job, embeddings.calls

    settlement, job, calls = asyncio.run(scenario())
    assert settlement.disposition == Disposition.ACK
    assert job["status"] == JobStatus.CANCELLED
    assert job["attempts"] == 1
    assert job["worker"] == {"host": "died"}
    assert calls == 0


def test_each_job_is_counted_once_per_state_whatever_updates_it_after_its_end(settings):
    """ray_jobs_total counts transitions: a callback recorded on an ended job, a cancel asked of a running one, a
    retried attempt and a job that could not be stored count nothing more (the process's own tally)."""

    def tally() -> dict[str, float]:
        return {state: metrics.recorded("jobs", state=state) for state in metrics.JOB_STATES}

    async def scenario():
        runner, store, doc, clients = _runner_and_job(settings, WorkingEmbeddings(), texts=("a",))
        doc["callback"] = {"url": "https://hooks.example.com/done", "status": "waiting", "attempts": 0}
        counts = [tally()]
        await store.create(doc, ["a"])
        counts.append(tally())  # accepted
        with pytest.raises(DuplicateKeyError):
            await store.create(doc, ["a"])  # not stored: not accepted again
        counts.append(tally())
        assert (await runner.run(doc["_id"])).disposition is Disposition.ACK
        counts.append(tally())  # running, succeeded
        await store.record_callback(doc["_id"], delivered=False, error="refused", retry_in_s=1.0)
        await store.record_callback(doc["_id"], delivered=True, error=None, retry_in_s=None)
        await store.request_cancel(doc["_id"], "test")  # ended already: nothing to cancel
        counts.append(tally())
        retried, retried_store, retried_doc, retried_clients = _runner_and_job(settings, FailingEmbeddings())
        await retried_store.create(retried_doc, ["a", "b", "c"])
        assert (await retried.run(retried_doc["_id"])).disposition is Disposition.RETRY
        counts.append(tally())  # accepted, running, retried
        for client in (*clients, *retried_clients):
            await client.close()
        return counts

    counts = asyncio.run(scenario())
    steps = [
        {s: after[s] - before[s] for s in after if after[s] != before[s]}
        for before, after in itertools.pairwise(counts)
    ]
    assert steps == [
        {"accepted": 1},
        {},
        {"running": 1, "succeeded": 1},
        {},
        {"accepted": 1, "running": 1, "retried": 1},
    ]
