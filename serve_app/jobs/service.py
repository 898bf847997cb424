"""Jobs from the gateway's side: accept (MongoDB first, then a confirmed publish), list, cancel, fetch results.

Every method takes plain values and returns a job as its public view (the JSON clients see), so
routes never touch the store or the object store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np

from serve_app.auth.credentials import Principal
from serve_app.auth.key_store import KeyStore
from serve_app.embeddings.service import EmbeddingService
from serve_app.errors import (
    ConflictError,
    InvalidFieldError,
    InvalidRequestError,
    JobNotFoundError,
    JobStateError,
    RateLimitError,
    ServiceUnavailableError,
)
from serve_app.infra.clients import Clients
from serve_app.jobs.objects import InputError, JobObjects, ObjectRef, UploadForm
from serve_app.jobs.queue import JobPublisher, PublishError
from serve_app.jobs.quota import JobQuota
from serve_app.jobs.store import TERMINAL, JobStatus, JobStore, new_job_id, now, public_view
from serve_app.outbound import Outbound, Refused
from serve_app.settings import Settings

logger = logging.getLogger(__name__)

QUOTA_RECONCILE_GRACE_S = 60.0


@dataclass(frozen=True)
class JobInput:
    """Where a job's texts come from: exactly one of them."""

    texts: list[str] | None = None
    input_url: str | None = None
    upload_id: str | None = None
    query: str | None = None  # a rerank job: the texts are documents, scored against this query


@dataclass(frozen=True)
class Submission:
    """What a submission gives back: the job's view; the tenant's callback secret when this submission
    made it; whether the job was made by an earlier request with the same Idempotency-Key."""

    job: dict
    callback_secret: str | None = None
    replayed: bool = False


@dataclass(frozen=True)
class JobResult:
    """A succeeded job's result: inline (vectors) when small, else an object to download (url)."""

    job_id: str
    model: str
    version: str
    count: int
    vectors: np.ndarray | None = None  # (count, dims); a rerank job's: (count, 1), the scores
    token_counts: list[int] | None = None
    task: str = "embed"
    url: str | None = None
    bytes: int | None = None
    expires_in_s: int | None = None


