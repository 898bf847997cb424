"""Request and response shapes of the HTTP API (OpenAI-compatible where OpenAI has one)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from serve_app.settings import get_settings


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_input", message)


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
        settings = get_settings()
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise _invalid("input must hold at least one text")
        if len(texts) > settings.max_items_per_request:
            raise _invalid(f"input has {len(texts)} texts; at most {settings.max_items_per_request} are allowed")
        for i, text in enumerate(texts):
            if not text:
                raise _invalid(f"input[{i}] is empty; every text needs at least one character")
            if len(text) > settings.max_text_chars:
                raise _invalid(f"input[{i}] has {len(text)} characters; the limit is {settings.max_text_chars}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise _invalid(f"input[{i}] is not valid Unicode ({exc.reason})") from exc
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


class ModelCard(BaseModel):
    """A served model, OpenAI's shape plus where it came from."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "inference-cluster"
    version: str
    dims: int
    task: str
    framework: str
    source: str = Field(description="Object-store location the replicas loaded the weights from.")
    manifest_digest: str
    device: str
    max_seq_length: int


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
