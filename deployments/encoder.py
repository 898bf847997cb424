"""Sentence encoder: a transformer with pooling and normalisation, loaded from a local directory.

The directory is a sentence-transformers layout (config.json, model.safetensors, tokenizer
files, 1_Pooling/config.json, modules.json, sentence_bert_config.json); the encoder
reproduces what sentence-transformers computes from it without importing that library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Weights only ever come from a local directory: never let transformers reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformers import AutoModel, AutoTokenizer

POOLING_MODES = ("mean", "cls", "max")


@dataclass(frozen=True)
class EncoderSpec:
    """How a model directory says its embeddings are made."""

    pooling: str
    normalize: bool
    max_seq_length: int

    @classmethod
    def from_directory(cls, model_dir: Path) -> EncoderSpec:
        pooling = "mean"
        pooling_config = model_dir / "1_Pooling" / "config.json"
        if pooling_config.exists():
            config = json.loads(pooling_config.read_text())
            pooling = next(
                (
                    mode
                    for mode in POOLING_MODES
                    if config.get(f"pooling_mode_{mode}_token") or config.get(f"pooling_mode_{mode}_tokens")
                ),
                "mean",
            )
        normalize = False
        modules = model_dir / "modules.json"
        if modules.exists():
            normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
        max_seq_length = 512
        st_config = model_dir / "sentence_bert_config.json"
        if st_config.exists():
            max_seq_length = int(json.loads(st_config.read_text()).get("max_seq_length", 512))
        return cls(pooling=pooling, normalize=normalize, max_seq_length=max_seq_length)


def forward_by_length(
    items: list, lengths: list[int], batch_size: int, forward: Callable, shape: tuple[int, ...]
) -> tuple[np.ndarray, list[int]]:
    """`forward` over items in passes of batch_size, longest first so each pass pads as little as possible;
    (its values, of `shape` each, and token counts) in the order given."""
    order = sorted(range(len(items)), key=lengths.__getitem__, reverse=True)
    values = np.empty((len(items), *shape), dtype=np.float32)
    token_counts = [0] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        values[chunk], chunk_tokens = forward([items[i] for i in chunk])
        for i, count in zip(chunk, chunk_tokens, strict=True):
            token_counts[i] = count
    return values, token_counts


def transformer(model_dir: Path, model_class, device, backend: str, onnx_path: Path | None, threads: int | None):
    """(a callable from the tokenizer's batch to the transformer's first output, the model's config), run
    by torch or by ONNX Runtime (deployments/onnx_backend.py) on the export beside the weights."""
    from transformers import AutoConfig

    if backend == "onnx":
        from deployments.onnx_backend import ONNX_FILE, OnnxRunner

        if device.type != "cpu":
            raise ValueError(f"backend onnx runs on CPU here, not {device}")
        return OnnxRunner(onnx_path or model_dir / ONNX_FILE, threads), AutoConfig.from_pretrained(model_dir)
    if backend != "torch":
        raise ValueError(f"backend {backend!r} is not torch or onnx")
    model = model_class.from_pretrained(model_dir).to(device).eval()

    def forward(batch) -> torch.Tensor:
        out = model(**batch)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    return forward, model.config


class TokenCounter:
    """Counts the tokens each input is to the model (special tokens in, after truncation), on its own copy of
    the model's fast tokenizer, with truncation set once and no padding.

    The forward pass calls the engine's tokenizer with padding, and transformers sets padding and truncation
    on the shared Rust tokenizer at every call. A count on that same object from another thread (a long
    request is counted off the event loop) could read padded lengths, or leave the forward pass an unpadded
    batch that fails ("Unable to create tensor"): measured, dozens of failed passes in 10 s. Encoding here
    changes nothing on this copy, so any number of threads may count beside the forward pass.
    """

    def __init__(self, tokenizer, max_length: int, strategy: str = "longest_first") -> None:
        self._max_length, self._strategy = max_length, strategy
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:  # a tokenizer without a Rust one (a Python or SentencePiece backend): a copy, in turn
            import copy
            import threading

            self._slow, self._lock = copy.deepcopy(tokenizer), threading.Lock()
            return
        from tokenizers import Tokenizer

        self._slow = None
        self._tokenizer = Tokenizer.from_str(backend.to_str())
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length, strategy=strategy)

    def __call__(self, items: list) -> list[int]:
        """Tokens per item: a text, or a (query, document) pair."""
        if self._slow is not None:
            pairs = bool(items) and isinstance(items[0], tuple | list)
            args = ([q for q, _ in items], [d for _, d in items]) if pairs else (items,)
            with self._lock:
                ids = self._slow(*args, truncation=self._strategy, max_length=self._max_length)["input_ids"]
            return [len(one) for one in ids]
        return [len(encoding.ids) for encoding in self._tokenizer.encode_batch(items, add_special_tokens=True)]


@dataclass(frozen=True)
class Encoded:
    vectors: np.ndarray  # float32, shape (n, dims)
    token_counts: list[int]


class SentenceEncoder:
    """Turns texts into sentence embeddings on one torch device."""

    def __init__(
        self,
        model_dir: Path,
        device: str = "cpu",
        forward_batch_size: int = 32,
        *,
        backend: str = "torch",
        onnx_path: Path | None = None,
        threads: int | None = None,
    ) -> None:
        self.spec = EncoderSpec.from_directory(model_dir)
        self.device = torch.device(device)
        self.forward_batch_size = forward_batch_size
        self.backend = backend
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.transformer, config = transformer(model_dir, AutoModel, self.device, backend, onnx_path, threads)
        self.dims = int(config.hidden_size)
        self.max_tokens = self.spec.max_seq_length  # the longest input it reads, as CrossEncoder says it
        self._count = TokenCounter(self.tokenizer, self.max_tokens)

    def encode(self, texts: list[str]) -> Encoded:
        """Embed texts, in the order given."""
        vectors, token_counts = forward_by_length(
            texts, [len(t) for t in texts], self.forward_batch_size, self._forward, (self.dims,)
        )
        return Encoded(vectors=vectors, token_counts=token_counts)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """The tokens each text is to the model (special tokens in, after truncation): what batches are bounded by.
        Safe from any thread, beside the forward pass (TokenCounter)."""
        return self._count(texts)

    @torch.inference_mode()
    def _forward(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.spec.max_seq_length,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.transformer(batch)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if self.spec.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.spec.pooling == "max":
            pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.spec.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        token_counts = batch["attention_mask"].sum(dim=1).tolist()
        return pooled.float().cpu().numpy(), token_counts
