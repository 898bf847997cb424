"""The ONNX Runtime backend: an export that computes what torch computes, checked before it is pushed,
and chosen only for a version whose export was checked."""

import shutil

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel, RobertaConfig, RobertaModel

from cluster.seed import default_model_dir
from deployments.cross_encoder import CrossEncoder
from deployments.encoder import SentenceEncoder
from deployments.onnx_backend import (
    CHECK_TEXTS,
    ONNX_FILE,
    ExportError,
    OnnxRunner,
    choose_backend,
    exported_directory,
)
from serve_app.model_repository import Manifest, ManifestFile


def tiny(directory, model_class, config_class=BertConfig, **config):
    source = default_model_dir()
    vocab = len((source / "vocab.txt").read_text().splitlines())
    torch.manual_seed(7)
    model_class(
        config_class(
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            **config,
        )
    ).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("embed"), BertModel)


@pytest.fixture(scope="module")
def exported(embedder):
    directory, difference, staging = exported_directory(embedder, "embed")
    yield directory, difference
    staging.cleanup()


def test_an_embedding_export_equals_torch_and_leaves_the_model_directory_alone(embedder, exported):
    directory, difference = exported
    assert difference <= 1e-4
    assert (directory / ONNX_FILE).is_file()
    assert not (embedder / ONNX_FILE).exists()  # the export goes to a staging copy
    texts = [*CHECK_TEXTS, "not among the check texts, in another batch shape"]
    on_torch = SentenceEncoder(embedder).encode(texts)
    on_onnx = SentenceEncoder(embedder, backend="onnx", onnx_path=directory / ONNX_FILE, threads=1).encode(texts)
    np.testing.assert_allclose(on_onnx.vectors, on_torch.vectors, atol=1e-5)
    assert on_onnx.token_counts == on_torch.token_counts
    # What batches are bounded by is what the forward pass reads (truncation included).
    long = [*texts, "word " * 1000]
    assert SentenceEncoder(embedder).count_tokens(long) == SentenceEncoder(embedder).encode(long).token_counts


def test_a_cross_encoder_export_scores_as_torch_does(tmp_path):
    model_dir = tiny(tmp_path / "rerank", BertForSequenceClassification, num_labels=1)
    directory, difference, staging = exported_directory(model_dir, "rerank")
    try:
        assert difference <= 1e-4
        pairs = [("what do pandas eat?", text) for text in CHECK_TEXTS]
        onnx = CrossEncoder(model_dir, backend="onnx", onnx_path=directory / ONNX_FILE)
        np.testing.assert_allclose(onnx.score(pairs).scores, CrossEncoder(model_dir).score(pairs).scores, atol=1e-5)
    finally:
        staging.cleanup()


def test_a_model_without_token_type_ids_exports_too(tmp_path):
    """RoBERTa's tokenizer gives no token_type_ids: the export takes only what the tokenizer gives."""
    model_dir = tiny(tmp_path / "roberta", RobertaModel, RobertaConfig, pad_token_id=0, type_vocab_size=1)
    (model_dir / "tokenizer_config.json").write_text('{"model_input_names": ["input_ids", "attention_mask"]}')
    directory, difference, staging = exported_directory(model_dir, "embed")
    try:
        assert OnnxRunner(directory / ONNX_FILE).input_names == ["input_ids", "attention_mask"]
    finally:
        staging.cleanup()
    assert difference <= 1e-4


def test_a_shipped_export_that_differs_from_torch_fails_the_check(exported, tmp_path):
    """A directory that ships onnx/model.onnx is checked, not trusted: here the export is of other weights."""
    shipped = tiny(tmp_path / "shipped", BertModel)
    torch.manual_seed(99)
    BertModel(BertModel.from_pretrained(shipped).config).save_pretrained(shipped)  # the same shapes, other weights
    (shipped / "onnx").mkdir()
    shutil.copy(exported[0] / ONNX_FILE, shipped / ONNX_FILE)
    with pytest.raises(ExportError, match="differs from torch by"):
        exported_directory(shipped, "embed")


