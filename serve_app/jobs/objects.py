"""The S3 object store (MinIO in production): the client, and the objects of asynchronous jobs."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

import numpy as np
from minio.datatypes import PostPolicy
from minio.error import S3Error

from serve_app.embeddings.texts import text_problem
from serve_app.infra.s3 import object_store_client
from serve_app.settings import Settings

UPLOAD_CONTENT_TYPE = "application/x-ndjson"
UPLOAD_FILE_FIELD = "file"  # the form field that carries the file; it must come last


class InputError(ValueError):
    """A job's input cannot be used; the message says where and why."""


@dataclass(frozen=True)
class ObjectRef:
    bucket: str
    key: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @classmethod
    def parse(cls, url: str) -> ObjectRef:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.strip("/"):
            raise InputError(f"{url!r} is not an s3://bucket/key URL")
        return cls(parsed.netloc, parsed.path.lstrip("/"))


@dataclass(frozen=True)
class UploadForm:
    """How to upload one input: a POST form (the fields, then the file) whose policy the store enforces."""

    ref: ObjectRef
    url: str
    fields: dict[str, str]
    max_bytes: int
    expires_in_s: int

    @property
    def upload_id(self) -> str:
        return self.ref.key.rsplit("/", 1)[-1].removesuffix(".jsonl")


class JobObjects:
    """Uploads (job inputs) and large job results in the jobs bucket, with presigned URLs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bucket = settings.job_bucket
        self.client = object_store_client(settings)
        # Presigning is computed locally; URLs name the endpoint clients can reach.
        self.public_endpoint = (settings.s3_public_endpoint or settings.s3_endpoint).rstrip("/")
        self.presigner = object_store_client(settings, endpoint=self.public_endpoint)
        self.expiry = timedelta(seconds=settings.job_presign_expiry_s)
        self._bucket_ready = False

    def ensure_bucket(self) -> None:
        if not self._bucket_ready:
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as exc:
                    if exc.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                        raise
            self._bucket_ready = True

    @staticmethod
    def uploads_prefix(owner: str) -> str:
        """Each user's uploads live under their own prefix; jobs read only their owner's."""
        return f"uploads/{owner}/"

    def upload_ref(self, owner: str, upload_id: str) -> ObjectRef:
        return ObjectRef(self.bucket, f"{self.uploads_prefix(owner)}{upload_id}.jsonl")

    def new_upload(self, owner: str) -> UploadForm:
        """A fresh key for a JSON-lines file of texts, and a signed POST policy to upload it.

        The policy names that one key, the content type and 1 to job_max_input_bytes bytes, and it
        expires with the other presigned URLs; the object store refuses any upload outside it (a
        presigned PUT could not bound the size).
        """
        self.ensure_bucket()
        ref = self.upload_ref(owner, uuid.uuid4().hex)
        policy = PostPolicy(ref.bucket, datetime.now(UTC) + self.expiry)
        policy.add_equals_condition("key", ref.key)
        policy.add_equals_condition("Content-Type", UPLOAD_CONTENT_TYPE)
        policy.add_content_length_range_condition(1, self.settings.job_max_input_bytes)
        signed = self.presigner.presigned_post_policy(policy)
        return UploadForm(
            ref=ref,
            url=f"{self.public_endpoint}/{ref.bucket}",
            fields={"key": ref.key, "Content-Type": UPLOAD_CONTENT_TYPE, **signed},
            max_bytes=self.settings.job_max_input_bytes,
            expires_in_s=self.settings.job_presign_expiry_s,
        )

    def check_input(self, ref: ObjectRef) -> int:
        """The size of an input object; InputError if it is not one a job may read.

        The upload policy already bounds the size; this is the second line of defence (an input_url
        written some other way, a store that ignores policies).
        """
        if ref.bucket != self.bucket:
            raise InputError(f"jobs read inputs from s3://{self.bucket}/ only, not {ref.url}")
        try:
            size = self.client.stat_object(ref.bucket, ref.key).size or 0
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchBucket", "NoSuchObject"}:
                raise InputError(f"{ref.url} does not exist; upload it first (POST the form from /v1/uploads)") from exc
            raise
        if size == 0:
            raise InputError(f"{ref.url} is empty")
        if size > self.settings.job_max_input_bytes:
            raise InputError(f"{ref.url} is {size} bytes; the limit is {self.settings.job_max_input_bytes}")
        return size

    def read_lines(self, ref: ObjectRef, max_line_bytes: int) -> Iterator[bytes]:
        """The object's lines; InputError for a line longer than max_line_bytes (before parsing it)."""
        response = self.client.get_object(ref.bucket, ref.key)
        try:
            pending = bytearray()
            number = 0
            for block in response.stream(1 << 20):
                pending += block
                start = 0
                while (end := pending.find(b"\n", start)) != -1:
                    number += 1
                    if end - start > max_line_bytes:
                        raise InputError(f"line {number} is longer than {max_line_bytes} bytes")
                    yield bytes(pending[start:end])
                    start = end + 1
                del pending[:start]
                if len(pending) > max_line_bytes:
                    raise InputError(f"line {number + 1} is longer than {max_line_bytes} bytes")
            if pending:
                yield bytes(pending)
        finally:
            response.close()
            response.release_conn()

    def write_result(
        self, job_id: str, vectors: np.ndarray, token_counts: list[int], task: str = "embed"
    ) -> tuple[ObjectRef, int]:
        """Write results as JSON lines ({"index", "embedding", "tokens"}, or a rerank job's {"index",
        "relevance_score", "tokens"}); the same job id, the same key.

        Returns where, and how many bytes.
        """
        self.ensure_bucket()
        ref = ObjectRef(self.bucket, f"results/{job_id}.jsonl")
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=True) as out:
            for i, (row, tokens) in enumerate(zip(vectors, token_counts, strict=True)):
                value = {"relevance_score": float(row[0])} if task == "rerank" else {"embedding": row.tolist()}
                out.write(json.dumps({"index": i, **value, "tokens": tokens}) + "\n")
            out.flush()
            self.client.fput_object(ref.bucket, ref.key, out.name, content_type=UPLOAD_CONTENT_TYPE)
            return ref, os.path.getsize(out.name)

    def download_url(self, ref: ObjectRef) -> str:
        return self.presigner.presigned_get_object(ref.bucket, ref.key, expires=self.expiry)


def parse_text_lines(lines: Iterator[bytes], *, max_items: int, max_chars: int) -> list[str]:
    """Texts from JSON lines: each line a JSON string or an object with a "text" string."""
    texts: list[str] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"line {number} is not valid JSON: {exc}") from exc
        text = value.get("text") if isinstance(value, dict) else value
        if not isinstance(text, str):
            raise InputError(f'line {number} must be a JSON string or an object with a "text" string')
        if problem := text_problem(text, max_chars):
            raise InputError(f"line {number} {problem}")
        texts.append(text)
        if len(texts) > max_items:
            raise InputError(f"the input has more than {max_items} texts")
    if not texts:
        raise InputError("the input holds no texts")
    return texts
