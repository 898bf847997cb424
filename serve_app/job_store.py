"""Asynchronous jobs in MongoDB (the truth), with their status cached in Redis for fast polling.

Every write to a job goes through this class, which writes MongoDB first and then refreshes the
cached status, so a poll never sees a status older than MongoDB's by more than that one write.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import numpy as np
from bson import Binary, ObjectId
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument

from serve_app.result_cache import GuardedRedis
from serve_app.settings import Settings


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


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


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


class JobStore:
    def __init__(self, client: AsyncMongoClient, settings: Settings, redis: GuardedRedis) -> None:
        db = client[settings.mongo_db]
        self.jobs = db["jobs"]
        self.inputs = db["job_inputs"]
        self.results = db["job_results"]
        self.redis = redis
        self.status_ttl_s = settings.job_status_ttl_s

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

    # -- the status cache -------------------------------------------------------------------

    @staticmethod
    def _status_key(job_id: str) -> str:
        return f"job:{job_id}"

    async def _cache(self, doc: dict | None) -> dict | None:
        if doc is not None:
            view = json.dumps(public_view(doc))
            await self.redis.run(lambda r: r.set(self._status_key(doc["_id"]), view, ex=self.status_ttl_s), None)
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

    async def unpublished(self, older_than_s: float) -> list[str]:
        cutoff = now() - timedelta(seconds=older_than_s)
        cursor = self.jobs.find(
            {"status": JobStatus.QUEUED, "published_at": None, "created_at": {"$lt": cutoff}}, {"_id": 1}
        ).limit(100)
        return [doc["_id"] async for doc in cursor]

    # -- writes -------------------------------------------------------------------------------

    async def create(self, doc: dict, texts: list[str] | None) -> dict:
        if texts is not None:
            await self.inputs.replace_one({"_id": doc["_id"]}, {"_id": doc["_id"], "texts": texts}, upsert=True)
        await self.jobs.insert_one(doc)
        return await self._cache(doc) or doc

    async def mark_published(self, job_id: str) -> None:
        await self.jobs.update_one({"_id": job_id, "published_at": None}, {"$set": {"published_at": now()}})

    async def _update(self, query: dict, update: dict) -> dict | None:
        doc = await self.jobs.find_one_and_update(query, update, return_document=ReturnDocument.AFTER)
        return await self._cache(doc)

    async def request_cancel(self, job_id: str, owner: str) -> dict | None:
        """Cancel a queued job at once; ask a running one to stop at its next chunk."""
        queued = await self._update(
            {"_id": job_id, "owner": owner, "status": JobStatus.QUEUED},
            {"$set": {"cancel_requested": True, **self._terminal(JobStatus.CANCELLED)}},
        )
        if queued:
            return await self._arm_callback(queued)
        running = await self._update(
            {"_id": job_id, "owner": owner, "status": JobStatus.RUNNING}, {"$set": {"cancel_requested": True}}
        )
        return running or await self.jobs.find_one({"_id": job_id, "owner": owner})

    async def claim(self, job_id: str, worker: dict) -> dict | None:
        """Mark a job running for this delivery; None if it is no longer active."""
        doc = await self._update(
            {"_id": job_id, "status": {"$in": list(ACTIVE)}},
            {"$set": {"status": JobStatus.RUNNING, "worker": worker}, "$inc": {"attempts": 1}},
        )
        if doc and doc.get("started_at") is None:
            doc = await self._update({"_id": job_id}, {"$set": {"started_at": now()}})
        return doc

    async def record_progress(self, job_id: str, done: int, total: int) -> None:
        await self._update(
            {"_id": job_id, "status": JobStatus.RUNNING},
            {"$set": {"progress": {"done": done, "total": total}}},
        )

    async def note_error(self, job_id: str, message: str) -> None:
        await self.jobs.update_one({"_id": job_id}, {"$set": {"last_error": message}})

    @staticmethod
    def _terminal(status: JobStatus, **fields: Any) -> dict:
        return {"status": status, "finished_at": now(), **fields}

    async def _arm_callback(self, doc: dict) -> dict:
        """A job that has ended with a callback URL: its callback is now due."""
        if not doc.get("callback"):
            return doc
        armed = await self._update(
            {"_id": doc["_id"], "callback.status": "waiting"},
            {"$set": {"callback.status": "pending", "callback.next_attempt_at": now()}},
        )
        return armed or doc

    async def finish(
        self, job_id: str, status: JobStatus, *, error: dict | None = None, result: dict | None = None
    ) -> dict | None:
        """Move an active job to a terminal status, once; None if it had already ended."""
        fields: dict[str, Any] = {}
        if error is not None:
            fields["error"] = error
        if result is not None:
            fields["result"] = result
        doc = await self._update(
            {"_id": job_id, "status": {"$in": list(ACTIVE)}}, {"$set": self._terminal(status, **fields)}
        )
        return await self._arm_callback(doc) if doc else None

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

    async def claim_due_callback(self, lease_s: float) -> dict | None:
        """Take one job whose callback is due, leasing it so no other worker takes it meanwhile."""
        current = now()
        return await self.jobs.find_one_and_update(
            {"callback.status": "pending", "callback.next_attempt_at": {"$lte": current}},
            {"$set": {"callback.next_attempt_at": current + timedelta(seconds=lease_s)}},
            return_document=ReturnDocument.AFTER,
        )

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