def manifest(onnx: bool, checked: bool) -> Manifest:
    files = [ManifestFile(path="model.safetensors", size=1, sha256="0" * 64)]
    if onnx:
        files.append(ManifestFile(path=ONNX_FILE, size=1, sha256="1" * 64))
    return Manifest(
        name="m",
        version="1",
        framework="transformers",
        task="embed",
        dims=8,
        files=files,
        created="2026-01-01T00:00:00Z",
        onnx_max_difference=2e-7 if checked else None,
    )


def test_auto_takes_onnx_on_cpu_only_for_a_checked_export_and_torch_on_cuda():
    assert choose_backend("auto", "cpu", manifest(onnx=True, checked=True)) == "onnx"
    assert choose_backend("auto", "cuda", manifest(onnx=True, checked=True)) == "torch"
    assert choose_backend("auto", "cpu", manifest(onnx=True, checked=False)) == "torch"  # pushed over HTTP, say
    assert choose_backend("auto", "cpu", manifest(onnx=False, checked=False)) == "torch"
    assert choose_backend("torch", "cpu", manifest(onnx=True, checked=True)) == "torch"
    with pytest.raises(ValueError, match="no checked ONNX export"):
        choose_backend("onnx", "cpu", manifest(onnx=False, checked=False))
    with pytest.raises(ValueError, match="runs on CPU"):
        choose_backend("onnx", "cuda", manifest(onnx=True, checked=True))


def test_counting_tokens_in_another_thread_never_disturbs_the_forward_pass(embedder):
    """A long request is counted off the event loop while a batch runs: neither may see the other's settings."""
    import threading
    import time

    encoder = SentenceEncoder(embedder)
    texts = [f"text {i} " + "word " * (i * 7 % 300) for i in range(64)]
    expected_counts = encoder.count_tokens(texts)
    expected = encoder.encode(texts[:16])
    failures: list[str] = []
    stop = time.monotonic() + 3

    def count() -> None:
        while time.monotonic() < stop:
            if (counts := encoder.count_tokens(texts)) != expected_counts:
                failures.append(f"counts changed: {counts[:4]}")

    counter = threading.Thread(target=count)
    counter.start()
    try:
        while time.monotonic() < stop:
            try:
                again = encoder.encode(texts[:16])
            except Exception as exc:  # the shared tokenizer left unpadded: "Unable to create tensor"
                failures.append(repr(exc))
                continue
            if again.token_counts != expected.token_counts:
                failures.append(f"forward counts changed: {again.token_counts[:4]}")
    finally:
        counter.join()
    assert not failures, f"{len(failures)} disturbed: {failures[:3]}"


def test_a_tokenizer_without_a_rust_backend_counts_the_same_through_its_own_copy():
    from transformers import BertTokenizerFast

    from deployments.encoder import TokenCounter

    class PythonBackend:
        """A tokenizer with no Rust tokenizer under it (transformers' Python and SentencePiece backends)."""

        def __init__(self, tokenizer) -> None:
            self.tokenizer = tokenizer

        def __call__(self, *args, **kwargs):
            return self.tokenizer(*args, **kwargs)

    fast = BertTokenizerFast.from_pretrained(default_model_dir())
    slow = PythonBackend(BertTokenizerFast.from_pretrained(default_model_dir()))
    texts = ["a", "a short one", "word " * 300]
    pairs = [("what do pandas eat?", text) for text in texts]
    for counter in (TokenCounter(slow, 64), TokenCounter(fast, 64)):
        assert counter(texts) == [len(ids) for ids in fast(texts, truncation=True, max_length=64)["input_ids"]]
        expected = fast([q for q, _ in pairs], [d for _, d in pairs], truncation="longest_first", max_length=64)
        assert counter(pairs) == [len(ids) for ids in expected["input_ids"]]
