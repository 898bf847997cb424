"""Request and response shapes of the HTTP API (OpenAI-compatible where OpenAI has one)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from serve_app.auth.credentials import USER_NAME_PATTERN, Scope
from serve_app.embeddings.texts import text_problem
from serve_app.jobs.store import JobStatus
from serve_app.outbound import url_problem
from serve_app.settings import get_settings


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_input", message)


def validate_texts(texts: list[str], max_items: int, field: str = "input") -> None:
    """Raise a validation error that names the first text breaking a limit."""
    max_chars = get_settings().max_text_chars
    if not texts:
        raise _invalid(f"{field} must hold at least one text")
    if len(texts) > max_items:
        raise _invalid(f"{field} has {len(texts)} texts; at most {max_items} are allowed")
    for i, text in enumerate(texts):
        if problem := text_problem(text, max_chars):
            raise _invalid(f"{field}[{i}] {problem}")


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings, as OpenAI's API takes it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, examples=["all-minilm-l6-v2"])
    input: str | list[str] = Field(
        description="A text or a list of texts to embed.",
        examples=["The quick brown fox", ["first text", "second text"]],
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Must equal the model's size if given.")
    user: str | None = Field(None, max_length=256)

    @field_validator("input")
    @classmethod
    def _texts_within_limits(cls, value: str | list[str]) -> str | list[str]:
        validate_texts([value] if isinstance(value, str) else value, get_settings().max_items_per_request)
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32 when asked.")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str


class RerankRequest(BaseModel):
    """POST /v1/rerank, as Cohere, Jina and text-embeddings-inference take it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, examples=["my-reranker"])
    query: str = Field(description="What the documents are ranked against.", examples=["what is a panda?"])
    documents: list[str | RerankDocument] = Field(
        description="Texts (or {text} objects) to score against the query.",
        examples=[["The giant panda is a bear native to China.", "Paris is the capital of France."]],
    )
    top_n: int | None = Field(None, ge=1, description="Return only the best top_n (default: all).")
    return_documents: bool = Field(False, description="Include each document's text in its result.")

    @field_validator("query")
    @classmethod
    def _query_within_limits(cls, value: str) -> str:
        if problem := text_problem(value, get_settings().max_text_chars):
            raise _invalid(f"query {problem}")
        return value

    @field_validator("documents")
    @classmethod
    def _documents_within_limits(cls, value: list[str | RerankDocument]) -> list[str | RerankDocument]:
        texts = [d if isinstance(d, str) else d.text for d in value]
        validate_texts(texts, get_settings().max_items_per_request, field="documents")
        return value

    @property
    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResult(BaseModel):
    index: int = Field(description="The document's position in the request.")
    relevance_score: float = Field(description="In [0, 1]: the sigmoid of the cross-encoder's logit.")
    document: RerankDocument | None = None


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str = Field(description="The request id (X-Request-ID).")
    object: Literal["list"] = "list"
    results: list[RerankResult] = Field(description="Best first.")
    model: str
    usage: RerankUsage


class ModelVersionState(BaseModel):
    version: str
    state: Literal["pinned", "loaded", "available"] = Field(
        description="pinned: served by its own deployment; loaded: held by an on-demand pool replica; "
        "available: in the repository, loaded on first use."
    )
    pushed_at: int


