"""The model engines a replica runs, built for a model version's task, device and backend."""

from __future__ import annotations

import os
from pathlib import Path

from serve_app.model_repository import Manifest


def intra_op_threads(configured: int | None) -> int:
    """The config's threads, else as many as Ray gave the replica (OMP_NUM_THREADS)."""
    return configured or max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1"))))


def build_engine(
    local_dir: Path,
    manifest: Manifest,
    *,
    device: str = "auto",
    backend: str = "auto",
    forward_batch_size: int = 32,
    threads: int | None = None,
):
    """A SentenceEncoder (embed) or CrossEncoder (rerank) for the files in local_dir; `auto` device is CUDA
    where there is one, and `auto` backend is ONNX Runtime on CPU for a version with a checked export."""
    import torch

    from deployments.cross_encoder import CrossEncoder
    from deployments.encoder import SentenceEncoder
    from deployments.onnx_backend import choose_backend

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = choose_backend(backend, device, manifest)
    threads = intra_op_threads(threads)
    if manifest.task == "rerank":
        return CrossEncoder(
            local_dir, device, forward_batch_size, manifest.max_tokens or 512, backend=chosen, threads=threads
        )
    return SentenceEncoder(local_dir, device, forward_batch_size, backend=chosen, threads=threads)
