"""The ONNX Runtime backend: a model version's transformer exported to ONNX at push, run on CPU.

`models push` exports the transformer of a model directory (its token vectors for an embedding
model, its logits for a cross-encoder) with `torch.onnx.export`, and stores the file beside the
safetensors as `onnx/model.onnx`, listed in the manifest with its sha256. Before anything is
pushed, the export is run on CHECK_TEXTS next to torch through the same engine code (tokenizer,
pooling, normalisation, sigmoid), and the push fails if any output differs by more than
MAX_DIFFERENCE. The manifest records that difference (`onnx_max_difference`): replicas use ONNX
Runtime only for a version whose export was checked (backend `auto` on CPU, or `onnx`).

torch stays the exporter and the CUDA path; the tokenizer and the pooling are the engines' own, so
only the transformer's forward pass changes backend.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

logger = logging.getLogger(__name__)

ONNX_FILE = "onnx/model.onnx"
MAX_DIFFERENCE = 1e-4
OPSET = 18
BACKENDS = ("auto", "torch", "onnx")

# What the check runs: short and long, punctuation, digits, other scripts, an empty-ish text.
CHECK_TEXTS = [
    "The giant panda lives in the mountains of central China.",
    "Bamboo makes up almost all of its diet.",
    "x",
    "What do pandas eat?",
    "Paris is the capital and most populous city of France, with an estimated population of two million.",
    "Ein Satz auf Deutsch, mit Umlauten: Größe, Übung, Ärger.",
    "日本語のテキストも埋め込めます。",
    "Numbers 12, 3.5 and 1,000,000; symbols #@%&*!",
    "a " * 300,  # longer than most models read: truncated
    "Emoji too 🐼🎋",
    "Short.",
    "A sentence of medium length about serving models behind HTTP with batching.",
]
CHECK_QUERY = "what do pandas eat?"


class OnnxRunner:
    """An ONNX Runtime session that takes the tokenizer's torch tensors and gives its first output back
    as a torch tensor, so the engines pool and score exactly as they do with torch."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        from deployments.engines import intra_op_threads

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads(threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch) -> torch.Tensor:
        feeds = {name: batch[name].cpu().numpy().astype(np.int64) for name in self.input_names}
        return torch.from_numpy(self.session.run(None, feeds)[0])


class _Forward(torch.nn.Module):
    """The transformer's forward pass as the export sees it: token vectors, or a classifier's logits."""

    def __init__(self, model: torch.nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        out = self.model(**inputs)
        return out.logits if self.task == "rerank" else out.last_hidden_state


def export(model_dir: Path, task: str, out: Path) -> None:
    """Write the ONNX export of model_dir's transformer to `out` (one file, weights inside)."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model_class = AutoModelForSequenceClassification if task == "rerank" else AutoModel
    model = model_class.from_pretrained(model_dir).eval()
    sample = tokenizer(["a short one", "and a somewhat longer second text"], padding=True, return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    out.parent.mkdir(parents=True, exist_ok=True)
    chatter = io.StringIO()  # the exporter reports each of its steps on stdout, and logs what it skips
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    with (
        torch.no_grad(),
        contextlib.redirect_stdout(chatter),
        warnings.catch_warnings(),
        contextlib.ExitStack() as restore,
    ):
        restore.callback(exporter_log.setLevel, level)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Forward(model, task),
            tuple(sample[n] for n in names),
            str(out),
            input_names=names,
            output_names=["logits" if task == "rerank" else "last_hidden_state"],
            dynamic_shapes=tuple({0: batch, 1: length} for _ in names),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def max_difference(model_dir: Path, task: str, onnx_path: Path) -> float:
    """The largest difference between what the engines compute with torch and with ONNX Runtime, over
    CHECK_TEXTS (pooled, normalised vectors for embed; scores for rerank), in one padded pass and one
    text at a time."""
    from deployments.cross_encoder import CrossEncoder
    from deployments.encoder import SentenceEncoder

    if task == "rerank":
        engines = [CrossEncoder(model_dir), CrossEncoder(model_dir, backend="onnx", onnx_path=onnx_path)]
        items: list = [(CHECK_QUERY, text) for text in CHECK_TEXTS]

        def run(engine, batch):
            return engine.score(batch).scores
    else:
        engines = [SentenceEncoder(model_dir), SentenceEncoder(model_dir, backend="onnx", onnx_path=onnx_path)]
        items = CHECK_TEXTS

        def run(engine, batch):
            return engine.encode(batch).vectors

    # Every shape a replica makes: all the texts in one padded pass, then each alone (batch 1, no padding).
    difference = 0.0
    for forward_batch_size in (len(items), 1):
        for engine in engines:
            engine.forward_batch_size = forward_batch_size
        on_torch, on_onnx = (run(engine, items) for engine in engines)
        difference = max(difference, float(np.abs(on_torch - on_onnx).max()))
    return difference


class ExportError(ValueError):
    """The ONNX export could not be made, or does not compute what torch computes."""


def export_checked(model_dir: Path, task: str, out: Path) -> float:
    """Export model_dir's transformer to `out` (unless `out` exists: an export the directory ships) and
    check it; the difference, or ExportError when it exceeds MAX_DIFFERENCE."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the export and its check load the weights five times: no bars
    if not out.is_file():
        try:
            export(model_dir, task, out)
        except Exception as exc:  # the exporter's many failure types: an unsupported operator, say
            raise ExportError(f"the ONNX export of {model_dir} failed: {type(exc).__name__}: {exc}") from exc
    difference = max_difference(model_dir, task, out)
    if not difference <= MAX_DIFFERENCE:
        raise ExportError(
            f"the ONNX export of {model_dir} differs from torch by {difference:.2e} (more than {MAX_DIFFERENCE:g}); "
            "push with --no-onnx to serve it with torch only"
        )
    return difference


def exported_directory(model_dir: Path, task: str) -> tuple[Path, float, tempfile.TemporaryDirectory | None]:
    """A directory with model_dir's files and a checked onnx/model.onnx: model_dir itself when it ships
    one, else a temporary directory of links to its files plus the export (clean it up when done)."""
    if (model_dir / ONNX_FILE).is_file():
        return model_dir, export_checked(model_dir, task, model_dir / ONNX_FILE), None
    staging = tempfile.TemporaryDirectory(prefix="onnx-export-")
    root = Path(staging.name)
    for path in model_dir.rglob("*"):
        if path.is_file():
            link = root / path.relative_to(model_dir)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
    try:
        difference = export_checked(model_dir, task, root / ONNX_FILE)
    except BaseException:
        staging.cleanup()
        raise
    return root, difference, staging


def choose_backend(wanted: str, device: str, manifest) -> str:
    """torch or onnx: `auto` means ONNX Runtime on CPU for a version with a checked export, torch otherwise."""
    if wanted not in BACKENDS:
        raise ValueError(f"backend {wanted!r} is not one of {', '.join(BACKENDS)}")
    checked = manifest.onnx_max_difference is not None and any(f.path == ONNX_FILE for f in manifest.files)
    if wanted == "torch":
        return "torch"
    if wanted == "onnx":
        if not checked:
            raise ValueError(
                f"{manifest.name}:{manifest.version} has no checked ONNX export (push it with `models push`, "
                "which exports and checks one); use backend torch or auto"
            )
        if device != "cpu":
            raise ValueError(f"backend onnx runs on CPU here; on {device} use torch (or auto)")
        return "onnx"
    return "onnx" if checked and device == "cpu" else "torch"
