"""Asynchronous jobs: /v1/uploads, /v1/jobs, and the secret that signs their callbacks. Each route calls JobService."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response

from serve_app.http.deps import JobsCallerDep, JobServiceDep, require_jobs
from serve_app.http.routes import AUTH_ERRORS
from serve_app.http.schemas import (
    CallbackSecret,
    Embedding,
    ErrorResponse,
    JobDocument,
    JobList,
    JobRequest,
    JobResultInline,
    JobResultObject,
    JobStatusName,
    ScoredDocument,
    SubmittedJob,
    UploadTicket,
    Usage,
)
from serve_app.jobs.objects import UPLOAD_FILE_FIELD
from serve_app.jobs.service import JobInput

router = APIRouter(tags=["jobs"], dependencies=[Depends(require_jobs)], responses=AUTH_ERRORS)

JobId = Annotated[str, Path(min_length=1, max_length=64, description="The job's id.")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Makes retries safe: the same key (per user, for a day) returns the job it first made.",
    ),
]
ERRORS = {404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


@router.post("/v1/uploads", response_model=UploadTicket, status_code=201, responses=ERRORS)
async def create_upload(jobs: JobServiceDep, caller: JobsCallerDep) -> UploadTicket:
    """A signed POST form for a JSON-lines file of texts (size-limited by the store), to submit as a job's input."""
    form = await jobs.new_upload(caller.owner)
    return UploadTicket(
        upload_id=form.upload_id,
        input_url=form.ref.url,
        url=form.url,
        fields=form.fields,
        file_field=UPLOAD_FILE_FIELD,
        max_bytes=form.max_bytes,
        expires_in_s=form.expires_in_s,
    )


@router.post(
    "/v1/jobs",
    response_model=SubmittedJob,
    response_model_exclude_unset=True,
    status_code=202,
    responses={400: {"model": ErrorResponse}, **ERRORS},
)
async def submit_job(
    body: JobRequest,
    request: Request,
    response: Response,
    jobs: JobServiceDep,
    caller: JobsCallerDep,
    idempotency_key: IdempotencyKey = None,
):
    """Accept a job: 202 at once with its id, status URL (Location) and document.

    With an `Idempotency-Key` header, a retry of the same request (within a day, per user) gets the
    job the first one made, with `Idempotent-Replayed: true`; the same key with a different request
    is a 422. A `callback_url` must resolve to public addresses only (422 otherwise). The first job
    with a callback makes the tenant's signing secret: that answer alone carries it, as
    `callback_secret`.
    """
    request.state.history = {"model": body.model, "items": len(body.input) if body.input else None, "kind": "job"}
    source = JobInput(texts=body.input, input_url=body.input_url, upload_id=body.upload_id, query=body.query)
    submission = await jobs.submit(
        caller, body.model, source, body.callback_url, idempotency_key, request_id=request.state.request_id
    )
    view = submission.job
    request.state.history["job_id"] = view["id"]
    response.headers["Location"] = f"/v1/jobs/{view['id']}"
    if submission.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if submission.callback_secret is not None:
        view["callback_secret"] = submission.callback_secret
    return view


@router.post("/v1/callbacks/secret", response_model=CallbackSecret, status_code=201, responses=ERRORS)
async def rotate_callback_secret(jobs: JobServiceDep, caller: JobsCallerDep) -> CallbackSecret:
    """Make a new secret for signing your callbacks, replacing any: shown in this answer only.

    Deliveries are signed with the new one within seconds (the job workers cache it briefly).
    """
    made = await jobs.rotate_callback_secret(caller.owner)
    return CallbackSecret(secret=made["value"], created_at=made["created_at"].isoformat())


@router.get("/v1/jobs", response_model=JobList)
async def list_jobs(
    jobs: JobServiceDep,
    caller: JobsCallerDep,
    status: JobStatusName | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> JobList:
    """The caller's jobs, newest first, a page at a time, optionally of one status."""
    views, next_cursor = await jobs.list(caller.owner, status=status, limit=limit, cursor=cursor)
    return JobList(data=[JobDocument.model_validate(v) for v in views], next_cursor=next_cursor)


@router.get("/v1/jobs/{job_id}", response_model=JobDocument, responses=ERRORS)
async def get_job(job_id: JobId, jobs: JobServiceDep, caller: JobsCallerDep):
    """A job's status, progress, timings, and its error when it failed."""
    return await jobs.get(job_id, caller.owner)


@router.delete("/v1/jobs/{job_id}", response_model=JobDocument, responses=ERRORS)
async def cancel_job(job_id: JobId, jobs: JobServiceDep, caller: JobsCallerDep):
    """Cancel a job: a queued one at once, a running one at its next chunk."""
    return await jobs.cancel(job_id, caller.owner)


@router.get("/v1/jobs/{job_id}/result", response_model=JobResultInline | JobResultObject, responses=ERRORS)
async def get_job_result(job_id: JobId, jobs: JobServiceDep, caller: JobsCallerDep):
    """The embeddings inline when small; otherwise a presigned URL of a JSON-lines object."""
    result = await jobs.result(job_id, caller.owner)
    common = {"job_id": result.job_id, "model": result.model, "version": result.version}
    if result.vectors is None:
        return JobResultObject(
            **common, count=result.count, bytes=result.bytes, url=result.url, expires_in_s=result.expires_in_s
        )
    total = int(np.sum(result.token_counts))
    if result.task == "rerank":
        data = [ScoredDocument(index=i, relevance_score=float(v[0])) for i, v in enumerate(result.vectors)]
    else:
        data = [Embedding(index=i, embedding=v) for i, v in enumerate(result.vectors.tolist())]
    return JobResultInline(
        **common,
        data=data,
        usage=Usage(prompt_tokens=total, total_tokens=total),
    )