class JobService:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        publisher: JobPublisher,
        objects: JobObjects,
        embeddings: EmbeddingService,
        keys: KeyStore,
        outbound: Outbound | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.quota: JobQuota = store.quota
        self.publisher = publisher
        self.objects = objects
        self.embeddings = embeddings
        self.keys = keys
        self.outbound = outbound or Outbound.from_settings(settings)

    @classmethod
    def from_settings(
        cls, settings: Settings, clients: Clients, embeddings: EmbeddingService, keys: KeyStore
    ) -> JobService:
        store = JobStore(clients.db, settings, clients.redis)
        return cls(settings, store, JobPublisher(settings), JobObjects(settings), embeddings, keys)

    async def close(self) -> None:
        await asyncio.to_thread(self.publisher.close)
        await self.outbound.aclose()

    # -- uploads and callback secrets ----------------------------------------------------------

    async def new_upload(self, owner: str) -> UploadForm:
        """A signed POST form for one input file of this owner's."""
        return await asyncio.to_thread(self.objects.new_upload, owner)

    async def rotate_callback_secret(self, owner: str) -> dict:
        """A new secret signing the owner's callbacks: {"value", "created_at"}, shown only now."""
        return await self.keys.rotate_callback_secret(owner)

    # -- submission ------------------------------------------------------------------------------

    async def check_callback_url(self, url: str) -> str:
        """Refuse (422) a callback URL whose host resolves to an address callbacks may not go to.

        Returns its destination (host:port). The worker checks it again at each delivery.
        """
        try:
            target = await self.outbound.check(url)
        except Refused as exc:
            if exc.transient:
                raise ServiceUnavailableError(f"callback_url: {exc.reason}; try again shortly") from exc
            raise InvalidFieldError(exc.reason, param="callback_url") from exc
        return target.destination

    async def submit(
        self,
        caller: Principal,
        model: str,
        source: JobInput,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
        request_id: str | None = None,
    ) -> Submission:
        """The job once it is stored and its message confirmed by RabbitMQ.

        With an idempotency key, the tenant's first request with that key (within a day) makes the
        job; a later one with the same key and the same request gets that job back, and one with
        the same key and another request is refused (422).
        """
        if idempotency_key is None:
            return await self._submit(caller, model, source, callback_url, request_id=request_id)
        fingerprint = _fingerprint(model, source, callback_url)
        job_id = new_job_id()
        claimed = await self.store.claim_idempotency_key(caller.owner, idempotency_key, job_id, fingerprint)
        if claimed is not None:
            return await self._replay(caller.owner, idempotency_key, claimed, fingerprint)
        try:
            return await self._submit(caller, model, source, callback_url, job_id=job_id, request_id=request_id)
        except BaseException:
            await asyncio.shield(self._release_unless_accepted(caller.owner, idempotency_key, job_id))
            raise

    async def _release_unless_accepted(self, owner: str, key: str, job_id: str) -> None:
        """Free the key of a submission that failed, unless its job was accepted after all.

        A request cancelled (its client left) after the job was stored still has its job: stored
        jobs are published by the sweeper if not by the request, so the key keeps naming it and the
        client's retry gets it back. Only a job never stored, or refused by the queue, frees it.
        """
        with contextlib.suppress(Exception):
            doc = await self.store.get(job_id)
            refused = doc is not None and (doc.get("error") or {}).get("type") == "not_queued"
            if doc is None or refused:
                await self.store.release_idempotency_key(owner, key, job_id)

    async def _replay(self, owner: str, key: str, claimed: dict, fingerprint: str) -> Submission:
        if claimed["fingerprint"] != fingerprint:
            raise InvalidFieldError(
                "this Idempotency-Key was already used for a different request (another model, input or "
                "callback_url); use a new key for a new job",
                param="Idempotency-Key",
                location="header",
            )
        for _ in range(50):  # the first request may still be storing its job: wait a moment for it
            doc = await self.store.get(claimed["job_id"])
            if doc is not None:
                return Submission(public_view(doc), replayed=True)
            await asyncio.sleep(0.1)
        raise ConflictError(f"a request with Idempotency-Key {key!r} is still being accepted; retry shortly")

    async def _submit(
        self,
        caller: Principal,
        model: str,
        source: JobInput,
        callback_url: str | None,
        *,
        job_id: str | None = None,
        request_id: str | None = None,
    ) -> Submission:
        # An unknown model, or one of another task, is refused here, not by a worker.
        await self.embeddings.model(model, "rerank" if source.query is not None else "embed")
        callback = None
        if callback_url:
            callback = {
                "url": callback_url,
                "destination": await self.check_callback_url(callback_url),
                "status": "waiting",
                "attempts": 0,
            }
        texts = source.texts
        if texts is not None:
            stored_input = {"kind": "inline", "count": len(texts)}
        else:
            ref = self._input_ref(source, caller.owner)
            try:
                await asyncio.to_thread(self.objects.check_input, ref)
            except InputError as exc:
                raise InvalidRequestError(str(exc), param="upload_id" if source.upload_id else "input_url") from exc
            stored_input = {"kind": "object", "url": ref.url}
        if source.query is not None:
            stored_input["query"] = source.query
        job_id = job_id or new_job_id()
        await self._admit(caller, job_id)
        doc = {
            "_id": job_id,
            "owner": caller.owner,
            "key_id": caller.key_id,
            "model": model,
            "status": JobStatus.QUEUED,
            "input": stored_input,
            "progress": {"done": 0, "total": len(texts) if texts is not None else None},
            "attempts": 0,
            "cancel_requested": False,
            "created_at": now(),
            "started_at": None,
            "finished_at": None,
            "published_at": None,
            "error": None,
            "result": None,
            "callback": callback,
            "request_id": request_id,  # the submitting request's X-Request-ID: on the job's log lines too
        }
        made_secret = None
        try:
            if callback is not None:  # every callback is signed: a tenant's first one makes its secret
                secret, made = await self.keys.ensure_callback_secret(caller.owner)
                made_secret = secret if made else None
            await self.store.create(doc, texts)
        except BaseException:
            await self.quota.release(caller.key_id, [job_id])
            await self._take_back(caller.owner, made_secret)
            raise
        try:
            await self.publisher.publish(job_id, request_id)
        except PublishError as exc:
            logger.error("job %s not queued: %s", job_id, exc)
            await self._take_back(caller.owner, made_secret)
            await self.store.finish(
                job_id, JobStatus.FAILED, error={"type": "not_queued", "message": f"the job queue refused it: {exc}"}
            )
            raise ServiceUnavailableError(
                "the job queue is unavailable; the job was not accepted", service="rabbitmq"
            ) from exc
        try:
            await self.store.mark_published(job_id)
        except Exception as exc:  # confirmed by RabbitMQ: accepted; the sweeper skips it only sooner
            logger.warning("job %s published but not marked so: %r", job_id, exc)
        return Submission(public_view(doc), made_secret)

    async def _take_back(self, owner: str, made_secret: str | None) -> None:
        """A secret made for a submission that fails is never shown: unmake it, so the next one shows it."""
        if made_secret is not None:
            with contextlib.suppress(Exception):
                await self.keys.forget_callback_secret(owner, made_secret)

    async def _admit(self, caller: Principal, job_id: str) -> None:
        """Count the job against its key's concurrent-job quota, or refuse it with a 429.

        A full quota is checked against MongoDB once: a job whose end Redis missed (it was
        down) is released then, so a lost release never blocks a key for good.
        """
        if await self.quota.admit(caller, job_id) is not False:
            return
        # Only entries older than a grace: a younger one may be a submission still being written.
        counted = await self.quota.active(caller.key_id, older_than_s=QUOTA_RECONCILE_GRACE_S)
        ended = set(counted) - await self.store.active_among(counted)
        if ended:
            await self.quota.release(caller.key_id, sorted(ended))
            if await self.quota.admit(caller, job_id) is not False:
                return
        raise RateLimitError(
            f"key {caller.key_id} already has {caller.max_jobs} jobs queued or running (its limit); "
            "wait for one to end",
            retry_after_s=self.settings.job_quota_retry_after_s,
            code="job_quota_exceeded",
        )

    def _input_ref(self, source: JobInput, owner: str) -> ObjectRef:
        if source.upload_id is not None:
            return self.objects.upload_ref(owner, source.upload_id)
        try:
            ref = ObjectRef.parse(source.input_url or "")
        except InputError as exc:
            raise InvalidRequestError(str(exc), param="input_url") from exc
        mine = f"s3://{self.objects.bucket}/{self.objects.uploads_prefix(owner)}"
        if not ref.url.startswith(mine) or ".." in ref.key.split("/"):
            raise InvalidRequestError(f"jobs read inputs from your own uploads only ({mine}...)", param="input_url")
        return ref

    # -- reads and cancellation -----------------------------------------------------------------

    async def list(
        self, owner: str, *, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[dict], str | None]:
        """A page of the owner's jobs, newest first: (their views, the cursor of the next page or None)."""
        docs = await self.store.list(owner, status=status, limit=limit + 1, before=cursor)
        page = docs[:limit]
        return [public_view(d) for d in page], page[-1]["_id"] if len(docs) > limit else None

    async def get(self, job_id: str, owner: str) -> dict:
        """A job of this owner (its status from the cache when fresh); another owner's job is exactly as
        missing as no job."""
        return await self._owned(job_id, owner, fresh=False)

    async def _owned(self, job_id: str, owner: str, *, fresh: bool) -> dict:
        """fresh: read MongoDB, not the status cache (for answers that refuse on the status)."""
        if fresh:
            doc = await self.store.get(job_id)
            status = public_view(doc) if doc else None
        else:
            status = await self.store.status(job_id)
        if status is None or status.get("owner") != owner:
            raise JobNotFoundError(f"no job {job_id!r}", param="id")
        return status

    async def cancel(self, job_id: str, owner: str) -> dict:
        """Cancel a job: a queued one at once, a running one at its next chunk. Its view after."""
        current = await self._owned(job_id, owner, fresh=True)
        if current["status"] in TERMINAL:
            raise JobStateError(f"job {job_id} has already {current['status']}; there is nothing to cancel")
        doc = await self.store.request_cancel(job_id, owner)
        if doc is None:
            raise JobNotFoundError(f"no job {job_id!r}", param="id")
        return public_view(doc)

    async def result(self, job_id: str, owner: str) -> JobResult:
        """The result of a job that has succeeded; 409 while it has not."""
        status = await self._owned(job_id, owner, fresh=True)
        if status["status"] != JobStatus.SUCCEEDED:
            detail = f": {status['error']['message']}" if status.get("error") else ""
            raise JobStateError(f"job {job_id} is {status['status']}{detail}; a result exists once it has succeeded")
        doc = await self.store.get(job_id)
        if doc is None or not doc.get("result"):
            raise JobNotFoundError(f"job {job_id} has no stored result", param="id")
        stored = doc["result"]
        common = {
            "job_id": job_id,
            "model": doc["model"],
            "version": stored["version"],
            "count": stored["count"],
            "task": stored.get("task", "embed"),
        }
        if stored["kind"] == "object":
            url = await asyncio.to_thread(self.objects.download_url, ObjectRef.parse(stored["url"]))
            return JobResult(**common, url=url, bytes=stored["bytes"], expires_in_s=self.settings.job_presign_expiry_s)
        inline = await self.store.inline_result(job_id)
        if inline is None:
            raise JobNotFoundError(f"job {job_id} has no stored result", param="id")
        vectors, tokens = inline
        return JobResult(**common, vectors=vectors, token_counts=tokens)


def _fingerprint(model: str, source: JobInput, callback_url: str | None) -> str:
    """What makes two submissions the same request, hashed."""
    request = {
        "model": model,
        "input": source.texts,
        "input_url": source.input_url,
        "upload_id": source.upload_id,
        "query": source.query,
        "callback_url": callback_url,
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
