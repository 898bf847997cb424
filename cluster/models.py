"""The model repository from the command line (python -m cluster models ...).

python -m cluster models push DIR --name N --version V    # a sentence-transformers / transformers directory
                                                          # (--task embed|rerank; default: from its config.json)
python -m cluster models push --from-package PKG --name N --version V   # an installed model package
python -m cluster models list                             # every model: versions, task, dims, size, served
python -m cluster models show N[:V]                       # one model's versions, or one version's manifest
python -m cluster models delete N:V [--force]             # refused while that version is served
python -m cluster models promote N:V                      # a pinned model serves V (live, no failed request)
python -m cluster models rollback N                       # back to the version served before the last promote
python -m cluster models canary N:V --percent P           # P% of N's requests to V (on demand); --off ends it

A push uploads every file (in parts when big, with a progress bar per file and one overall) and
writes the manifest last: a push that fails half-way leaves no version anyone can see. "Served"
means named by the Serve application Ray runs now (its model and EmbeddingModel's `version`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from tqdm import tqdm

from cluster.settings import ClusterSettings
from serve_app.embeddings.contract import pinned_deployment
from serve_app.model_repository import (
    MANIFEST,
    TASKS,
    Manifest,
    ManifestFile,
    ModelRepository,
    NotAModelError,
    VersionConflictError,
    VersionNotFoundError,
    check_name,
    describe_model,
    sha256_of,
)


class ModelsError(RuntimeError):
    """What the command says and exits 1 with."""


def package_model_dir(package: str) -> Path:
    """The model directory an installed model package holds (`get_model_path()`, or the package's own dir)."""
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        raise ModelsError(f"no installed package {package!r} ({exc}); pip install it first") from exc
    if hasattr(module, "get_model_path"):
        return Path(module.get_model_path())
    return Path(module.__file__).parent


class _Bars:
    """tqdm bars for a push: one per file (minio's progress protocol) and one overall."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.overall = tqdm(total=total, unit="B", unit_scale=True, desc="overall", disable=not enabled, position=0)

    def for_file(self, file: ManifestFile) -> _FileBar:
        return _FileBar(self, file)

    def close(self) -> None:
        self.overall.close()


class _FileBar:
    def __init__(self, bars: _Bars, file: ManifestFile) -> None:
        self.bars = bars
        options = {"unit": "B", "unit_scale": True, "position": 1, "leave": False, "disable": not bars.enabled}
        self.bar = tqdm(total=file.size, desc=file.path, **options)

    def set_meta(self, object_name: str, total_length: int) -> None:
        self.bar.reset(total=total_length)

    def update(self, length: int) -> None:
        self.bar.update(length)
        self.bars.overall.update(length)
        if self.bar.total is not None and self.bar.n >= self.bar.total:
            self.bar.close()


def push(
    settings: ClusterSettings,
    local_dir: Path,
    name: str,
    version: str,
    *,
    task: str | None = None,
    show_progress: bool = False,
    onnx: bool = True,
) -> Manifest:
    """Push a model directory as name:version (idempotent: the same files again change nothing); the
    task is read from the directory (a cross-encoder reranks, anything else embeds) unless given.

    With `onnx`, the transformer is exported to ONNX and checked against torch first
    (deployments/onnx_backend.py), and the export goes up beside the weights; a failed check
    pushes nothing. Pushing the same directory again finds the version it made and exports nothing.
    """
    described = describe_model(local_dir, task)
    repository = ModelRepository.from_settings(settings)
    staging = None
    directory = local_dir
    if onnx:
        existing = _same_version(repository, local_dir, name, version)
        if existing is not None:
            return existing
        from deployments.onnx_backend import exported_directory

        if show_progress:
            print("exporting to ONNX and checking it against torch ...", file=sys.stderr, flush=True)
        directory, described["onnx_max_difference"], staging = exported_directory(local_dir, described["task"])
        if show_progress:
            print(f"ONNX export checked: max difference {described['onnx_max_difference']:.1e}", file=sys.stderr)
    try:
        total = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        bars = _Bars(total, show_progress)
        try:
            return repository.push(directory, name, version, progress=bars.for_file, **described)
        finally:
            bars.close()
    finally:
        if staging is not None:
            staging.cleanup()


def _same_version(repository: ModelRepository, local_dir: Path, name: str, version: str) -> Manifest | None:
    """name:version when it already holds local_dir's files (and the ONNX export a push added); None when
    there is no such version; VersionConflictError when it holds other files."""
    from deployments.onnx_backend import ONNX_FILE

    try:
        existing = repository.manifest(name, version)
    except VersionNotFoundError:
        return None  # a new version (or a deleted one: the push says whether these files may return)
    local = {p.relative_to(local_dir).as_posix(): p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST}
    stored = {f.path: f for f in existing.files if f.path != ONNX_FILE or ONNX_FILE in local}
    same = set(local) == set(stored) and all(
        p.stat().st_size == stored[k].size and sha256_of(p) == stored[k].sha256 for k, p in local.items()
    )
    if not same:  # said before the export, not after it
        raise VersionConflictError(
            f"{repository.uri(name, version)} already holds other files (digest {existing.digest[:12]}); "
            "versions are immutable: push these as a new version"
        )
    return existing


def served_versions(settings: ClusterSettings) -> set[tuple[str, str]] | None:
    """(model, version) of every application Ray serves now; None when Ray does not answer."""
    from cluster.nodes import serve_details

    try:
        applications = serve_details(settings).get("applications") or {}
    except (OSError, ValueError):
        return None
    served = set()
    for app in applications.values():
        config = app.get("deployed_app_config") or {}
        args = config.get("args") or {}
        pins = {
            pinned_deployment(m, args.get("model")): m for m in [args.get("model"), *(args.get("pinned") or [])] if m
        }
        for deployment in config.get("deployments") or []:
            user_config = deployment.get("user_config") or {}
            model = pins.get(deployment.get("name"))
            if model is None:
                continue
            for key in ("version", "canary_version"):  # a canary is served too
                if user_config.get(key) is not None:
                    served.add((model, str(user_config[key])))
    return served


def split_spec(spec: str, *, version_required: bool) -> tuple[str, str | None]:
    name, _, version = spec.partition(":")
    check_name("model name", name)
    if version:
        check_name("version", version)
    elif version_required:
        raise ModelsError(f"{spec!r}: give the version too, as NAME:VERSION")
    return name, version or None


def _served_mark(served: set[tuple[str, str]] | None, name: str, version: str) -> str:
    if served is None:
        return "?"
    return "yes" if (name, version) in served else "no"


def list_models(settings: ClusterSettings) -> list[dict]:
    repository = ModelRepository.from_settings(settings)
    served = served_versions(settings)
    rows = []
    for name in repository.names():
        for manifest in repository.versions(name):
            rows.append(_row(manifest, served))
    return rows


def _row(manifest: Manifest, served: set[tuple[str, str]] | None) -> dict:
    return {
        "name": manifest.name,
        "version": manifest.version,
        "task": manifest.task,
        "dims": manifest.dims,
        "size": manifest.size,
        "digest": manifest.digest[:12],
        "pushed_at": manifest.created.isoformat(timespec="seconds"),
        "served": _served_mark(served, manifest.name, manifest.version),
    }


def delete(settings: ClusterSettings, name: str, version: str, *, force: bool = False) -> Manifest:
    if not force:
        served = served_versions(settings)
        if served is None:
            raise ModelsError("Ray does not answer, so whether this version is served is unknown; --force deletes it")
        if (name, version) in served:
            raise ModelsError(
                f"{name}:{version} is served now; deploy another version first (or --force, and its replicas "
                "fail to start the next time they load it)"
            )
    return ModelRepository.from_settings(settings).delete(name, version)


def running_config(settings: ClusterSettings) -> dict:
    """The Serve config the cluster runs: the one the last deploy rendered, else cluster/serve_config.yaml."""
    import yaml

    from cluster.services import load_serve_config

    rendered = settings.state_dir / "serve_config.yaml"
    if rendered.is_file():
        return yaml.safe_load(rendered.read_text())
    return load_serve_config(settings)


def pinned_user_config(config: dict, name: str) -> dict:
    """The user_config of the deployment that pins `name`: an application's `model` (EmbeddingModel) or one
    of its `pinned` (Pinned-<name>)."""
    for app in config.get("applications", []):
        args = app.get("args") or {}
        if name != args.get("model") and name not in (args.get("pinned") or []):
            continue
        wanted = pinned_deployment(name, args.get("model"))
        for deployment in app.get("deployments", []):
            if deployment.get("name") == wanted:
                return deployment.setdefault("user_config", {})
        deployment = {"name": wanted, "user_config": {}}
        app.setdefault("deployments", []).append(deployment)
        return deployment["user_config"]
    raise ModelsError(
        f"{name!r} is not pinned by the Serve config: an on-demand model serves its newest version, "
        f"or the one a request names ({name}:VERSION)"
    )


def set_served(config: dict, name: str, version: str) -> str | None:
    """Make the pinned `name` serve `version`; the version it served becomes the one to roll back to."""
    user_config = pinned_user_config(config, name)
    current = str(user_config.get("version")) if user_config.get("version") is not None else None
    if current == version:
        return current
    user_config["version"] = version
    if current is not None:
        user_config["previous_version"] = current
    if user_config.get("canary_version") == version:  # the canary is promoted: it is no longer one
        user_config.pop("canary_version", None)
        user_config.pop("canary_percent", None)
    return current


def set_canary(config: dict, name: str, version: str | None, percent: float) -> None:
    user_config = pinned_user_config(config, name)
    if version is None or percent <= 0:
        user_config.pop("canary_version", None)
        user_config.pop("canary_percent", None)
        return
    if not 0 < percent <= 100:
        raise ModelsError(f"--percent {percent:g} must be in (0, 100]")
    if str(user_config.get("version")) == version:
        raise ModelsError(f"{name}:{version} is already the served version; a canary is another one")
    user_config["canary_version"] = version
    user_config["canary_percent"] = percent


def _servable(settings: ClusterSettings, config: dict, name: str, version: str) -> Manifest:
    """The manifest of name:version, which must do what the version served now does (its clients call
    one route: a rerank model cannot replace an embedding model)."""
    repository = ModelRepository.from_settings(settings)
    manifest = repository.manifest(name, version)
    current = pinned_user_config(config, name).get("version")
    if current is not None:
        try:
            served = repository.manifest(name, str(current))
        except VersionNotFoundError:
            return manifest
        if served.task != manifest.task:
            raise ModelsError(f"{name}:{version} is a {manifest.task} model; {name}:{current} is a {served.task} model")
    return manifest


def _apply(settings: ClusterSettings, config: dict, name: str, timeout_s: float = 300) -> None:
    """Deploy the config and wait until the pinned deployment has applied it (its replicas loaded the
    new weights beside the old ones and swapped: no request fails)."""
    import time

    from cluster import local
    from cluster.nodes import serve_details

    local.deploy(settings, config)
    wanted = pinned_user_config(config, name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(1)
        try:
            apps = serve_details(settings).get("applications") or {}
        except (OSError, ValueError):
            continue
        for app in apps.values():
            args = (app.get("deployed_app_config") or {}).get("args") or {}
            if name != args.get("model") and name not in (args.get("pinned") or []):
                continue
            deployment = (app.get("deployments") or {}).get(pinned_deployment(name, args.get("model"))) or {}
            applied = ((deployment.get("deployment_config") or {}).get("user_config")) or {}
            if applied == wanted and app.get("status") == "RUNNING" and deployment.get("status") == "HEALTHY":
                return
    raise ModelsError(f"the cluster did not apply the change to {name} within {timeout_s:g}s (see `make status`)")


def promote(settings: ClusterSettings, name: str, version: str) -> str | None:
    config = running_config(settings)
    _servable(settings, config, name, version)
    previous = set_served(config, name, version)
    if previous != version:
        _apply(settings, config, name)
    return previous


def rollback(settings: ClusterSettings, name: str) -> tuple[str | None, str]:
    config = running_config(settings)
    previous = pinned_user_config(config, name).get("previous_version")
    if not previous:
        raise ModelsError(f"no version of {name} to roll back to: nothing was promoted since the last deploy")
    return promote(settings, name, str(previous)), str(previous)


def canary(settings: ClusterSettings, name: str, version: str | None, percent: float) -> None:
    config = running_config(settings)
    if version is not None and percent > 0:
        _servable(settings, config, name, version)
    set_canary(config, name, version, percent)
    _apply(settings, config, name)


def set_backend(settings: ClusterSettings, name: str, backend: str) -> None:
    """A pinned model's replicas run its forward pass on this backend (auto, torch or onnx), live: each
    builds the new engine beside the old one and swaps, as for a version."""
    from deployments.onnx_backend import BACKENDS

    if backend not in BACKENDS:
        raise ModelsError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    set_user_config(settings, name, backend=backend)


def set_user_config(settings: ClusterSettings, name: str, **values: object) -> None:
    """Change fields of a pinned model's user_config in the running application and wait until every
    replica applied them (what promote, canary and backend do; the benchmark tunes with it)."""
    config = running_config(settings)
    pinned_user_config(config, name).update(values)
    _apply(settings, config, name)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main(argv: list[str], settings: ClusterSettings) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster models", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    push_cmd = commands.add_parser("push", help="upload a model directory as a new version")
    push_cmd.add_argument("directory", nargs="?", type=Path)
    push_cmd.add_argument("--from-package", metavar="PKG", help="an installed model package instead of DIR")
    push_cmd.add_argument("--name", required=True)
    push_cmd.add_argument("--version", required=True)
    push_cmd.add_argument("--task", choices=TASKS, help="what the model does (default: read from its config.json)")
    push_cmd.add_argument("--no-progress", action="store_true", help="no progress bars")
    push_cmd.add_argument(
        "--no-onnx", action="store_true", help="no ONNX export: replicas serve this version with torch only"
    )
    commands.add_parser("list", help="every model version in the repository")
    show_cmd = commands.add_parser("show", help="a model's versions, or one version's manifest")
    show_cmd.add_argument("spec", metavar="NAME[:VERSION]")
    delete_cmd = commands.add_parser("delete", help="remove a version (refused while it is served)")
    delete_cmd.add_argument("spec", metavar="NAME:VERSION")
    delete_cmd.add_argument("--force", action="store_true", help="delete even a served version")
    promote_cmd = commands.add_parser("promote", help="a pinned model serves this version, live")
    promote_cmd.add_argument("spec", metavar="NAME:VERSION")
    rollback_cmd = commands.add_parser("rollback", help="a pinned model goes back to the version before")
    rollback_cmd.add_argument("name", metavar="NAME")
    canary_cmd = commands.add_parser("canary", help="send a share of a pinned model's requests to another version")
    canary_cmd.add_argument("spec", metavar="NAME[:VERSION]")
    canary_cmd.add_argument("--percent", type=float, default=10.0, help="share of requests, 0-100 (default 10)")
    canary_cmd.add_argument("--off", action="store_true", help="end the canary")
    backend_cmd = commands.add_parser("backend", help="what runs a pinned model's forward pass, live")
    backend_cmd.add_argument("name", metavar="NAME")
    backend_cmd.add_argument("backend", choices=("auto", "torch", "onnx"))
    for sub in commands.choices.values():
        sub.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "push":
            if (args.directory is None) == (args.from_package is None):
                parser.error("give a model directory or --from-package PKG (one of them)")
            local_dir = package_model_dir(args.from_package) if args.from_package else args.directory
            manifest = push(
                settings,
                local_dir,
                args.name,
                args.version,
                task=args.task,
                show_progress=not args.no_progress,
                onnx=not args.no_onnx,
            )
            location = ModelRepository.from_settings(settings).uri(manifest.name, manifest.version)
            _print(args, _row(manifest, None) | {"files": len(manifest.files)}, f"pushed {location}")
        elif args.command == "list":
            rows = list_models(settings)
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                head = ("NAME", "VERSION", "TASK", "DIMS", "SIZE", "DIGEST", "PUSHED")
                print("{:<24} {:<10} {:<20} {:>5} {:>10} {:<12}  {:<25} SERVED".format(*head))
                for r in rows:
                    print(
                        f"{r['name']:<24} {r['version']:<10} {r['task']:<20} {r['dims']:>5} {_size(r['size']):>10} "
                        f"{r['digest']:<12}  {r['pushed_at']:<25} {r['served']}"
                    )
        elif args.command == "show":
            name, version = split_spec(args.spec, version_required=False)
            repository = ModelRepository.from_settings(settings)
            if version is None:
                manifests = repository.versions(name)
                if not manifests:
                    raise ModelsError(f"no model {name!r} in {repository.uri(name, '')[:-1]}")
                served = served_versions(settings)
                print(json.dumps([_row(m, served) for m in manifests], indent=2))
            else:
                manifest = repository.manifest(name, version)
                shown = json.loads(manifest.model_dump_json())
                shown |= {"digest": manifest.digest, "size": manifest.size}
                print(json.dumps(shown | {"served": _served_mark(served_versions(settings), name, version)}, indent=2))
        elif args.command == "delete":
            name, version = split_spec(args.spec, version_required=True)
            manifest = delete(settings, name, version, force=args.force)
            _print(args, _row(manifest, None), f"deleted {name}:{version} ({len(manifest.files)} files)")
        elif args.command == "promote":
            name, version = split_spec(args.spec, version_required=True)
            previous = promote(settings, name, version)
            if previous == version:
                print(f"{name} already serves {version}")
            else:
                print(f"{name} serves {version} (was {previous}); undo with: python -m cluster models rollback {name}")
                print("this changes the running cluster; `make deploy` returns to cluster/serve_config.yaml")
        elif args.command == "rollback":
            from_version, to_version = rollback(settings, args.name)
            print(f"{args.name} serves {to_version} again (was {from_version})")
        elif args.command == "backend":
            set_backend(settings, args.name, args.backend)
            print(f"{args.name}: backend {args.backend} on every replica (GET /v1/models shows what each runs)")
            print("this changes the running cluster; `make deploy` returns to cluster/serve_config.yaml")
        elif args.command == "canary":
            name, version = split_spec(args.spec, version_required=not args.off)
            if args.off:
                canary(settings, name, None, 0)
                print(f"{name}: no canary; every request gets the served version")
            else:
                canary(settings, name, version, args.percent)
                print(f"{name}: {args.percent:g}% of requests for {name} go to {version}")
    except (ModelsError, NotAModelError, VersionConflictError, VersionNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _print(args: argparse.Namespace, row: dict, line: str) -> None:
    print(json.dumps(row, indent=2) if args.json else line)
