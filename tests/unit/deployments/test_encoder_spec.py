import json

import pytest

pytest.importorskip("torch")

from deployments.encoder import EncoderSpec


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def test_reads_pooling_normalisation_and_length(tmp_path):
    write(tmp_path / "1_Pooling" / "config.json", {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    write(tmp_path / "modules.json", [{"type": "sentence_transformers.models.Normalize"}])
    write(tmp_path / "sentence_bert_config.json", {"max_seq_length": 128})
    assert EncoderSpec.from_directory(tmp_path) == EncoderSpec(pooling="cls", normalize=True, max_seq_length=128)


def test_plain_transformer_directory_means_mean_pooling_unnormalised(tmp_path):
    assert EncoderSpec.from_directory(tmp_path) == EncoderSpec(pooling="mean", normalize=False, max_seq_length=512)
