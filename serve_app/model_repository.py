"""The model repository in the object store, and the node-local cache replicas load from.

Layout: bucket `<model_bucket>`, objects `<name>/<version>/<file>` plus `<name>/<version>/manifest.json`.
The manifest is written last, so a version is visible only once all its files are there.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error
from minio.helpers import ProgressType
from pydantic import BaseModel, field_validator

from serve_app import metrics
from serve_app.infra.s3 import object_store_client
from serve_app.settings import Settings

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TOMBSTONE = "deleted.json"  # what a deleted version leaves: its digest, so the version is never reused
VERIFIED_MARKER = ".verified"
PRUNE_IDLE_S = 600.0  # a cached version used this recently is never pruned
CHUNK = 1 << 20


class VersionNotFoundError(LookupError):
    """The repository has no such model version."""


class ChecksumMismatchError(ValueError):
    """A downloaded file does not match the sha256 its manifest records."""


class VersionConflictError(ValueError):
    """A version already exists with other files: versions are immutable, push a new one."""


class NotAModelError(ValueError):
    """A directory that is not a model the replicas can load (nothing of it is pushed)."""


TASKS = ("embed", "rerank")
_LEGACY_TASKS = {"sentence-embedding": "embed"}  # what manifests pushed before tasks had names say

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
    max_tokens: int | None = None  # the longest input the model reads (longer ones are truncated)
    pooling: str | None = None  # how token vectors become one (mean, cls, max); embed models only
    # The largest difference between ONNX Runtime and torch on the push-time check texts, when the
    # version carries a checked export (onnx/model.onnx); None: serve it with torch only.
    onnx_max_difference: float | None = None

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        return _LEGACY_TASKS.get(value, value)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

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

    def push(
        self,
        local_dir: Path,
        name: str,
        version: str,
        *,
        framework: str,
        task: str,
        dims: int,
        max_tokens: int | None = None,
        pooling: str | None = None,
        onnx_max_difference: float | None = None,
        progress: Callable[[ManifestFile], ProgressType | None] | None = None,
    ) -> Manifest:
        """Upload every file of local_dir as name/version; pushing the same files again changes nothing.

        A version is immutable: the same name and version with other files is refused, because
        caches (Redis results, node-local weights) are keyed by name and version. The manifest
        goes last: until it is there the version does not exist for anyone (a push that fails
        half-way leaves nothing visible). Big files go up in parts (minio's multipart upload);
        `progress(file)` may give each upload a progress object (minio's set_meta/update).
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
            max_tokens=max_tokens,
            pooling=pooling,
            onnx_max_difference=onnx_max_difference,
        )
        try:
            existing = self.manifest(name, version)
        except VersionNotFoundError:
            existing = None
        deleted = self._tombstone(name, version)
        if deleted is not None and deleted != candidate.digest:
            raise VersionConflictError(
                f"{self.uri(name, version)} was deleted, and held other files (digest {deleted[:12]}); versions "
                "are immutable even after a delete (caches still hold its results): push these as a new version"
            )
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
            shown = progress(f) if progress else None
            self.client.fput_object(self.bucket, prefix + f.path, str(local_dir / f.path), progress=shown)
        body = candidate.model_dump_json(indent=2).encode()
        self.client.put_object(
            self.bucket, prefix + MANIFEST, io.BytesIO(body), len(body), content_type="application/json"
        )
        if deleted is not None:  # the same files again: the version is back, as it was
            self.client.remove_object(self.bucket, prefix + TOMBSTONE)
        return candidate

    def _tombstone(self, name: str, version: str) -> str | None:
        """The digest a deleted version had, or None if it was never deleted."""
        try:
            response = self.client.get_object(self.bucket, f"{name}/{version}/{TOMBSTONE}")
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchBucket"}:
                return None
            raise
        try:
            return json.loads(response.read())["digest"]
        finally:
            response.close()
            response.release_conn()

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

    def names(self) -> list[str]:
        """Every model name that has objects (a name whose pushes all failed lists no versions)."""
        if not self.client.bucket_exists(self.bucket):
            return []
        return sorted(o.object_name.rstrip("/") for o in self.client.list_objects(self.bucket) if o.is_dir)

    def versions(self, name: str) -> list[Manifest]:
        """The manifests of a model's versions, oldest first; a version without one (a push under way
        or one that failed) is not a version."""
        check_name("model name", name)
        if not self.client.bucket_exists(self.bucket):
            return []
        found = []
        for entry in self.client.list_objects(self.bucket, prefix=f"{name}/"):
            if not entry.is_dir:
                continue
            try:
                found.append(self.manifest(name, entry.object_name[len(name) + 1 :].rstrip("/")))
            except VersionNotFoundError:
                continue
        return sorted(found, key=lambda m: m.created)

    def delete(self, name: str, version: str) -> Manifest:
        """Remove a version: its manifest first (the version is gone for everyone at once), then its files.

        A tombstone with its digest stays, so the name and version never come back with other files:
        results cached under them (Redis, replicas holding the weights) would answer for the new ones."""
        check_name("model name", name)
        check_name("version", version)
        manifest = self.manifest(name, version)
        prefix = f"{name}/{version}/"
        self.client.remove_object(self.bucket, prefix + MANIFEST)
        leftovers = [DeleteObject(o.object_name) for o in self.client.list_objects(self.bucket, prefix, recursive=True)]
        failures = list(self.client.remove_objects(self.bucket, leftovers))
        if failures:
            raise OSError(f"{len(failures)} files of {self.uri(name, version)} were not removed: {failures[0]}")
        body = json.dumps({"digest": manifest.digest, "deleted_at": datetime.now(UTC).isoformat()}).encode()
        self.client.put_object(self.bucket, prefix + TOMBSTONE, io.BytesIO(body), len(body), "application/json")
        return manifest

    def fetch(
        self, name: str, version: str, cache_root: Path, *, max_bytes: int | None = None
    ) -> tuple[Path, Manifest]:
        """Make cache_root/name/version hold the verified files; one download per node.

        Replicas on the same node that start together serialise on a file lock; the first
        downloads, the others find the verified marker and return at once. With `max_bytes`, the
        cache is then pruned to that size (prune_cache), never of this version.
        """
        started = time.perf_counter()
        local_dir, manifest, downloaded = self._fetch(name, version, cache_root)
        metrics.weights_fetched(name, downloaded, time.perf_counter() - started)
        if max_bytes:
            try:
                prune_cache(cache_root, max_bytes, keep=local_dir)
            except OSError as exc:  # the fetch succeeded: a cache that could not be pruned is only logged
                logger.warning("model cache: pruning %s failed: %r", cache_root, exc)
        return local_dir, manifest

    def _fetch(self, name: str, version: str, cache_root: Path) -> tuple[Path, Manifest, int]:
        """The verified directory, the manifest, and how many bytes were downloaded (0: all cached)."""
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
                os.utime(marker)  # last used now: pruned last
                return target, manifest, 0
            marker.unlink(missing_ok=True)
            downloaded = 0
            for f in manifest.files:
                dest = target / f.path
                if dest.exists() and dest.stat().st_size == f.size and sha256_of(dest) == f.sha256:
                    continue
                self._download_verified(f"{name}/{version}/{f.path}", dest, f.sha256)
                downloaded += f.size
            _write_atomically(marker, manifest.digest.encode())
        return target, manifest, downloaded

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


def prune_cache(cache_root: Path, max_bytes: int, *, keep: Path, idle_s: float = PRUNE_IDLE_S) -> list[Path]:
    """Remove the least recently used versions from a node cache until it holds at most max_bytes.

    Only verified versions are candidates, least recently fetched first (their marker's mtime), and
    never `keep`, one used in the last `idle_s` (a replica may be loading it), or one whose lock
    another process holds (being fetched). A replica that already loaded a removed version keeps
    running (its weights are in memory); the next one to start downloads it again. Returns what
    it removed.
    """
    versions = []
    for marker in cache_root.glob(f"*/*/{VERIFIED_MARKER}"):
        directory = marker.parent
        try:
            used = marker.stat().st_mtime
            size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        except FileNotFoundError:  # removed meanwhile by another replica's prune
            continue
        versions.append((used, size, directory))
    total = sum(size for _, size, _ in versions)
    removed: list[Path] = []
    now = time.time()
    for used, size, directory in sorted(versions, key=lambda v: v[0]):
        if total <= max_bytes:
            break
        if directory.resolve() == keep.resolve() or now - used < idle_s:
            continue
        lock = directory.parent / f".{directory.name}.lock"
        with lock.open("a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another process is fetching it now
            try:
                try:  # used since the scan (a cache hit touches the marker under this lock): keep it
                    if time.time() - (directory / VERIFIED_MARKER).stat().st_mtime < idle_s:
                        continue
                except FileNotFoundError:
                    continue  # gone already
                (directory / VERIFIED_MARKER).unlink(missing_ok=True)  # not usable from here on
                shutil.rmtree(directory, ignore_errors=True)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        logger.info("model cache: removed %s (%.1f MB) to stay under %.1f GB", directory, size / 1e6, max_bytes / 1e9)
        total -= size
        removed.append(directory)
    return removed


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


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
POOLING_MODES = {
    "cls": "cls_token",
    "mean": "mean_tokens",
    "max": "max_tokens",
    "mean_sqrt_len": "mean_sqrt_len_tokens",
}


def describe_model(local_dir: Path, task: str | None = None) -> dict[str, object]:
    """Manifest fields read from a model directory: a sentence-transformers or Hugging Face transformers
    layout. The task is `rerank` for a cross-encoder (a `...ForSequenceClassification` with one label,
    whose `dims` is its one score) and `embed` otherwise, unless `task` says; NotAModelError says what
    is missing from a directory that is neither."""
    if not local_dir.is_dir():
        raise NotAModelError(f"{local_dir} is not a directory")
    missing = [name for name in ("config.json",) if not (local_dir / name).is_file()]
    if not any((local_dir / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if not any((local_dir / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        missing.append("tokenizer.json or vocab.txt")
    if missing:
        raise NotAModelError(f"{local_dir} is not a transformers model directory: no {', no '.join(missing)}")
    try:
        config = json.loads((local_dir / "config.json").read_text())
        hidden = int(config["hidden_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise NotAModelError(f"{local_dir}/config.json has no readable hidden_size: {exc}") from exc
    classifier = any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or [])
    labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 1)
    task = task or ("rerank" if classifier and labels == 1 else "embed")
    if task not in TASKS:
        raise NotAModelError(f"task {task!r} is not one of {', '.join(TASKS)}")
    max_tokens = config.get("max_position_embeddings")
    if task == "rerank":
        if not classifier:
            raise NotAModelError(
                f"{local_dir} is not a cross-encoder: config.json's architectures name no ...ForSequenceClassification"
            )
        if labels != 1:
            raise NotAModelError(
                f"{local_dir} classifies into {labels} labels; a reranker gives one relevance score (num_labels=1)"
            )
        return {"framework": "transformers", "task": task, "dims": 1, "max_tokens": max_tokens, "pooling": None}
    st_config = local_dir / "sentence_bert_config.json"
    if st_config.is_file():
        max_tokens = json.loads(st_config.read_text()).get("max_seq_length", max_tokens)
    pooling = "mean"  # what the replicas do for a plain transformers model
    pooling_config = local_dir / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        modes = json.loads(pooling_config.read_text())
        pooling = next((name for name, key in POOLING_MODES.items() if modes.get(f"pooling_mode_{key}")), pooling)
    return {
        "framework": "transformers",
        "task": task,
        "dims": hidden,
        "max_tokens": int(max_tokens) if max_tokens else None,
        "pooling": pooling,
    }