class ModelCard(BaseModel):
    """A model, OpenAI's shape plus where it came from and what state it is in."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "inference-cluster"
    version: str = Field(description="The version a request for the bare name gets.")
    state: Literal["pinned", "loaded", "available", "unavailable"] = Field(
        "pinned",
        description="pinned: its own deployment serves it; loaded or available: served on demand (see versions); "
        "unavailable: pinned, but its deployment does not answer now (starting, or its replicas down).",
    )
    dims: int
    task: str
    framework: str
    source: str = Field(description="Object-store location of the weights.")
    manifest_digest: str
    device: str | None = Field(None, description="Where it runs, once loaded.")
    backend: str | None = Field(None, description="What runs it, once loaded: torch, or onnx (ONNX Runtime).")
    max_seq_length: int | None = None
    versions: list[ModelVersionState] = Field(default_factory=list, description="Every version in the repository.")
    canary_version: str | None = Field(None, description="A version that answers canary_percent of the requests.")
    canary_percent: float | None = None


class RepositoryModel(BaseModel):
    """One model version in the repository, as `python -m cluster models list` shows it."""

    name: str
    version: str
    task: str
    dims: int
    size: int
    digest: str
    pushed_at: str
    state: Literal["pinned", "loaded", "available"]


class RepositoryModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RepositoryModel]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Liveness(BaseModel):
    status: Literal["ok"] = "ok"


class ComponentStatus(BaseModel):
    status: Literal["ok", "down"]
    latency_ms: float | None = None
    detail: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "unavailable"]
    components: dict[str, ComponentStatus]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# The one vocabulary of job states is JobStatus (serve_app/jobs/store.py); a Literal keeps the schema inline.
JobStatusName = Literal[tuple(status.value for status in JobStatus)]  # type: ignore[valid-type]


class JobRequest(BaseModel):
    """POST /v1/jobs: texts inline, or a JSON-lines object uploaded through /v1/uploads."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, examples=["all-minilm-l6-v2"])
    input: list[str] | None = Field(None, description="Texts inline (up to INFER_JOB_MAX_INLINE_ITEMS).")
    input_url: str | None = Field(None, max_length=1024, description="s3://<jobs bucket>/<key> of a JSON-lines file.")
    upload_id: str | None = Field(None, pattern=r"^[0-9a-f]{32}$", description="An id from POST /v1/uploads.")
    callback_url: str | None = Field(None, max_length=2048, description="POSTed the final job document.")
    query: str | None = Field(
        None, description="With a rerank model: each input text is a document, scored against this query."
    )

    @field_validator("query")
    @classmethod
    def _query_within_limits(cls, value: str | None) -> str | None:
        if value is not None and (problem := text_problem(value, get_settings().max_text_chars)):
            raise _invalid(f"query {problem}")
        return value

    @field_validator("input")
    @classmethod
    def _texts_within_limits(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            settings = get_settings()
            validate_texts(value, settings.job_max_inline_items)
            size = sum(len(text.encode()) for text in value)
            if size > settings.job_max_inline_bytes:
                raise _invalid(
                    f"inline input is {size} bytes; the limit is {settings.job_max_inline_bytes}: upload it instead"
                )
        return value

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        """The URL's shape only; where its host resolves to is checked at submission (it needs DNS)."""
        if value is not None and (problem := url_problem(value)) is not None:
            raise _invalid(f"callback_url {problem}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> JobRequest:
        given = [name for name in ("input", "input_url", "upload_id") if getattr(self, name) is not None]
        if len(given) != 1:
            raise _invalid(f"give exactly one of input, input_url or upload_id (got {', '.join(given) or 'none'})")
        return self


class JobProgress(BaseModel):
    done: int
    total: int | None


class JobError(BaseModel):
    type: str
    message: str


class JobCallback(BaseModel):
    url: str
    status: Literal["waiting", "pending", "delivered", "failed"] | None
    attempts: int
    last_error: str | None
    delivered_at: str | None


class JobDocument(BaseModel):
    id: str
    object: Literal["job"] = "job"
    model: str
    status: JobStatusName
    owner: str | None = Field(description="The user (tenant) whose key submitted the job.")
    key_id: str | None = Field(None, description="The id of the key that submitted it.")
    input: dict
    progress: JobProgress
    attempts: int
    cancel_requested: bool
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    error: JobError | None
    result_url: str | None = Field(description="Where the result is, once the job has succeeded.")
    callback: JobCallback | None


class SubmittedJob(JobDocument):
    """The answer to POST /v1/jobs: the job document, and the tenant's callback secret when it was just made."""

    callback_secret: str | None = Field(
        None,
        description="The secret that signs your callbacks (X-Signature), present only in the answer that "
        "created it: the first job with a callback_url. Keep it; POST /v1/callbacks/secret replaces it.",
    )


class CallbackSecret(BaseModel):
    """A tenant's callback-signing secret, shown once: when it is made."""

    object: Literal["callback.secret"] = "callback.secret"
    secret: str = Field(description="HMAC-SHA256 key of X-Signature: t=<unix seconds>,v1=<hex of '<t>.<body>'>.")
    created_at: str


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobDocument]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null at the end.")


class ScoredDocument(BaseModel):
    index: int
    relevance_score: float


class JobResultInline(BaseModel):
    """A small result, in the embeddings response's shape (a rerank job's: each document's score, in
    the input's order)."""

    object: Literal["list"] = "list"
    job_id: str
    model: str
    version: str
    data: list[Embedding] | list[ScoredDocument]
    usage: Usage


class JobResultObject(BaseModel):
    """A large result: a JSON-lines object ({"index", "embedding", "tokens"} per line) to download."""

    object: Literal["job.result"] = "job.result"
    job_id: str
    model: str
    version: str
    count: int
    format: Literal["jsonl"] = "jsonl"
    bytes: int
    url: str
    expires_in_s: int


class UploadTicket(BaseModel):
    """Where to upload a JSON-lines file of texts (one JSON string, or {"text": ...}, per line).

    POST a multipart/form-data form to `url`: every entry of `fields`, then the file as `file_field`
    (last). The object store refuses a file over `max_bytes`, another key, or an expired form.
    """

    upload_id: str
    input_url: str
    url: str = Field(description="The object store's URL to POST the form to (the bucket).")
    method: Literal["POST"] = "POST"
    fields: dict[str, str] = Field(description="Form fields to send as they are, before the file.")
    file_field: Literal["file"] = "file"
    max_bytes: int = Field(description="The largest file the store accepts (INFER_JOB_MAX_INPUT_BYTES).")
    expires_in_s: int


# -- identity: sessions, users, keys, history -------------------------------------------------

ScopeName = Scope  # the one vocabulary of scopes and user names: serve_app/auth/credentials.py


class Identity(BaseModel):
    """Who the presented credential belongs to, and its limits."""

    key_id: str
    owner: str
    scopes: list[ScopeName]
    via: Literal["key", "session"]
    rate_limit_per_s: float = Field(description="0: unlimited.")
    burst: int
    max_concurrent_jobs: int = Field(description="0: unlimited.")
    expires_at: str | None
    token_rate_per_s: float | None = Field(None, description="Work budget: estimated tokens/s; 0: unlimited.")
    token_burst: int | None = None
    max_inflight_tokens: int | None = Field(None, description="0: unlimited.")


class Session(BaseModel):
    """A short-lived token standing in for the API key that logged in (also set as a cookie)."""

    object: Literal["session"] = "session"
    token: str = Field(description="Send as 'Authorization: Bearer <token>'; shown only now.")
    token_type: Literal["bearer"] = "bearer"
    expires_in_s: int
    expires_at: str
    key_id: str
    owner: str


class LoggedOut(BaseModel):
    object: Literal["session"] = "session"
    ended: bool = Field(description="False if the session had already expired or ended.")


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=USER_NAME_PATTERN, description="The tenant's name; jobs and history are per user.")
    description: str | None = Field(None, max_length=500)


