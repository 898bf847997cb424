"""Cross-encoder: scores how relevant each document is to a query, from a local model directory.

The directory is a Hugging Face `...ForSequenceClassification` with one label (what
sentence-transformers' CrossEncoder saves). The score is the sigmoid of that label's logit, in
[0, 1], as sentence-transformers' CrossEncoder.predict and text-embeddings-inference return it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from deployments.encoder import TokenCounter, forward_by_length, transformer


@dataclass(frozen=True)
class Scored:
    scores: np.ndarray  # float32, shape (n,)
    token_counts: list[int]


OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")  # position ids start after the padding index


def usable_positions(config, tokenizer) -> int:
    """The longest input the model takes: its tokenizer's limit when it states one, and never more
    position embeddings than it has (RoBERTa-family models lose pad_token_id + 1 of them)."""
    positions = int(getattr(config, "max_position_embeddings", 512))
    if getattr(config, "model_type", "") in OFFSET_POSITIONS:
        positions -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    stated = getattr(tokenizer, "model_max_length", None)
    if isinstance(stated, int) and 0 < stated < 100_000:  # transformers says "no limit" with a huge number
        positions = min(positions, stated)
    return positions


class CrossEncoder:
    """Relevance scores of (query, document) pairs on one torch device."""

    def __init__(
        self,
        model_dir: Path,
        device: str = "cpu",
        forward_batch_size: int = 32,
        max_tokens: int = 512,
        *,
        backend: str = "torch",
        onnx_path: Path | None = None,
        threads: int | None = None,
    ):
        self.device = torch.device(device)
        self.forward_batch_size = forward_batch_size
        self.backend = backend
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.transformer, config = transformer(
            model_dir, AutoModelForSequenceClassification, self.device, backend, onnx_path, threads
        )
        if config.num_labels != 1:
            raise ValueError(f"{model_dir}: a reranker has one label, this model has {config.num_labels}")
        self.max_tokens = min(max_tokens, usable_positions(config, self.tokenizer))
        self.dims = 1  # one relevance score per pair, as SentenceEncoder says its vector width
        self._count = TokenCounter(self.tokenizer, self.max_tokens, "longest_first")

    def score(self, pairs: list[tuple[str, str]]) -> Scored:
        """Scores in the order given."""
        scores, token_counts = forward_by_length(
            pairs, [len(q) + len(d) for q, d in pairs], self.forward_batch_size, self._forward, ()
        )
        return Scored(scores=scores, token_counts=token_counts)

    def count_tokens(self, pairs: list[tuple[str, str]]) -> list[int]:
        """The tokens each pair is to the model (special tokens in, after truncation). Safe from any thread,
        beside the forward pass (TokenCounter)."""
        return self._count(list(pairs))

    @torch.inference_mode()
    def _forward(self, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, list[int]]:
        batch = self.tokenizer(
            [q for q, _ in pairs],
            [d for _, d in pairs],
            padding=True,
            truncation="longest_first",
            max_length=self.max_tokens,
            return_tensors="pt",
        ).to(self.device)
        logits = self.transformer(batch)[:, 0]
        token_counts = batch["attention_mask"].sum(dim=1).tolist()
        return torch.sigmoid(logits).float().cpu().numpy(), token_counts
