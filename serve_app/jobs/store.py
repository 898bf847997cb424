"""Asynchronous jobs in MongoDB (the truth), with their status cached in Redis for fast polling.

Every write to a job goes through this class, which writes MongoDB first and then refreshes the
cached status, so a poll never sees a status older than MongoDB's by more than that one write.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import numpy as np
from bson import Binary, ObjectId
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from serve_app import metrics
from serve_app.errors import ConflictError
from serve_app.infra.redis import GuardedRedis
from serve_app.jobs.quota import JobQuota
from serve_app.settings import Settings


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
ACTIVE_STATUS_TTL_S = 2

logger = logging.getLogger("ray.serve")  # the replica's log (JSON, with the request id)
IDEMPOTENCY_TTL_S = 24 * 3600  # an Idempotency-Key names its job this long


class NotClaimed(Exception):
    """A delivery could not claim its job; the subclass says why."""


class JobMissing(NotClaimed):
    """No such job: the message names a job MongoDB never had."""


class JobEnded(NotClaimed):
    """The job has already ended (a redelivery, or cancelled while queued)."""


class CancelRequested(NotClaimed):
    """The job was asked to cancel and is not running anywhere now: end it, do no work."""


class LeaseHeld(NotClaimed):
    """Another delivery of this job holds a live lease on it."""

    def __init__(self, remaining_s: float) -> None:
        super().__init__(f"leased for another {remaining_s:.1f}s")
        self.remaining_s = remaining_s


def _ended(doc: dict) -> None:
    """Count and log a job that has just reached its terminal status."""
    status = str(doc["status"])
    started = doc.get("started_at")
    duration_s = (_aware(doc["finished_at"]) - _aware(started)).total_seconds() if started else None
    metrics.job_ended(status, duration_s)
    error = doc.get("error") or {}
    # INFO even when it failed: the runner's warning with the reason is the system event (system_logs).
    logger.info(
        "job %s %s%s%s",
        doc["_id"],
        status,
        f" in {duration_s:.1f}s" if duration_s is not None else "",
        f": {error.get('message')}" if error else "",
        extra={
            "job": doc["_id"],
            "job_event": status,
            "attempts": doc.get("attempts", 0),
            **({"duration_s": round(duration_s, 3)} if duration_s is not None else {}),
            **({"error_type": str(error.get("type"))} if error else {}),
        },
    )


def now() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    """Time-ordered, so newest-first is _id descending."""
    return str(ObjectId())


def public_view(doc: dict) -> dict:
    """What a client sees of a job."""
    progress = doc.get("progress") or {}
    callback = doc.get("callback")
    return {
        "id": doc["_id"],
        "object": "job",
        "model": doc["model"],
        "status": doc["status"],
        "owner": doc.get("owner"),
        "key_id": doc.get("key_id"),
        "input": doc.get("input"),
        "progress": {"done": progress.get("done", 0), "total": progress.get("total")},
        "attempts": doc.get("attempts", 0),
        "cancel_requested": bool(doc.get("cancel_requested")),
        "created_at": _iso(doc.get("created_at")),
        "started_at": _iso(doc.get("started_at")),
        "finished_at": _iso(doc.get("finished_at")),
        "error": doc.get("error"),
        "result_url": f"/v1/jobs/{doc['_id']}/result" if doc["status"] == JobStatus.SUCCEEDED else None,
        "callback": None
        if not callback
        else {
            "url": callback["url"],
            "status": callback.get("status"),
            "attempts": callback.get("attempts", 0),
            "last_error": callback.get("last_error"),
            "delivered_at": _iso(callback.get("delivered_at")),
        },
    }


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


class JobStore:
    def __init__(self, db: AsyncDatabase, settings: Settings, redis: GuardedRedis) -> None:
        self.jobs = db["jobs"]
        self.inputs = db["job_inputs"]
        self.results = db["job_results"]
        self.idempotency = db["job_idempotency_keys"]
        self.redis = redis
        self.quota = JobQuota(redis)
        self.status_ttl_s = settings.job_status_ttl_s
        self.lease_s = settings.job_lease_s

    async def ensure_indexes(self) -> None:
        await self.jobs.create_index([("owner", ASCENDING), ("_id", DESCENDING)], name="owner_newest")
        await self.jobs.create_index(
            [("owner", ASCENDING), ("status", ASCENDING), ("_id", DESCENDING)], name="owner_status_newest"
        )
        await self.jobs.create_index(
            [("status", ASCENDING), ("published_at", ASCENDING), ("created_at", ASCENDING)], name="unpublished"
        )
        await self.jobs.create_index(
            [("callback.status", ASCENDING), ("callback.next_attempt_at", ASCENDING)], name="callbacks_due"
        )
        await self.idempotency.create_index(
            [("created_at", ASCENDING)], name="expire", expireAfterSeconds=IDEMPOTENCY_TTL_S
        )

    # -- the status cache -------------------------------------------------------------------

    @staticmethod
    def _status_key(job_id: str) -> str:
        return f"job:{job_id}"

    async def _cache(self, doc: dict | None) -> dict | None:
        """Cache a job's view; briefly while it is active, so an out-of-order write cannot linger."""
        if doc is not None:
            view = json.dumps(public_view(doc))
            ttl = self.status_ttl_s if doc["status"] in TERMINAL else ACTIVE_STATUS_TTL_S
            await self.redis.run(lambda r: r.set(self._status_key(doc["_id"]), view, ex=ttl), None)
        return doc

    async def status(self, job_id: str) -> dict | None:
        """The public view of a job: from Redis when cached, else from MongoDB."""
        cached = await self.redis.run(lambda r: r.get(self._status_key(job_id)), None)
        if cached is not None:
            return json.loads(cached)
        doc = await self.get(job_id)
        await self._cache(doc)
        return public_view(doc) if doc else None

    # -- reads --------------------------------------------------------------------------------

    async def get(self, job_id: str) -> dict | None:
        return await self.jobs.find_one({"_id": job_id})

    async def list(self, owner: str, *, status: str | None, limit: int, before: str | None) -> list[dict]:
        query: dict[str, Any] = {"owner": owner}
        if status:
            query["status"] = status
        if before:
            query["_id"] = {"$lt": before}
        cursor = self.jobs.find(query).sort("_id", DESCENDING).limit(limit)
        return [doc async for doc in cursor]

    async def inline_texts(self, job_id: str) -> list[str] | None:
        doc = await self.inputs.find_one({"_id": job_id})
        return doc["texts"] if doc else None

    async def cancel_requested(self, job_id: str) -> bool:
        doc = await self.jobs.find_one({"_id": job_id}, {"cancel_requested": 1})
        return bool(doc and doc.get("cancel_requested"))

    async def unpublished(self, older_than_s: float) -> list[tuple[str, str | None]]:
        """(job id, its submitting request's id) of queued jobs never published, older than older_than_s."""
        cutoff = now() - timedelta(seconds=older_than_s)
        cursor = self.jobs.find(
            {"status": JobStatus.QUEUED, "published_at": None, "created_at": {"$lt": cutoff}},
            {"_id": 1, "request_id": 1},
        ).limit(100)
        return [(doc["_id"], doc.get("request_id")) async for doc in cursor]

    # -- writes -------------------------------------------------------------------------------

    async def create(self, doc: dict, texts: list[str] | None) -> dict:
        if texts is not None:
            await self.inputs.replace_one({"_id": doc["_id"]}, {"_id": doc["_id"], "texts": texts}, upsert=True)
        await self.jobs.insert_one(doc)
        metrics.job("accepted")
        logger.info("job %s accepted", doc["_id"], extra={"job": doc["_id"], "job_event": "accepted"})
        return await self._cache(doc) or doc

    async def claim_idempotency_key(self, owner: str, key: str, job_id: str, fingerprint: str) -> dict | None:
        """Take an idempotency key for job_id: None if taken now, else the earlier claim.

        A claim older than IDEMPOTENCY_TTL_S is replaced (MongoDB's TTL monitor deletes them too,
        but only once a minute).
        """
        ident = {"_id": f"{owner}\x00{hashlib.sha256(key.encode()).hexdigest()}"}
        claim = {**ident, "job_id": job_id, "fingerprint": fingerprint, "created_at": now()}
        for _ in range(5):  # each round, exactly one of several racing requests wins
            try:
                await self.idempotency.insert_one(claim)
                return None
            except DuplicateKeyError:
                existing = await self.idempotency.find_one(ident)
            if existing is None:
                continue  # released meanwhile: insert again
            if _aware(existing["created_at"]) >= now() - timedelta(seconds=IDEMPOTENCY_TTL_S):
                return existing
            # Expired but not yet deleted: replace it only as it was, so one racer alone takes it.
            replaced = await self.idempotency.replace_one({**ident, "job_id": existing["job_id"]}, claim)
            if replaced.matched_count:
                return None
        raise ConflictError(f"Idempotency-Key {key!r} is being claimed by several requests at once; retry shortly")

    async def release_idempotency_key(self, owner: str, key: str, job_id: str) -> None:
        """Free a key whose job was not accepted (only if it still names that job)."""
        ident = f"{owner}\x00{hashlib.sha256(key.encode()).hexdigest()}"
        await self.idempotency.delete_one({"_id": ident, "job_id": job_id})

    async def mark_published(self, job_id: str) -> None:
        await self.jobs.update_one({"_id": job_id, "published_at": None}, {"$set": {"published_at": now()}})

    async def _update(self, query: dict, update: dict, *, ends: bool = False) -> dict | None:
        """Update one job and return it as it is now. `ends`: the update moves an active job (the query says so)
        to a terminal status, so a doc that comes back is a job that has just ended: counted and logged once."""
        doc = await self.jobs.find_one_and_update(query, update, return_document=ReturnDocument.AFTER)
        if doc is not None and doc["status"] in TERMINAL:
            await self.quota.release_ended(doc)
            if ends:
                _ended(doc)
        return await self._cache(doc)

    async def active_among(self, job_ids: list[str]) -> set[str]:
        """Which of these jobs are still queued or running."""
        cursor = self.jobs.find({"_id": {"$in": job_ids}, "status": {"$in": list(ACTIVE)}}, {"_id": 1})
        return {doc["_id"] async for doc in cursor}

    async def request_cancel(self, job_id: str, owner: str) -> dict | None:
        """Cancel a queued job at once; ask a running one to stop at its next chunk."""
        queued = await self._update(
            {"_id": job_id, "owner": owner, "status": JobStatus.QUEUED},
            self._terminal(JobStatus.CANCELLED, cancel_requested=True),
            ends=True,
        )
        if queued:
            return queued
        running = await self._update(
            {"_id": job_id, "owner": owner, "status": JobStatus.RUNNING}, {"$set": {"cancel_requested": True}}
        )
        return running or await self.jobs.find_one({"_id": job_id, "owner": owner})

    async def claim(self, job_id: str, worker: dict, lease_owner: str) -> dict:
        """Lease a job to this delivery and count the attempt, in one conditional update.

        A queued job, or a running one whose lease has lapsed (its worker died), is claimed: the
        job as it is now. Otherwise one read says why not: JobMissing, JobEnded, CancelRequested
        (asked to cancel: to be ended, whoever holds it), or LeaseHeld (another delivery is working
        on it, for how long).
        """
        current = now()
        lease = {"owner": lease_owner, "until": current + timedelta(seconds=self.lease_s)}
        doc = await self._update(
            {
                "_id": job_id,
                "cancel_requested": {"$ne": True},
                "$or": [
                    {"status": JobStatus.QUEUED},
                    {"status": JobStatus.RUNNING, "lease.until": {"$not": {"$gt": current}}},
                ],
            },
            [
                {
                    "$set": {
                        "status": JobStatus.RUNNING.value,
                        "worker": {"$literal": worker},
                        "lease": {"$literal": lease},
                        "attempts": {"$add": [{"$ifNull": ["$attempts", 0]}, 1]},
                        "started_at": {"$ifNull": ["$started_at", current]},
                    }
                }
            ],
        )
        if doc is not None:
            metrics.job("running")
            logger.info(
                "job %s running (attempt %d)",
                job_id,
                doc["attempts"],
                extra={"job": job_id, "job_event": "running", "attempt": doc["attempts"]},
            )
            return doc
        existing = await self.jobs.find_one({"_id": job_id}, {"status": 1, "lease": 1, "cancel_requested": 1})
        if existing is None:
            raise JobMissing(job_id)
        if existing["status"] in TERMINAL:
            raise JobEnded(job_id)
        if existing.get("cancel_requested"):
            raise CancelRequested(job_id)
        until = existing.get("lease", {}).get("until")
        raise LeaseHeld(max(0.5, (_aware(until) - now()).total_seconds()) if until else self.lease_s)

    async def record_progress(self, job_id: str, lease_owner: str, done: int, total: int) -> bool:
        """Record progress and renew the lease; False if the lease is no longer ours."""
        doc = await self._update(
            {"_id": job_id, "status": JobStatus.RUNNING, "lease.owner": lease_owner},
            {
                "$set": {
                    "progress": {"done": done, "total": total},
                    "lease.until": now() + timedelta(seconds=self.lease_s),
                }
            },
        )
        if doc is not None:
            logger.info(
                "job %s progress %d/%d",
                job_id,
                done,
                total,
                extra={"job": job_id, "job_event": "progress", "done": done, "total": total},
            )
        return doc is not None

    async def release(self, job_id: str, lease_owner: str, error: str) -> None:
        """Give the lease back after a failed attempt, so the retry can claim at once."""
        await self.jobs.update_one(
            {"_id": job_id, "lease.owner": lease_owner}, {"$set": {"last_error": error, "lease.until": now()}}
        )

    @staticmethod
    def _terminal(status: JobStatus, **fields: Any) -> list[dict]:
        """One update that ends a job and, when it has a callback URL, makes the callback due."""
        ended = now()
        values = {key: {"$literal": value} for key, value in fields.items()}
        return [
            {
                "$set": {
                    "status": status.value,
                    "finished_at": ended,
                    **values,
                    "callback": {
                        "$cond": [
                            {"$eq": [{"$type": "$callback"}, "object"]},
                            {"$mergeObjects": ["$callback", {"status": "pending", "next_attempt_at": ended}]},
                            "$callback",
                        ]
                    },
                }
            }
        ]

    async def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        lease_owner: str | None = None,
        error: dict | None = None,
        result: dict | None = None,
    ) -> dict | None:
        """Move an active job to a terminal status, once; None if it had already ended (or the lease is gone)."""
        fields: dict[str, Any] = {}
        if error is not None:
            fields["error"] = error
        if result is not None:
            fields["result"] = result
        query: dict[str, Any] = {"_id": job_id, "status": {"$in": list(ACTIVE)}}
        if lease_owner is not None:
            query["lease.owner"] = lease_owner
        return await self._update(query, self._terminal(status, **fields), ends=True)

    # -- results ------------------------------------------------------------------------------

    async def save_inline_result(self, job_id: str, version: str, vectors: np.ndarray, tokens: list[int]) -> None:
        """Idempotent by job id: a redelivered job overwrites its own result, never adds one."""
        await self.results.replace_one(
            {"_id": job_id},
            {
                "_id": job_id,
                "version": version,
                "dims": int(vectors.shape[1]),
                "count": int(vectors.shape[0]),
                "vectors": Binary(vectors.astype("<f4", copy=False).tobytes()),
                "token_counts": tokens,
            },
            upsert=True,
        )

    async def inline_result(self, job_id: str) -> tuple[np.ndarray, list[int]] | None:
        doc = await self.results.find_one({"_id": job_id})
        if doc is None:
            return None
        vectors = np.frombuffer(doc["vectors"], dtype="<f4").reshape(doc["count"], doc["dims"])
        return vectors, doc["token_counts"]

    # -- callbacks ----------------------------------------------------------------------------

    async def claim_due_callback(
        self,
        lease_s: float,
        *,
        skip_destinations: list[str] | tuple[str, ...] = (),
        skip_owners: list[str] | tuple[str, ...] = (),
    ) -> dict | None:
        """Take the longest-due callback, leasing it so no other worker takes it meanwhile.

        Callbacks to a destination (host:port) or of an owner in the skip lists (at their bound
        in this worker) are left where they are: due, for this worker later or another now.
        """
        current = now()
        query: dict[str, Any] = {"callback.status": "pending", "callback.next_attempt_at": {"$lte": current}}
        if skip_destinations:
            query["callback.destination"] = {"$nin": list(skip_destinations)}
        if skip_owners:
            query["owner"] = {"$nin": list(skip_owners)}
        return await self.jobs.find_one_and_update(
            query,
            {"$set": {"callback.next_attempt_at": current + timedelta(seconds=lease_s)}},
            sort=[("callback.next_attempt_at", ASCENDING)],
            return_document=ReturnDocument.AFTER,
        )

    async def release_callback(self, job_id: str, *, delay_s: float, destination: str | None = None) -> None:
        """Give back a claimed callback without an attempt: due again after `delay_s`, not after the lease."""
        update: dict[str, Any] = {"callback.next_attempt_at": now() + timedelta(seconds=delay_s)}
        if destination is not None:
            update["callback.destination"] = destination
        await self.jobs.update_one({"_id": job_id, "callback.status": "pending"}, {"$set": update})

    async def record_callback(
        self, job_id: str, *, delivered: bool, error: str | None, retry_in_s: float | None
    ) -> None:
        update: dict[str, Any] = {"callback.last_error": error}
        if delivered:
            update |= {"callback.status": "delivered", "callback.delivered_at": now()}
        elif retry_in_s is None:
            update["callback.status"] = "failed"
        else:
            update["callback.next_attempt_at"] = now() + timedelta(seconds=retry_in_s)
        await self._update({"_id": job_id}, {"$set": update, "$inc": {"callback.attempts": 1}})
