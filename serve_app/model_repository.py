"""The model repository in the object store, and the node-local cache replicas load from.

Layout: bucket `<model_bucket>`, objects `<name>/<version>/<file>` plus `<name>/<version>/manifest.json`.
The manifest is written last, so a version is visible only once all its files are there.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from minio import Minio
from minio.error import S3Error
from pydantic import BaseModel

from serve_app.infra.s3 import object_store_client
from serve_app.settings import Settings

MANIFEST = "manifest.json"
VERIFIED_MARKER = ".verified"
CHUNK = 1 << 20


class VersionNotFoundError(LookupError):
    """The repository has no such model version."""


class ChecksumMismatchError(ValueError):
    """A downloaded file does not match the sha256 its manifest records."""


class VersionConflictError(ValueError):
    """A version already exists with other files: versions are immutable, push a new one."""


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(kind: str, value: str) -> str:
    """Model names and versions become S3 keys, directories and HTTP headers: keep them plain."""
    if not NAME_PATTERN.match(value) or ".." in value:
        raise ValueError(f"{kind} {value!r} must be 1-128 characters of letters, digits, '.', '_' or '-'")
    return value


class ManifestFile(BaseModel):
    path: str
    size: int
    sha256: str


class Manifest(BaseModel):
    name: str
    version: str
    framework: str
    task: str
    dims: int
    files: list[ManifestFile]
    created: datetime

    @property
    def digest(self) -> str:
        """One hash that names this exact set of files."""
        joined = "\n".join(f"{f.path}:{f.sha256}" for f in sorted(self.files, key=lambda f: f.path))
        return hashlib.sha256(joined.encode()).hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelRepository:
    """Model versions in an S3 bucket: push a directory, read manifests, fetch into a local cache."""

    def __init__(self, client: Minio, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: Settings, timeout_s: float | None = None) -> ModelRepository:
        return cls(object_store_client(settings, timeout_s), settings.model_bucket)

    def uri(self, name: str, version: str) -> str:
        return f"s3://{self.bucket}/{name}/{version}/"

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)

    def push(self, local_dir: Path, name: str, version: str, *, framework: str, task: str, dims: int) -> Manifest:
        """Upload every file of local_dir as name/version; pushing the same files again changes nothing.

        A version is immutable: the same name and version with other files is refused, because
        caches (Redis results, node-local weights) are keyed by name and version.
        """
        check_name("model name", name)
        check_name("version", version)
        files = [
            ManifestFile(path=p.relative_to(local_dir).as_posix(), size=p.stat().st_size, sha256=sha256_of(p))
            for p in sorted(local_dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        ]
        candidate = Manifest(
            name=name,
            version=version,
            framework=framework,
            task=task,
            dims=dims,
            files=files,
            created=datetime.now(UTC),
        )
        try:
            existing = self.manifest(name, version)
        except VersionNotFoundError:
            existing = None
        if existing is not None:
            if existing.digest != candidate.digest:
                raise VersionConflictError(
                    f"{self.uri(name, version)} already holds other files (digest {existing.digest[:12]}); "
                    "versions are immutable: push these as a new version"
                )
            return existing
        self.ensure_bucket()
        prefix = f"{name}/{version}/"
        for f in files:
            self.client.fput_object(self.bucket, prefix + f.path, str(local_dir / f.path))
        body = candidate.model_dump_json(indent=2).encode()
        self.client.put_object(
            self.bucket, prefix + MANIFEST, io.BytesIO(body), len(body), content_type="application/json"
        )
        return candidate

    def manifest(self, name: str, version: str) -> Manifest:
        try:
            response = self.client.get_object(self.bucket, f"{name}/{version}/{MANIFEST}")
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchBucket"}:
                raise VersionNotFoundError(
                    f"no model {name!r} version {version!r} in {self.uri(name, version)}"
                ) from exc
            raise
        try:
            return Manifest.model_validate_json(response.read())
        finally:
            response.close()
            response.release_conn()

    def fetch(self, name: str, version: str, cache_root: Path) -> tuple[Path, Manifest]:
        """Make cache_root/name/version hold the verified files; one download per node.

        Replicas on the same node that start together serialise on a file lock; the first
        downloads, the others find the verified marker and return at once.
        """
        check_name("model name", name)
        check_name("version", version)
        manifest = self.manifest(name, version)
        target = cache_root / name / version
        target.mkdir(parents=True, exist_ok=True)
        for f in manifest.files:
            if not (target / f.path).resolve().is_relative_to(target.resolve()):
                raise ChecksumMismatchError(f"manifest path {f.path!r} leaves the model directory")
        marker = target / VERIFIED_MARKER
        with _exclusive_lock(cache_root / name / f".{version}.lock"):
            if marker.exists() and marker.read_text() == manifest.digest:
                return target, manifest
            marker.unlink(missing_ok=True)
            for f in manifest.files:
                dest = target / f.path
                if dest.exists() and dest.stat().st_size == f.size and sha256_of(dest) == f.sha256:
                    continue
                self._download_verified(f"{name}/{version}/{f.path}", dest, f.sha256)
            _write_atomically(marker, manifest.digest.encode())
        return target, manifest

    def _download_verified(self, key: str, dest: Path, expected_sha256: str) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            response = self.client.get_object(self.bucket, key)
            try:
                with os.fdopen(fd, "wb") as out:
                    for block in response.stream(CHUNK):
                        digest.update(block)
                        out.write(block)
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                response.close()
                response.release_conn()
            if digest.hexdigest() != expected_sha256:
                raise ChecksumMismatchError(
                    f"{key}: sha256 {digest.hexdigest()} does not match manifest {expected_sha256}"
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def describe_sentence_transformer(local_dir: Path) -> dict[str, object]:
    """Manifest fields read from a sentence-transformers directory."""
    config = json.loads((local_dir / "config.json").read_text())
    return {"framework": "transformers", "task": "sentence-embedding", "dims": int(config["hidden_size"])}