class User(BaseModel):
    object: Literal["user"] = "user"
    name: str
    description: str | None
    created_at: str
    disabled: bool
    disabled_at: str | None = None


class UserList(BaseModel):
    object: Literal["list"] = "list"
    data: list[User]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner: str = Field(pattern=USER_NAME_PATTERN, description="An existing, enabled user.")
    name: str | None = Field(None, max_length=100, description="A label, such as where the key is used.")
    scopes: list[ScopeName] = Field(["infer", "jobs"], min_length=1, max_length=3)
    expires_in_s: int | None = Field(None, ge=60, le=10 * 365 * 86400, description="Null: never expires.")
    rate_limit_per_s: float | None = Field(
        None, ge=0, le=1e6, description="Null: the default; 0: unlimited; else at least 0.01."
    )
    burst: int | None = Field(None, ge=1, le=1_000_000, description="Null: the default.")
    max_concurrent_jobs: int | None = Field(None, ge=0, le=100_000, description="Null: the default; 0: unlimited.")
    token_rate_per_s: float | None = Field(
        None, ge=0, le=1e9, description="Work budget, estimated model tokens/s; null: the default; 0: unlimited."
    )
    token_burst: int | None = Field(None, ge=1, le=1_000_000_000, description="Null: the default.")
    max_inflight_tokens: int | None = Field(
        None, ge=0, le=1_000_000_000, description="Null: the default; 0: unlimited."
    )


