"""The production layouts, validated without running them (no container engine, Kubernetes or second
machine here): cluster/kuberay/, cluster/ray-cluster.yaml, cluster/compose.yaml and cluster/Dockerfile.

What can be checked here is checked with the real thing: Ray's own Serve schema for every Serve
config, Ray's own start-up auth check against the environment each Ray process would get, Ray's own
cluster-config schema for `ray up`, the project's own NGINX renderer for every NGINX config, and the
project's settings class for every INFER_* name. What cannot (KubeRay, Kubernetes, Docker) is checked
against field names taken from their documentation, and the files against each other: one image,
one Serve config, every Secret and ConfigMap referenced where it is defined.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.secrets import GENERATED
from cluster.settings import ClusterSettings

REPO = Path(__file__).resolve().parents[3]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"

PROJECT_IMAGE = "registry.example.com/inference-cluster:0.1.0"
BASE_IMAGE = "rayproject/ray:2.60.0-py311-cpu"

# Where the RayService's embedded Serve config may differ from cluster/serve_config.yaml, and
# nowhere else. Each is also named, in the same spelling, in a comment of rayservice.yaml.
EMBEDDED_SERVE_CONFIG_OVERRIDES = {
    ("applications", "inference", "deployments", "EmbeddingModel", "ray_actor_options", "num_gpus"): 1,
}

# Field names of KubeRay's ray.io/v1 RayService, as documented in KubeRay's generated CRD API
# reference at release v1.6.2 (ray-project/kuberay docs/reference/api.md, generated from
# ray-operator/apis/ray/v1/*_types.go; https://github.com/ray-project/kuberay/blob/
# 0a9eabde561ab59ab4bbe626072c359da9214484/docs/reference/api.md, rendered at
# https://docs.ray.io/en/master/cluster/kubernetes/references/api.html).
KUBERAY_FIELDS = {
    "RayService": {"apiVersion", "kind", "metadata", "spec"},
    "RayServiceSpec": {
        "rayClusterDeletionDelaySeconds",
        "serviceUnhealthySecondThreshold",
        "deploymentUnhealthySecondThreshold",
        "serveService",
        "upgradeStrategy",
        "managedBy",
        "serveConfigV2",
        "rayClusterConfig",
        "excludeHeadPodFromServeSvc",
    },
    "RayServiceUpgradeStrategy": {"type", "clusterUpgradeOptions"},
    "RayClusterSpec": {
        "upgradeStrategy",
        "authOptions",
        "suspend",
        "managedBy",
        "autoscalerOptions",
        "headServiceAnnotations",
        "enableInTreeAutoscaling",
        "gcsFaultToleranceOptions",
        "headGroupSpec",
        "rayVersion",
        "workerGroupSpecs",
    },
    "AuthOptions": {"enableK8sTokenAuth", "secretName", "mode"},
    "AutoscalerOptions": {
        "resources",
        "image",
        "imagePullPolicy",
        "securityContext",
        "idleTimeoutSeconds",
        "upscalingMode",
        "version",
        "env",
        "envFrom",
        "volumeMounts",
    },
    "HeadGroupSpec": {
        "template",
        "headService",
        "enableIngress",
        "resources",
        "labels",
        "rayStartParams",
        "serviceType",
    },
    "WorkerGroupSpec": {
        "suspend",
        "groupName",
        "replicas",
        "minReplicas",
        "maxReplicas",
        "idleTimeoutSeconds",
        "resources",
        "labels",
        "rayStartParams",
        "template",
        "scaleStrategy",
        "numOfHosts",
    },
}
KUBERAY_AUTH_MODES = {"disabled", "token"}  # AuthMode, same reference
KUBERAY_TOKEN_KEY = "auth_token"  # "The Secret must have a data key `auth_token`" (AuthOptions.secretName)

# Kubernetes core/v1 PodSpec and Container field names (Kubernetes API reference, workload resources,
# Pod v1: https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/).
POD_SPEC_FIELDS = {
    "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers", "dnsConfig",
    "dnsPolicy", "enableServiceLinks", "ephemeralContainers", "hostAliases", "hostIPC", "hostNetwork",
    "hostPID", "hostUsers", "hostname", "imagePullSecrets", "initContainers", "nodeName", "nodeSelector",
    "os", "overhead", "preemptionPolicy", "priority", "priorityClassName", "readinessGates",
    "resourceClaims", "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates",
    "securityContext", "serviceAccount", "serviceAccountName", "setHostnameAsFQDN",
    "shareProcessNamespace", "subdomain", "terminationGracePeriodSeconds", "tolerations",
    "topologySpreadConstraints", "volumes",
}  # fmt: skip
CONTAINER_FIELDS = {
    "args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle", "livenessProbe", "name",
    "ports", "readinessProbe", "resizePolicy", "resources", "restartPolicy", "securityContext",
    "startupProbe", "stdin", "stdinOnce", "terminationMessagePath", "terminationMessagePolicy", "tty",
    "volumeDevices", "volumeMounts", "workingDir",
}  # fmt: skip

FROM_A_SECRET = "value-from-a-secret"  # stands in for whatever the operator puts in a Secret
CREDENTIAL = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.IGNORECASE)
SETTINGS_NAMES = {f"INFER_{name.upper()}" for name in ClusterSettings.model_fields}


# ---------------------------------------------------------------------------------------------
# Loading


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[dict]:
    """Every object applied to Kubernetes (the example Secrets apart)."""
    return [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in load_all(path)]


def one(kind: str, docs: list[dict] | None = None) -> dict:
    found = [doc for doc in (docs if docs is not None else manifests()) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def secrets_defined() -> dict[str, dict]:
    """name -> the Secret, from cluster/kuberay/examples/secrets.yaml."""
    return {doc["metadata"]["name"]: doc for doc in load_all(KUBERAY / "examples" / "secrets.yaml")}


def secret_keys(secret: dict) -> set[str]:
    return set(secret.get("stringData", {})) | set(secret.get("data", {}))


def config_maps() -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc["data"] for doc in manifests() if doc["kind"] == "ConfigMap"}


def pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template in the manifests."""
    found = []
    for doc in manifests():
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            found.append((f"{name} head", cluster["headGroupSpec"]["template"]["spec"]))
            found += [(f"{name} {g['groupName']}", g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
        elif doc["kind"] in ("Deployment", "Job"):
            found.append((name, doc["spec"]["template"]["spec"]))
    return found


def containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def container_env(container: dict) -> dict[str, str]:
    """The environment Kubernetes gives a container (Secret values stand in as FROM_A_SECRET)."""
    maps, secrets = config_maps(), secrets_defined()
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps[source["configMapRef"]["name"]])
        else:
            env.update(dict.fromkeys(secret_keys(secrets[source["secretRef"]["name"]]), FROM_A_SECRET))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secret_keys(secrets[ref["name"]]), f"{ref} is not defined"
            env[var["name"]] = FROM_A_SECRET
        else:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = maps[ref["name"]][ref["key"]]
    return env


def kuberay_ray_env(container: dict, cluster_spec: dict) -> dict[str, str]:
    """A Ray container's environment, with what KubeRay adds for authOptions: RAY_AUTH_MODE and
    RAY_AUTH_TOKEN (from `secretName`'s `auth_token`, or from a Secret KubeRay generates)."""
    env = container_env(container)
    auth = cluster_spec.get("authOptions")
    if auth is not None and auth.get("mode", "token") == "token":
        if "secretName" in auth:
            assert KUBERAY_TOKEN_KEY in secret_keys(secrets_defined()[auth["secretName"]])
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=FROM_A_SECRET)
    return env


