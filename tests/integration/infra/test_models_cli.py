"""`python -m cluster models` against the real object store and the running cluster: push (with
progress, idempotent, versions immutable, nothing visible from a push that failed), list, show and
delete (refused for the served version)."""

import json
import shutil
import subprocess
import sys
import uuid

import pytest
from transformers import BertConfig, BertModel

from cluster.seed import default_model_dir
from serve_app.model_repository import ModelRepository, VersionNotFoundError
from serve_app.settings import REPO_ROOT


def models(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster", "models", *argv], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer BERT with random weights, saved by transformers, with the default model's tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-bert")
    source = default_model_dir()
    vocab = len((source / "vocab.txt").read_text().splitlines())
    config = BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, directory / name)
    return directory


@pytest.fixture
def name(settings):
    model = f"itest-model-{uuid.uuid4().hex[:8]}"
    yield model
    repository = ModelRepository.from_settings(settings)
    for manifest in repository.versions(model):
        repository.delete(model, manifest.version)
    for leftover in repository.client.list_objects(settings.model_bucket, f"{model}/", recursive=True):
        repository.client.remove_object(settings.model_bucket, leftover.object_name)  # a failed push's files


def listed(name: str) -> list[dict]:
    answer = models("list", "--json")
    assert answer.returncode == 0, answer.stderr
    return [row for row in json.loads(answer.stdout) if row["name"] == name]


def test_push_list_show_and_delete_a_model(settings, tiny_model, name):
    pushed = models("push", str(tiny_model), "--name", name, "--version", "1")
    assert pushed.returncode == 0, pushed.stderr
    assert f"pushed s3://{settings.model_bucket}/{name}/1/" in pushed.stdout
    assert "overall" in pushed.stderr
    assert "model.safetensors" in pushed.stderr
    assert "ONNX export checked: max difference" in pushed.stderr
    [row] = listed(name)
    stored = {f.path: f.size for f in ModelRepository.from_settings(settings).manifest(name, "1").files}
    size = sum(p.stat().st_size for p in tiny_model.iterdir()) + stored["onnx/model.onnx"]  # the export went up too
    assert (row["version"], row["dims"], row["size"], row["served"]) == ("1", 32, size, "no")

    again = models("push", str(tiny_model), "--name", name, "--version", "1")
    assert again.returncode == 0, again.stderr  # the same files: nothing changes
    (tiny_model / "extra.txt").write_text("another file")
    try:
        changed = models("push", str(tiny_model), "--name", name, "--version", "1")
    finally:
        (tiny_model / "extra.txt").unlink()
    assert changed.returncode == 1
    assert "versions are immutable" in changed.stderr

    assert models("push", str(tiny_model), "--name", name, "--version", "2", "--no-progress").returncode == 0
    shown = models("show", name)
    assert [v["version"] for v in json.loads(shown.stdout)] == ["1", "2"]
    manifest = json.loads(models("show", f"{name}:2").stdout)
    assert manifest["pooling"] == "mean"
    assert manifest["max_tokens"] == 512
    assert {f["path"] for f in manifest["files"]} >= {"config.json", "model.safetensors", "vocab.txt"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])

    deleted = models("delete", f"{name}:1")
    assert deleted.returncode == 0, deleted.stderr
    assert [row["version"] for row in listed(name)] == ["2"]
    repository = ModelRepository.from_settings(settings)
    left = [o.object_name for o in repository.client.list_objects(settings.model_bucket, f"{name}/1/", recursive=True)]
    assert left == [f"{name}/1/deleted.json"]  # every file gone; the tombstone keeps the version from reuse
    with pytest.raises(VersionNotFoundError):
        repository.manifest(name, "1")
    (tiny_model / "extra.txt").write_text("other files")
    try:
        reused = models("push", str(tiny_model), "--name", name, "--version", "1", "--no-progress")
    finally:
        (tiny_model / "extra.txt").unlink()
    assert reused.returncode == 1
    assert "immutable even after a delete" in reused.stderr
    again = models("push", str(tiny_model), "--name", name, "--version", "1", "--no-progress")
    assert again.returncode == 0, again.stderr  # the same files bring the same version back
    assert sorted(row["version"] for row in listed(name)) == ["1", "2"]


def test_the_served_version_is_not_deleted_without_force(settings):
    served = f"{settings.default_model}:{settings.default_model_version}"
    refused = models("delete", served)
    assert refused.returncode == 1
    assert "is served now" in refused.stderr
    [row] = [r for r in listed(settings.default_model) if r["version"] == settings.default_model_version]
    assert row["served"] == "yes"


def test_a_directory_that_is_not_a_model_pushes_nothing(tmp_path, name):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 1024)
    refused = models("push", str(tmp_path), "--name", name, "--version", "1")
    assert refused.returncode == 1
    assert "is not a transformers model directory: no config.json" in refused.stderr
    assert listed(name) == []


def test_a_push_that_fails_half_way_leaves_no_version(settings, tiny_model, name):
    from serve_app.model_repository import describe_model

    repository = ModelRepository.from_settings(settings)
    uploads = []

    def fail_on_the_third_file(file):
        uploads.append(file.path)
        if len(uploads) == 3:
            raise ConnectionError("the network went away")

    with pytest.raises(ConnectionError):
        repository.push(tiny_model, name, "1", progress=fail_on_the_third_file, **describe_model(tiny_model))
    assert list(repository.client.list_objects(settings.model_bucket, f"{name}/1/", recursive=True))  # some went up
    assert repository.versions(name) == []
    assert listed(name) == []
