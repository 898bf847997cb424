"""The model repository against the real S3 server."""

import multiprocessing
import os
import uuid
from pathlib import Path

import pytest

from serve_app.model_repository import (
    VERIFIED_MARKER,
    ChecksumMismatchError,
    ModelRepository,
    VersionNotFoundError,
    sha256_of,
)


@pytest.fixture
def repository(settings):
    return ModelRepository.from_settings(settings)


@pytest.fixture
def model_dir(tmp_path):
    root = tmp_path / "model"
    (root / "1_Pooling").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "config.json").write_text('{"hidden_size": 16}')
    (root / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return root


def push(repository, model_dir, name, version="1"):
    return repository.push(model_dir, name, version, framework="test", task="embed", dims=16)


def test_push_writes_files_and_a_manifest_with_sha256(repository, model_dir):
    name = f"test-{uuid.uuid4().hex[:8]}"
    manifest = push(repository, model_dir, name)
    assert {f.path for f in manifest.files} == {"model.safetensors", "config.json", "1_Pooling/config.json"}
    for f in manifest.files:
        assert f.sha256 == sha256_of(model_dir / f.path)
    assert repository.manifest(name, "1") == manifest
    again = push(repository, model_dir, name)
    assert again.created == manifest.created, "an unchanged version is not pushed again"


def test_fetch_downloads_verifies_and_then_reuses_the_cache(repository, model_dir, tmp_path):
    name = f"test-{uuid.uuid4().hex[:8]}"
    manifest = push(repository, model_dir, name)
    local_dir, fetched = repository.fetch(name, "1", tmp_path / "cache")
    assert fetched.digest == manifest.digest
    assert (local_dir / VERIFIED_MARKER).read_text() == manifest.digest
    for f in manifest.files:
        assert (local_dir / f.path).read_bytes() == (model_dir / f.path).read_bytes()
    mtime = (local_dir / "model.safetensors").stat().st_mtime_ns
    repository.fetch(name, "1", tmp_path / "cache")
    assert (local_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_corrupted_object_is_refused(repository, model_dir, tmp_path):
    name = f"test-{uuid.uuid4().hex[:8]}"
    push(repository, model_dir, name)
    tampered = tmp_path / "tampered"
    tampered.write_bytes(b"not the weights")
    repository.client.fput_object(repository.bucket, f"{name}/1/model.safetensors", str(tampered))
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumMismatchError, match=r"model\.safetensors"):
        repository.fetch(name, "1", cache)
    assert not (cache / name / "1" / "model.safetensors").exists()
    assert not (cache / name / "1" / VERIFIED_MARKER).exists()


def test_a_missing_version_is_a_clear_error(repository):
    with pytest.raises(VersionNotFoundError, match="no-such-model"):
        repository.manifest("no-such-model", "1")


class CountingRepository(ModelRepository):
    """Notes every download in a shared file, to count them across processes."""

    log: Path

    def _download_verified(self, key, dest, expected_sha256):
        with self.log.open("a") as fh:
            fh.write(key + "\n")
        super()._download_verified(key, dest, expected_sha256)


def _fetch_in_child(settings, name, cache, log):
    repository = CountingRepository.from_settings(settings)
    repository.log = log
    repository.fetch(name, "1", cache)


def test_replicas_starting_together_download_once_per_node(repository, model_dir, tmp_path, settings):
    name = f"test-{uuid.uuid4().hex[:8]}"
    manifest = push(repository, model_dir, name)
    log = tmp_path / "downloads.log"
    log.touch()
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_fetch_in_child, args=(settings, name, tmp_path / "cache", log)) for _ in range(4)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0, 0, 0, 0]
    assert sorted(log.read_text().split()) == sorted(f"{name}/1/{f.path}" for f in manifest.files)