def serve_config_file() -> dict:
    return yaml.safe_load((CLUSTER / "serve_config.yaml").read_text())


def embedded_serve_config() -> dict:
    return yaml.safe_load(one("RayService")["spec"]["serveConfigV2"])


def compose() -> dict:
    return yaml.safe_load((CLUSTER / "compose.yaml").read_text())


def ray_cluster() -> dict:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


def production_layouts_section() -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split("## Production layouts", 1)[1].split("\n## ", 1)[0]


# ---------------------------------------------------------------------------------------------
# Ray's own checks


RAY_AUTH_CHECK = """
import json, os, sys
from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
from ray._raylet import AuthenticationTokenLoader, Config

results = []
for env in json.loads(sys.stdin.read()):
    os.environ.clear()
    os.environ.update(env)
    Config.initialize("")  # RAY_AUTH_MODE is read into Ray's config
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        ensure_token_if_auth_enabled(None, create_token_if_missing=False)  # what `ray start` calls
        results.append(None)
    except Exception as exc:
        results.append(f"{type(exc).__name__}: {exc}")
print(json.dumps(results))
"""


def ray_auth_errors(envs: list[dict[str, str]]) -> list[str | None]:
    """Ray 2.60's start-up check (`ray start --head` and `ray start --address` call
    ensure_token_if_auth_enabled(..., create_token_if_missing=False)) for each environment; None
    where Ray would start. One process, the check's caches reset between environments."""
    result = subprocess.run(
        [sys.executable, "-c", RAY_AUTH_CHECK],
        input=json.dumps(envs),
        env={"PATH": os.environ["PATH"], "HOME": envs[0]["HOME"] if envs else "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def no_token_found() -> str:
    from ray._private.authentication.authentication_constants import (
        TOKEN_AUTH_ENABLED_BUT_NO_TOKEN_FOUND_ERROR_MESSAGE,
    )

    return TOKEN_AUTH_ENABLED_BUT_NO_TOKEN_FOUND_ERROR_MESSAGE


def serve_schema_problems(config: dict) -> list[str]:
    """Validate with Ray's ServeDeploySchema (what `serve deploy` and KubeRay's PUT are checked
    against), then name every key the schema would silently ignore (it allows extra keys)."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    ServeDeploySchema.model_validate(config)
    problems: list[str] = []

    def check(where: str, mapping: dict, model) -> None:
        known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
        problems.extend(f"{where}.{key}" for key in sorted(set(mapping) - known))

    check("", config, ServeDeploySchema)
    check("http_options", config.get("http_options", {}), HTTPOptionsSchema)
    for app in config["applications"]:
        check(app["name"], app, ServeApplicationSchema)
        for deployment in app.get("deployments", []):
            where = f"{app['name']}.{deployment['name']}"
            check(where, deployment, DeploymentSchema)
            check(f"{where}.ray_actor_options", deployment.get("ray_actor_options", {}), RayActorOptionsSchema)
            check(f"{where}.autoscaling_config", deployment.get("autoscaling_config", {}), AutoscalingConfig)
            if deployment["name"] == "EmbeddingModel" or deployment["name"].startswith("Pinned-"):
                # Serve passes user_config through unchecked; the replica's ModelConfig refuses unknown keys.
                from deployments.embedding_model import ModelConfig

                user_config = deployment.get("user_config", {})
                check(f"{where}.user_config", user_config, ModelConfig)
                ModelConfig.model_validate(user_config)
    return problems


def named(items: list[dict], name: str) -> dict:
    (found,) = [item for item in items if item["name"] == name]
    return found


def apply_override(config: dict, path: tuple, value) -> None:
    """Set a value at a path whose list steps are picked by `name` (applications, deployments)."""
    node = config
    for step in path[:-1]:
        node = named(node, step) if isinstance(node, list) else node.setdefault(step, {})
    node[path[-1]] = value


def override_spelling(path: tuple, value) -> str:
    """applications[inference].deployments[EmbeddingModel].ray_actor_options.num_gpus: 1"""
    parts, steps = [], list(path)
    while steps:
        step = steps.pop(0)
        if step in ("applications", "deployments"):
            parts.append(f"{step}[{steps.pop(0)}]")
        else:
            parts.append(step)
    return f"{'.'.join(parts)}: {value}"


# ---------------------------------------------------------------------------------------------
# Serve configs


def test_the_serve_config_passes_rays_serve_schema_with_no_ignored_keys():
    assert serve_schema_problems(serve_config_file()) == []


def test_the_embedded_serve_config_passes_rays_serve_schema_with_no_ignored_keys():
    assert serve_schema_problems(embedded_serve_config()) == []


def test_the_embedded_serve_config_is_the_serve_config_but_for_the_documented_overrides():
    expected = copy.deepcopy(serve_config_file())
    for path, value in EMBEDDED_SERVE_CONFIG_OVERRIDES.items():
        apply_override(expected, path, value)
    assert embedded_serve_config() == expected
    manifest = (KUBERAY / "rayservice.yaml").read_text()
    for path, value in EMBEDDED_SERVE_CONFIG_OVERRIDES.items():
        assert override_spelling(path, value) in manifest, "each override is named in the manifest's comment"


def test_every_deployment_of_the_serve_config_is_embedded():
    def deployments(config: dict) -> list[str]:
        return [d["name"] for app in config["applications"] for d in app["deployments"]]

    assert deployments(embedded_serve_config()) == deployments(serve_config_file())
    assert {"Gateway", "EmbeddingModel", "JobWorker"} <= set(deployments(serve_config_file()))


def test_every_other_layout_deploys_the_serve_config_file_itself():
    serve = compose()["services"]["serve"]
    assert "serve deploy cluster/serve_config.yaml" in " ".join(serve["command"])
    head = ray_cluster()["head_start_ray_commands"]
    assert any("serve deploy cluster/serve_config.yaml" in command for command in head)


# ---------------------------------------------------------------------------------------------
# KubeRay


def unknown_fields(mapping: dict, kind: str, where: str) -> list[str]:
    return [f"{where}.{key}" for key in sorted(set(mapping) - KUBERAY_FIELDS[kind])]


def test_every_kuberay_field_is_one_kuberay_documents():
    service = one("RayService")
    spec, cluster = service["spec"], service["spec"]["rayClusterConfig"]
    problems = unknown_fields(service, "RayService", "RayService")
    problems += unknown_fields(spec, "RayServiceSpec", "spec")
    problems += unknown_fields(spec.get("upgradeStrategy", {}), "RayServiceUpgradeStrategy", "spec.upgradeStrategy")
    problems += unknown_fields(cluster, "RayClusterSpec", "rayClusterConfig")
    problems += unknown_fields(cluster.get("authOptions", {}), "AuthOptions", "authOptions")
    problems += unknown_fields(cluster.get("autoscalerOptions", {}), "AutoscalerOptions", "autoscalerOptions")
    problems += unknown_fields(cluster["headGroupSpec"], "HeadGroupSpec", "headGroupSpec")
    for group in cluster["workerGroupSpecs"]:
        problems += unknown_fields(group, "WorkerGroupSpec", f"workerGroupSpecs[{group['groupName']}]")
    assert problems == []
    assert service["apiVersion"] == "ray.io/v1"
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    assert cluster["authOptions"].get("mode", "token") in KUBERAY_AUTH_MODES
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert all(isinstance(value, str) for group in groups for value in group["rayStartParams"].values())
    assert len({g["groupName"] for g in cluster["workerGroupSpecs"]}) == len(cluster["workerGroupSpecs"])
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


def test_every_pod_and_container_field_is_a_kubernetes_one():
    problems = []
    for where, spec in pod_specs():
        problems += [f"{where}.{key}" for key in sorted(set(spec) - POD_SPEC_FIELDS)]
        for container in containers(spec):
            problems += [f"{where}/{container['name']}.{key}" for key in sorted(set(container) - CONTAINER_FIELDS)]
    assert problems == []


def test_the_ray_version_is_the_one_installed_and_the_base_images():
    import ray

    assert one("RayService")["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    assert BASE_IMAGE.split(":")[1].startswith(f"{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}")


def test_ray_starts_in_every_kuberay_ray_container():
    cluster = one("RayService")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    ray_containers = [c for group in groups for c in group["template"]["spec"]["containers"]]
    for container in ray_containers:
        names = {var["name"] for var in container.get("env", [])} | set(container_env(container))
        assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, "KubeRay sets these from authOptions"
    home = "/nonexistent"  # no ~/.ray/auth_token in a container
    envs = [{"HOME": home, **kuberay_ray_env(c, cluster)} for c in ray_containers]
    assert all(env["RAY_AUTH_MODE"] == "token" for env in envs)
    assert ray_auth_errors(envs) == [None] * len(envs)


def test_the_ray_check_refuses_token_mode_without_a_token():
    """The control: RAY_AUTH_MODE=token alone in a container (what the manifest once had) stops Ray."""
    (error,) = ray_auth_errors([{"HOME": "/nonexistent", "RAY_AUTH_MODE": "token"}])
    assert error is not None
    assert no_token_found() in error


def test_every_secret_and_config_map_is_referenced_where_it_is_defined():
    secrets, maps = secrets_defined(), config_maps()
    used_secrets: set[str] = set()
    for _, spec in pod_specs():
        for container in containers(spec):
            container_env(container)  # every key it reads exists
            used_secrets |= {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
            used_secrets |= {
                v["valueFrom"]["secretKeyRef"]["name"]
                for v in container.get("env", [])
                if "secretKeyRef" in v.get("valueFrom", {})
            }
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])}
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                used_secrets.add(volume["secret"]["secretName"])
            if "configMap" in volume:
                assert volume["configMap"]["name"] in maps
    auth = one("RayService")["spec"]["rayClusterConfig"]["authOptions"]
    used_secrets.add(auth["secretName"])
    ingress = one("Ingress")
    used_secrets |= {tls["secretName"] for tls in ingress["spec"]["tls"]}
    assert used_secrets == set(secrets), "every Secret used is defined, and every one defined is used"
    assert secrets[auth["secretName"]]["type"] == "Opaque"
    for tls in ingress["spec"]["tls"]:
        assert secrets[tls["secretName"]]["type"] == "kubernetes.io/tls"
        assert secret_keys(secrets[tls["secretName"]]) == {"tls.crt", "tls.key"}


def test_example_secrets_hold_no_values():
    for secret in secrets_defined().values():
        assert all(value == "" for value in secret.get("stringData", {}).values()), secret["metadata"]["name"]
        assert "data" not in secret


def test_every_infer_name_in_the_manifests_is_a_setting():
    names: set[str] = set()
    for data in config_maps().values():
        names |= {key for key in data if key.startswith("INFER_")}
    for secret in secrets_defined().values():
        names |= {key for key in secret_keys(secret) if key.startswith("INFER_")}
    for _, spec in pod_specs():
        for container in containers(spec):
            names |= {var["name"] for var in container.get("env", []) if var["name"].startswith("INFER_")}
    assert names - SETTINGS_NAMES == set()


def test_no_credential_is_written_in_a_manifest():
    for name, data in config_maps().items():
        assert not [key for key in data if CREDENTIAL.search(key)], f"ConfigMap {name} holds a credential"
    for where, spec in pod_specs():
        for container in containers(spec):
            for var in container.get("env", []):
                if CREDENTIAL.search(var["name"]):
                    assert "secretKeyRef" in var.get("valueFrom", {}), f"{where}: {var['name']} is not from a Secret"


def test_every_image_is_the_project_image_but_nginx():
    for where, spec in pod_specs():
        for container in containers(spec):
            if container["name"] == "nginx":
                assert container["image"].startswith("nginx:1."), where
            else:
                assert container["image"] == PROJECT_IMAGE, f"{where}/{container['name']}"


def test_the_seed_job_pushes_the_model_with_object_store_credentials_from_the_secret(monkeypatch):
    import importlib.util

    job = one("Job")
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"] == ["python", "-m", "cluster.seed"], "no arguments: the default model"
    assert importlib.util.find_spec("cluster.seed") is not None
    assert container["workingDir"] == "/app"
    assert spec["restartPolicy"] in ("OnFailure", "Never")
    env = container_env(container)
    for name in ("INFER_S3_ACCESS_KEY", "INFER_S3_SECRET_KEY"):
        assert env[name] == FROM_A_SECRET
    assert env["INFER_S3_ENDPOINT"] == config_maps()["inference-settings"]["INFER_S3_ENDPOINT"]
    # The settings the seed reads take the object store's credentials from that environment.
    for name in list(os.environ):
        if name.startswith("INFER_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = ClusterSettings()
    assert settings.s3_access_key == FROM_A_SECRET
    assert settings.s3_secret_key.get_secret_value() == FROM_A_SECRET


def render_nginx_from_the_init_container(monkeypatch, tmp_path: Path) -> tuple[dict, str]:
    deployment = one("Deployment")
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
    env = container_env(init)
    for name in list(os.environ):
        if name.startswith("INFER_"):
            monkeypatch.delenv(name)
    for name, value in {**env, "INFER_STATE_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    run_as = deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert run_as != 0
    monkeypatch.setattr(os, "geteuid", lambda: run_as)  # the renderer asks who will run NGINX
    assert init["command"][:2] == ["python", "-c"]
    exec(compile(init["command"][2], "nginx.yaml:render-config", "exec"), {})  # the manifest's own code
    return env, (tmp_path / "nginx" / "nginx.conf").read_text()


def test_nginx_is_rendered_by_the_projects_renderer_in_front_of_the_serve_service(monkeypatch, tmp_path):
    env, rendered = render_nginx_from_the_init_container(monkeypatch, tmp_path)
    service = one("RayService")
    serve_port = yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"]
    upstream = f"{service['metadata']['name']}-serve-svc:{serve_port}"  # KubeRay's Serve Service
    assert json.loads(env["INFER_NGINX_UPSTREAMS"]) == [upstream]
    assert f"server {upstream} " in rendered
    assert f"listen 0.0.0.0:{env['INFER_NGINX_PORT']} " in rendered
    assert f"listen 0.0.0.0:{env['INFER_NGINX_TLS_PORT']} ssl" in rendered
    assert f"ssl_certificate     {env['INFER_TLS_CERT_FILE']};" in rendered
    assert "return 308" not in rendered, "behind the Ingress, plain HTTP serves the API"
    assert "user root" not in rendered


def test_nginx_runs_the_rendered_config_with_the_tls_secret_and_a_matching_service_and_ingress():
    deployment = one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (nginx,) = pod["containers"]
    state_dir = container_env(init)["INFER_STATE_DIR"]
    prefix = f"{state_dir}/nginx"
    command = " ".join(nginx["command"])
    assert f"nginx -p {prefix} -c {prefix}/nginx.conf" in command
    mount = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert {m["name"]: m["mountPath"] for m in nginx["volumeMounts"]}.items() >= mount.items()
    assert state_dir in mount.values()
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[next(name for name, path in mount.items() if path == state_dir)]
    # The certificate files the config names are the TLS Secret's, mounted where the settings say.
    env = container_env(init)
    tls_mount = next(m for m in nginx["volumeMounts"] if "secret" in volumes[m["name"]])
    tls_secret = volumes[tls_mount["name"]]["secret"]["secretName"]
    assert env["INFER_TLS_CERT_FILE"] == f"{tls_mount['mountPath']}/tls.crt"
    assert env["INFER_TLS_KEY_FILE"] == f"{tls_mount['mountPath']}/tls.key"
    # Service -> pods -> ports; Ingress -> Service, with TLS from the same Secret.
    service, ingress = one("Service"), one("Ingress")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    ports = {p["name"]: p["containerPort"] for p in nginx["ports"]}
    assert ports == {"http": int(env["INFER_NGINX_PORT"]), "https": int(env["INFER_NGINX_TLS_PORT"])}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert nginx["readinessProbe"]["httpGet"]["path"] == "/-/nginx"
    assert [tls["secretName"] for tls in ingress["spec"]["tls"]] == [tls_secret]
    hosts = {host for tls in ingress["spec"]["tls"] for host in tls["hosts"]}
    for rule in ingress["spec"]["rules"]:
        assert rule["host"] in hosts, "every host the Ingress routes is covered by its TLS"
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


# ---------------------------------------------------------------------------------------------
# ray up


def test_ray_cluster_yaml_passes_rays_own_cluster_config_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(ray_cluster())))


def run_as_ray_up_does(command: str, home: Path) -> subprocess.CompletedProcess:
    """Run a command the way `ray up`'s command runner does on a node (Ray's own wrapper: an
    interactive login bash that sources ~/.bashrc), in a scratch home."""
    from ray.autoscaler._private.command_runner import _with_interactive

    home.mkdir(parents=True, exist_ok=True)
    (home / ".bashrc").touch()
    return subprocess.run(
        ["bash", "-c", " ".join(_with_interactive(command))],
        env={"HOME": str(home), "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def write_env_script(home: Path) -> None:
    """Run the setup command that writes ~/infer-env.sh (it only writes that file)."""
    (command,) = [c for c in ray_cluster()["setup_commands"] if "infer-env.sh <<" in c]
    result = run_as_ray_up_does(command, home)
    assert result.returncode == 0, result.stderr
    assert (home / "infer-env.sh").stat().st_mode & 0o077 == 0, "the script is its owner's alone"


REQUIRED_STORE_SETTINGS = {
    "INFER_REDIS_URL": "redis://redis.internal:6379/0",
    "INFER_REDIS_PASSWORD": "redis-secret",
    "INFER_MONGO_URL": "mongodb://mongo.internal:27017/?replicaSet=rs0",
    "INFER_MONGO_PASSWORD": "mongo-secret",
    "INFER_RABBITMQ_URL": "amqp://rabbitmq.internal:5672/infer",
    "INFER_RABBITMQ_PASSWORD": "rabbitmq-secret",
    "INFER_S3_ENDPOINT": "https://minio.internal:9000",
    "INFER_S3_ACCESS_KEY": "s3-access",
    "INFER_S3_SECRET_KEY": "s3-secret",
}


def node_env(home: Path, settings: dict[str, str]) -> subprocess.CompletedProcess:
    (home / "inference.env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in settings.items()))
    return run_as_ray_up_does(". ~/infer-env.sh && env -0", home)


def parsed_env(result: subprocess.CompletedProcess) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return dict(entry.split("=", 1) for entry in result.stdout.split("\0") if "=" in entry)


def test_ray_up_takes_every_credential_from_the_environment_file(tmp_path):
    write_env_script(tmp_path)
    env = parsed_env(node_env(tmp_path, REQUIRED_STORE_SETTINGS))
    assert {k: env[k] for k in REQUIRED_STORE_SETTINGS} == REQUIRED_STORE_SETTINGS
    assert env["RAY_AUTH_MODE"] == "token"
    assert {k for k in env if k.startswith("INFER_")} <= SETTINGS_NAMES
    text = (CLUSTER / "ray-cluster.yaml").read_text()
    for name, value in REQUIRED_STORE_SETTINGS.items():
        if CREDENTIAL.search(name):
            assert f"{name}=" not in text.replace(f"{name}=...", ""), f"{name} is written in ray-cluster.yaml"
            assert value not in text


@pytest.mark.parametrize("missing", ["INFER_S3_ACCESS_KEY", "INFER_S3_SECRET_KEY", "INFER_REDIS_PASSWORD"])
def test_ray_up_stops_when_a_credential_is_missing(tmp_path, missing):
    write_env_script(tmp_path)
    settings = {k: v for k, v in REQUIRED_STORE_SETTINGS.items() if k != missing}
    result = node_env(tmp_path, settings)
    assert result.returncode != 0
    assert f"{missing} is not set" in result.stderr


def test_every_ray_up_command_that_runs_ray_or_project_code_reads_the_environment_first():
    config = ray_cluster()
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if command.endswith("ray stop"):
            continue
        assert ". ~/infer-env.sh && " in command, command
    head = config["head_start_ray_commands"]
    order = [next(i for i, c in enumerate(head) if key in c) for key in ("ray start", "cluster.seed", "serve deploy")]
    assert order == sorted(order), "the model is in the object store before Serve deploys"


def test_ray_starts_on_every_ray_up_node(tmp_path):
    config = ray_cluster()
    write_env_script(tmp_path)
    env = parsed_env(node_env(tmp_path, REQUIRED_STORE_SETTINGS))
    # ~/.ray/auth_token is there only if file_mounts copies it to the node.
    node_home = f"/home/{config['auth']['ssh_user']}"
    if f"{node_home}/.ray/auth_token" in config["file_mounts"]:
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text(FROM_A_SECRET)
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    envs = [{**env, "HOME": str(tmp_path)}] * len(starts)
    assert ray_auth_errors(envs) == [None] * len(starts)
    (tmp_path / ".ray" / "auth_token").unlink()
    (error,) = ray_auth_errors(envs[:1])
    assert error is not None, "without the mounted token Ray would not start: the check is real"


def test_ray_up_renders_and_starts_nginx_with_the_projects_renderer(monkeypatch, tmp_path):
    import cluster.services

    config = ray_cluster()
    (command,) = [c for c in config["head_start_ray_commands"] if "Nginx" in c]
    code = re.search(r'-c "(.*)"$', command).group(1)
    ast.parse(code)
    write_env_script(tmp_path / "home")
    env = parsed_env(node_env(tmp_path / "home", REQUIRED_STORE_SETTINGS))
    for name in list(os.environ):
        if name.startswith("INFER_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("INFER_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("INFER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # NGINX runs as the ssh user, not root
    rendered: list[str] = []
    # ensure() renders, runs `nginx -t` and starts NGINX: here it only renders.
    monkeypatch.setattr(cluster.services.Nginx, "ensure", lambda self: rendered.append(self.render()) or "rendered")
    exec(compile(code, "ray-cluster.yaml:nginx", "exec"), {})
    (text,) = rendered
    provider = config["provider"]
    nodes = [provider["head_ip"], *provider["worker_ips"]]
    serve_port = serve_config_file()["http_options"]["port"]
    assert json.loads(env["INFER_NGINX_UPSTREAMS"]) == [f"{ip}:{serve_port}" for ip in nodes]
    for ip in nodes:
        assert f"server {ip}:{serve_port} " in text
    assert "listen 0.0.0.0:8443 ssl" in text
    assert "return 308 https://" in text, "beyond loopback, plain HTTP redirects to HTTPS"


def test_ray_up_leaves_the_local_state_and_virtualenv_behind():
    assert {".venv", ".cluster"} <= set(ray_cluster()["rsync_exclude"])


# ---------------------------------------------------------------------------------------------
# compose, the Dockerfile and the README: one image


def test_every_compose_build_is_the_dockerfile_and_every_project_service_its_image():
    services = compose()["services"]
    project = {name for name, s in services.items() if "build" in s}
    assert project == {"seed", "serve"}
    for name in project:
        build = services[name]["build"]
        assert (CLUSTER / build["context"] / build["dockerfile"]).resolve() == CLUSTER / "Dockerfile"
        assert services[name]["image"] == PROJECT_IMAGE
    for name, service in services.items():
        command = " ".join(service.get("command", []))
        if re.search(r"python -m cluster|serve deploy|ray start", command):
            assert service["image"] == PROJECT_IMAGE, name
        if name not in project:
            assert "inference-cluster" not in service["image"], name


def test_compose_credentials_are_the_files_make_up_generates_read_as_settings(monkeypatch, tmp_path):
    config = compose()
    for name, secret in config["secrets"].items():
        path = Path(secret["file"])
        assert path.parent == Path("../.cluster/secrets"), name
        assert path.name in GENERATED, f"{name}: cluster/secrets.py does not generate {path.name}"
    for name in ("seed", "serve"):
        service = config["services"][name]
        env = service["environment"]
        assert not [k for k in env if CREDENTIAL.search(k) and not k.endswith("_PATH")], name
        assert set(env) - {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"} <= SETTINGS_NAMES
        secrets_dir = Path(env["INFER_STATE_DIR"]) / "secrets"
        assert secrets_dir == Path("/run/secrets"), "compose mounts secrets there"
        targets = {s["target"]: s["source"] for s in service["secrets"]}
        for target in targets:
            assert target == "ray-token" or f"INFER_{target[len('infer_') :].upper()}" in SETTINGS_NAMES
        # The settings read these files as their secrets dir, so the credentials are not the defaults.
        state = tmp_path / name
        (state / "secrets").mkdir(parents=True)
        for target in targets:
            (state / "secrets" / target).write_text(f"{target}-value")
        for var in list(os.environ):
            if var.startswith("INFER_"):
                monkeypatch.delenv(var)
        monkeypatch.setenv("INFER_STATE_DIR", str(state))
        from serve_app.settings import load_settings

        settings = load_settings(ClusterSettings)
        assert settings.s3_access_key == "infer_s3_access_key-value"
        assert settings.s3_secret_key.get_secret_value() == "infer_s3_secret_key-value"


def test_every_port_compose_publishes_is_on_loopback():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_every_compose_mount_is_a_file_here_or_a_declared_volume():
    config = compose()
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (CLUSTER / source).exists(), f"{name} mounts {source}, which is not in cluster/"
            else:
                assert source in config["volumes"], f"{name} mounts volume {source}, which is not declared"


def test_the_monitoring_services_are_pinned_loopback_read_only_and_grafana_asks_for_its_password():
    config = compose()
    services = config["services"]
    for name in ("prometheus", "grafana"):
        service = services[name]
        assert service["profiles"] == ["monitoring"], name
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", service["image"]), f"{name}: pin a version"
        for volume in service["volumes"]:
            source, _target, *options = volume.split(":")
            if source.startswith(".") or source == "ray-temp":
                assert options == ["ro"], f"{name} mounts {source} writable"
    assert services["grafana"]["image"].startswith("grafana/grafana:11.")
    env = services["grafana"]["environment"]
    (secret,) = services["grafana"]["secrets"]
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == f"/run/secrets/{secret}"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env, "the password comes from the secret file only"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert Path(config["secrets"][secret]["file"]).name in GENERATED
    # Both read the Ray head's temp dir, which the serve service shares.
    assert "ray-temp:/tmp/ray" in services["serve"]["volumes"]


def test_ray_starts_in_the_compose_serve_service(tmp_path):
    service = compose()["services"]["serve"]
    env = {k: str(v) for k, v in service["environment"].items()}
    mounted = {f"/run/secrets/{s['target']}" for s in service["secrets"]}
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] in mounted
    token = tmp_path / "ray-token"
    token.write_text(FROM_A_SECRET)
    (error,) = ray_auth_errors([{**env, "HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(token)}])
    assert error is None


def test_the_dockerfile_the_readme_and_every_layout_name_one_image():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE={BASE_IMAGE}\n" in dockerfile
    assert f"-t {PROJECT_IMAGE} " in dockerfile
    assert "\nWORKDIR /app\n" in dockerfile
    section = production_layouts_section()
    texts = {
        "Dockerfile": dockerfile,
        "README": section,
        "compose": (CLUSTER / "compose.yaml").read_text(),
        "ray-cluster": (CLUSTER / "ray-cluster.yaml").read_text(),
        **{path.name: path.read_text() for path in KUBERAY.glob("*.yaml")},
    }
    for where, text in texts.items():
        assert set(re.findall(r"rayproject/ray:[\w.-]+", text)) <= {BASE_IMAGE}, where
        assert set(re.findall(r"[\w./-]*inference-cluster:[\w.-]+", text)) <= {PROJECT_IMAGE}, where
    assert PROJECT_IMAGE in section
    assert BASE_IMAGE in section


def test_the_readme_says_what_was_checked_here_and_that_nothing_was_run():
    section = production_layouts_section()
    assert "validated, not run" in section
    assert "tests/unit/cluster/test_manifests.py" in section