class KeyInfo(BaseModel):
    """A key as stored: never the key itself."""

    object: Literal["api_key"] = "api_key"
    id: str
    prefix: str = Field(description="The key's first characters, to recognise it.")
    owner: str
    name: str | None
    scopes: list[ScopeName]
    created_at: str
    last_used_at: str | None = Field(description="Accurate to the key-cache TTL (INFER_AUTH_CACHE_TTL_S).")
    expires_at: str | None
    revoked: bool
    revoked_at: str | None
    rate_limit_per_s: float | None
    burst: int | None
    max_concurrent_jobs: int | None
    token_rate_per_s: float | None = None
    token_burst: int | None = None
    max_inflight_tokens: int | None = None


class CreatedKey(KeyInfo):
    key: str = Field(description="The API key. It is shown only now: store it.")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyInfo]


class KeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_s: int = Field(3600, ge=0, le=30 * 86400, description="The old key keeps working this long; 0: revoke now.")


class RotatedKey(BaseModel):
    object: Literal["api_key.rotation"] = "api_key.rotation"
    key: str = Field(description="The new API key, shown only now.")
    new: KeyInfo
    old: KeyInfo


class HistoryRecord(BaseModel):
    request_id: str
    ts: str
    endpoint: str
    status: int
    latency_ms: float
    key_id: str | None = None
    model: str | None = None
    items: int | None = None
    cache_hits: int | None = None
    version: str | None = None
    kind: str | None = None
    job_id: str | None = None


class HistoryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[HistoryRecord]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null at the end.")


class SystemLogEntry(BaseModel):
    """A system event from any replica (serve_app/events.py)."""

    id: str
    ts: str
    level: Literal["debug", "info", "warning", "error", "critical"]
    component: str = Field(description="gateway, EmbeddingModel, ModelPool or JobWorker.")
    message: str
    logger: str | None = None
    host: str | None = None
    pid: int | None = None
    request_id: str | None = None
    job_id: str | None = None
    model: str | None = None
    dependency: str | None = None
    error: str | None = None


class SystemLogList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SystemLogEntry]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null at the end.")


class StatsRow(BaseModel):
    """Numbers over a window's request records (POSTs to the API: embeddings, rerank, jobs, v2 infer)."""

    key: str | None = Field(None, description="The model or route; absent for the whole window.")
    requests: int
    texts: int = Field(description="Texts (or documents) the requests carried.")
    cache_hit_ratio: float | None = Field(
        description="Texts answered from the cache over texts of requests that read it; null if none did."
    )
    error_ratio: float = Field(description="Requests answered 5xx over all requests.")
    client_error_ratio: float = Field(description="Requests answered 4xx over all requests.")
    p50_ms: float | None
    p99_ms: float | None


class StatsWindow(BaseModel):
    object: Literal["stats"] = "stats"
    window: str
    since: str
    until: str
    owner: str | None = None
    overall: StatsRow
    by_model: list[StatsRow]
    by_route: list[StatsRow]


# -- the Open Inference Protocol (KServe v2, Triton HTTP) ----------------------------------------


class V2Error(BaseModel):
    error: str


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float] | None = None
    parameters: dict | None = None


class V2InferResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2OutputTensor]
