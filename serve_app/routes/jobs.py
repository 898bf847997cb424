"""Asynchronous jobs: /v1/uploads, /v1/jobs, and the secret that signs their callbacks."""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Path, Query, Request, Response

from serve_app.deps import JobsCallerDep, ServicesDep, require_jobs
from serve_app.errors import JobNotFoundError
from serve_app.job_store import public_view
from serve_app.object_store import UPLOAD_FILE_FIELD, ObjectRef
from serve_app.routes import AUTH_ERRORS
from serve_app.schemas import (
    CallbackSecret,
    Embedding,
    ErrorResponse,
    JobDocument,
    JobList,
    JobRequest,
    JobResultInline,
    JobResultObject,
    JobStatusName,
    SubmittedJob,
    UploadTicket,
    Usage,
)

router = APIRouter(tags=["jobs"], dependencies=[Depends(require_jobs)], responses=AUTH_ERRORS)

JobId = Annotated[str, Path(min_length=1, max_length=64, description="The job's id.")]
ERRORS = {404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


@router.post("/v1/uploads", response_model=UploadTicket, status_code=201, responses=ERRORS)
async def create_upload(services: ServicesDep, caller: JobsCallerDep) -> UploadTicket:
    """A signed POST form for a JSON-lines file of texts (size-limited by the store), to submit as a job's input."""
    form = await asyncio.to_thread(services.job_objects.new_upload, caller.owner)
    return UploadTicket(
        upload_id=form.ref.key.rsplit("/", 1)[-1].removesuffix(".jsonl"),
        input_url=form.ref.url,
        url=form.url,
        fields=form.fields,
        file_field=UPLOAD_FILE_FIELD,
        max_bytes=form.max_bytes,
        expires_in_s=services.settings.job_presign_expiry_s,
    )


@router.post(
    "/v1/jobs",
    response_model=SubmittedJob,
    response_model_exclude_unset=True,
    status_code=202,
    responses={400: {"model": ErrorResponse}, **ERRORS},
)
async def submit_job(
    body: JobRequest, request: Request, response: Response, services: ServicesDep, caller: JobsCallerDep
):
    """Accept a job: 202 at once with its id, status URL (Location) and document.

    A `callback_url` must resolve to public addresses only (422 otherwise). The first job with a
    callback makes the tenant's signing secret: that answer alone carries it, as `callback_secret`.
    """
    request.state.history = {"model": body.model, "items": len(body.input) if body.input else None, "kind": "job"}
    doc, made_secret = await services.jobs.submit(body, caller)
    request.state.history["job_id"] = doc["_id"]
    response.headers["Location"] = f"/v1/jobs/{doc['_id']}"
    view = public_view(doc)
    if made_secret is not None:
        view["callback_secret"] = made_secret
    return view


@router.post("/v1/callbacks/secret", response_model=CallbackSecret, status_code=201, responses=ERRORS)
async def rotate_callback_secret(services: ServicesDep, caller: JobsCallerDep) -> CallbackSecret:
    """Make a new secret for signing your callbacks, replacing any: shown in this answer only.

    Deliveries are signed with the new one within seconds (the job workers cache it briefly).
    """
    made = await services.keys.rotate_callback_secret(caller.owner)
    return CallbackSecret(secret=made["value"], created_at=made["created_at"].isoformat())


@router.get("/v1/jobs", response_model=JobList)
async def list_jobs(
    services: ServicesDep,
    caller: JobsCallerDep,
    status: JobStatusName | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> JobList:
    """The caller's jobs, newest first, a page at a time, optionally of one status."""
    docs = await services.job_store.list(caller.owner, status=status, limit=limit + 1, before=cursor)
    page = docs[:limit]
    return JobList(
        data=[JobDocument.model_validate(public_view(d)) for d in page],
        next_cursor=page[-1]["_id"] if len(docs) > limit else None,
    )


@router.get("/v1/jobs/{job_id}", response_model=JobDocument, responses=ERRORS)
async def get_job(job_id: JobId, services: ServicesDep, caller: JobsCallerDep):
    """A job's status, progress, timings, and its error when it failed."""
    return await services.jobs.owned(job_id, caller.owner)


@router.delete("/v1/jobs/{job_id}", response_model=JobDocument, responses=ERRORS)
async def cancel_job(job_id: JobId, services: ServicesDep, caller: JobsCallerDep):
    """Cancel a job: a queued one at once, a running one at its next chunk."""
    return public_view(await services.jobs.cancel(job_id, caller.owner))


@router.get("/v1/jobs/{job_id}/result", response_model=JobResultInline | JobResultObject, responses=ERRORS)
async def get_job_result(job_id: JobId, services: ServicesDep, caller: JobsCallerDep):
    """The embeddings inline when small; otherwise a presigned URL of a JSON-lines object."""
    doc = await services.jobs.finished(job_id, caller.owner)
    result = doc["result"]
    if result["kind"] == "object":
        ref = ObjectRef.parse(result["url"])
        return JobResultObject(
            job_id=job_id,
            model=doc["model"],
            version=result["version"],
            count=result["count"],
            bytes=result["bytes"],
            url=await asyncio.to_thread(services.job_objects.download_url, ref),
            expires_in_s=services.settings.job_presign_expiry_s,
        )
    stored = await services.job_store.inline_result(job_id)
    if stored is None:
        raise JobNotFoundError(f"job {job_id} has no stored result", param="id")
    vectors, tokens = stored
    total = int(np.sum(tokens))
    return JobResultInline(
        job_id=job_id,
        model=doc["model"],
        version=result["version"],
        data=[Embedding(index=i, embedding=v) for i, v in enumerate(vectors.tolist())],
        usage=Usage(prompt_tokens=total, total_tokens=total),
    )
