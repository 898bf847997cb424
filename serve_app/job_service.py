"""Jobs from the gateway's side: accept (MongoDB first, then a confirmed publish), cancel, fetch results."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi.exceptions import RequestValidationError

from serve_app.auth import Authenticator, Principal
from serve_app.embedding_service import EmbeddingService
from serve_app.errors import (
    InvalidRequestError,
    JobNotFoundError,
    JobStateError,
    RateLimitError,
    ServiceUnavailableError,
)
from serve_app.job_queue import JobPublisher, PublishError
from serve_app.job_store import TERMINAL, JobStatus, JobStore, new_job_id, now, public_view
from serve_app.object_store import InputError, JobObjects, ObjectRef
from serve_app.outbound import Outbound, Refused
from serve_app.schemas import JobRequest
from serve_app.settings import Settings

logger = logging.getLogger(__name__)

QUOTA_RECONCILE_GRACE_S = 60.0


class JobService:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        publisher: JobPublisher,
        objects: JobObjects,
        embeddings: EmbeddingService,
        auth: Authenticator,
        outbound: Outbound | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.objects = objects
        self.embeddings = embeddings
        self.auth = auth
        self.outbound = outbound or Outbound.from_settings(settings)

    async def check_callback_url(self, url: str) -> str:
        """Refuse (422) a callback URL whose host resolves to an address callbacks may not go to.

        Returns its destination (host:port). The worker checks it again at each delivery.
        """
        try:
            target = await self.outbound.check(url)
        except Refused as exc:
            if exc.transient:
                raise ServiceUnavailableError(f"callback_url: {exc.reason}; try again shortly") from exc
            raise RequestValidationError(
                [{"type": "value_error", "loc": ("body", "callback_url"), "msg": exc.reason, "input": url}]
            ) from exc
        return target.destination

    async def submit(self, request: JobRequest, caller: Principal) -> tuple[dict, str | None]:
        """(the job document once it is stored and its message confirmed by RabbitMQ, the tenant's
        callback secret when this submission made it, else None)."""
        self.embeddings.model(request.model)  # an unknown model is refused here, not by a worker
        callback = None
        if request.callback_url:
            callback = {
                "url": request.callback_url,
                "destination": await self.check_callback_url(request.callback_url),
                "status": "waiting",
                "attempts": 0,
            }
        if request.input is not None:
            source = {"kind": "inline", "count": len(request.input)}
        else:
            ref = self._input_ref(request, caller.owner)
            try:
                await asyncio.to_thread(self.objects.check_input, ref)
            except InputError as exc:
                raise InvalidRequestError(str(exc), param="upload_id" if request.upload_id else "input_url") from exc
            source = {"kind": "object", "url": ref.url}
        job_id = new_job_id()
        await self._admit(caller, job_id)
        doc = {
            "_id": job_id,
            "owner": caller.owner,
            "key_id": caller.key_id,
            "model": request.model,
            "status": JobStatus.QUEUED,
            "input": source,
            "progress": {"done": 0, "total": len(request.input) if request.input is not None else None},
            "attempts": 0,
            "cancel_requested": False,
            "created_at": now(),
            "started_at": None,
            "finished_at": None,
            "published_at": None,
            "error": None,
            "result": None,
            "callback": callback,
        }
        made_secret = None
        try:
            if callback is not None:  # every callback is signed: a tenant's first one makes its secret
                secret, made = await self.auth.keys.ensure_callback_secret(caller.owner)
                made_secret = secret if made else None
            await self.store.create(doc, request.input)
        except BaseException:
            await self.auth.release_jobs(caller.key_id, [job_id])
            await self._take_back(caller.owner, made_secret)
            raise
        try:
            await self.publisher.publish(job_id)
        except PublishError as exc:
            logger.error("job %s not queued: %s", job_id, exc)
            await self._take_back(caller.owner, made_secret)
            await self.store.finish(
                job_id, JobStatus.FAILED, error={"type": "not_queued", "message": f"the job queue refused it: {exc}"}
            )
            raise ServiceUnavailableError("the job queue is unavailable; the job was not accepted") from exc
        try:
            await self.store.mark_published(job_id)
        except Exception as exc:  # confirmed by RabbitMQ: accepted; the sweeper skips it only sooner
            logger.warning("job %s published but not marked so: %r", job_id, exc)
        return doc, made_secret

    async def _take_back(self, owner: str, made_secret: str | None) -> None:
        """A secret made for a submission that fails is never shown: unmake it, so the next one shows it."""
        if made_secret is not None:
            with contextlib.suppress(Exception):
                await self.auth.keys.forget_callback_secret(owner, made_secret)

    async def _admit(self, caller: Principal, job_id: str) -> None:
        """Count the job against its key's concurrent-job quota, or refuse it with a 429.

        A full quota is checked against MongoDB once: a job whose end Redis missed (it was
        down) is released then, so a lost release never blocks a key for good.
        """
        if await self.auth.admit_job(caller, job_id) is not False:
            return
        # Only entries older than a grace: a younger one may be a submission still being written.
        counted = await self.auth.active_jobs(caller.key_id, older_than_s=QUOTA_RECONCILE_GRACE_S)
        ended = set(counted) - await self.store.active_among(counted)
        if ended:
            await self.auth.release_jobs(caller.key_id, sorted(ended))
            if await self.auth.admit_job(caller, job_id) is not False:
                return
        raise RateLimitError(
            f"key {caller.key_id} already has {caller.max_jobs} jobs queued or running (its limit); "
            "wait for one to end",
            retry_after_s=self.settings.job_quota_retry_after_s,
            code="job_quota_exceeded",
        )

    def _input_ref(self, request: JobRequest, owner: str) -> ObjectRef:
        if request.upload_id is not None:
            return self.objects.upload_ref(owner, request.upload_id)
        try:
            ref = ObjectRef.parse(request.input_url or "")
        except InputError as exc:
            raise InvalidRequestError(str(exc), param="input_url") from exc
        mine = f"s3://{self.objects.bucket}/{self.objects.uploads_prefix(owner)}"
        if not ref.url.startswith(mine) or ".." in ref.key.split("/"):
            raise InvalidRequestError(f"jobs read inputs from your own uploads only ({mine}...)", param="input_url")
        return ref

    async def owned(self, job_id: str, owner: str, *, fresh: bool = False) -> dict:
        """A job of this owner; another owner's job is exactly as missing as no job.

        fresh: read MongoDB, not the status cache (for answers that refuse on the status).
        """
        if fresh:
            doc = await self.store.get(job_id)
            status = public_view(doc) if doc else None
        else:
            status = await self.store.status(job_id)
        if status is None or status.get("owner") != owner:
            raise JobNotFoundError(f"no job {job_id!r}", param="id")
        return status

    async def cancel(self, job_id: str, owner: str) -> dict:
        current = await self.owned(job_id, owner, fresh=True)
        if current["status"] in TERMINAL:
            raise JobStateError(f"job {job_id} has already {current['status']}; there is nothing to cancel")
        doc = await self.store.request_cancel(job_id, owner)
        if doc is None:
            raise JobNotFoundError(f"no job {job_id!r}", param="id")
        return doc

    async def finished(self, job_id: str, owner: str) -> dict:
        """The stored document of a job that has succeeded; 409 while it has not."""
        status = await self.owned(job_id, owner, fresh=True)
        if status["status"] != JobStatus.SUCCEEDED:
            detail = f": {status['error']['message']}" if status.get("error") else ""
            raise JobStateError(f"job {job_id} is {status['status']}{detail}; a result exists once it has succeeded")
        doc = await self.store.get(job_id)
        if doc is None or not doc.get("result"):
            raise JobNotFoundError(f"job {job_id} has no stored result", param="id")
        return doc
