"""The cross-encoder against transformers' own output on the same weights."""

import shutil

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from cluster.seed import default_model_dir
from deployments.cross_encoder import CrossEncoder
from serve_app.model_repository import NotAModelError, describe_model


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-reranker")
    source = default_model_dir()
    vocab = len((source / "vocab.txt").read_text().splitlines())
    torch.manual_seed(7)
    config = BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=1
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, directory / name)
    return directory


def test_scores_equal_transformers_sigmoid_of_the_logit(reranker_dir):
    query = "where do pandas live?"
    documents = ["Pandas live in the mountains of China.", "Paris is in France.", "a", "bamboo " * 40]
    scored = CrossEncoder(reranker_dir, forward_batch_size=3).score([(query, d) for d in documents])
    tokenizer = BertTokenizerFast.from_pretrained(reranker_dir)
    model = BertForSequenceClassification.from_pretrained(reranker_dir).eval()
    with torch.inference_mode():
        expected = [
            torch.sigmoid(model(**tokenizer(query, d, return_tensors="pt", truncation=True)).logits[0, 0]).item()
            for d in documents
        ]
    np.testing.assert_allclose(scored.scores, expected, atol=1e-4)
    assert all(0 <= s <= 1 for s in scored.scores)
    assert scored.token_counts == [len(tokenizer(query, d)["input_ids"]) for d in documents]
    # What batches are bounded by is what the forward pass reads.
    assert CrossEncoder(reranker_dir).count_tokens([(query, d) for d in documents]) == scored.token_counts


def test_a_cross_encoder_directory_is_a_rerank_model(reranker_dir):
    described = describe_model(reranker_dir)
    assert (described["task"], described["dims"], described["pooling"]) == ("rerank", 1, None)
    assert describe_model(default_model_dir())["task"] == "embed"
    with pytest.raises(NotAModelError, match="not a cross-encoder"):
        describe_model(default_model_dir(), "rerank")


def test_a_classifier_with_several_labels_is_not_a_reranker(tmp_path, reranker_dir):
    for f in reranker_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = (tmp_path / "config.json").read_text().replace('"LABEL_0": 0', '"LABEL_0": 0, "LABEL_1": 1')
    config = config.replace('"0": "LABEL_0"', '"0": "LABEL_0", "1": "LABEL_1"')
    (tmp_path / "config.json").write_text(config)
    assert describe_model(tmp_path)["task"] == "embed"  # its encoder embeds, as any transformers model
    with pytest.raises(NotAModelError, match="2 labels"):
        describe_model(tmp_path, "rerank")


def test_a_roberta_reranker_reads_no_more_tokens_than_it_has_positions():
    from types import SimpleNamespace

    from deployments.cross_encoder import usable_positions

    roberta = SimpleNamespace(model_type="xlm-roberta", max_position_embeddings=514, pad_token_id=1)
    assert usable_positions(roberta, SimpleNamespace(model_max_length=10**30)) == 512
    bert = SimpleNamespace(model_type="bert", max_position_embeddings=512, pad_token_id=0)
    assert usable_positions(bert, SimpleNamespace(model_max_length=256)) == 256
