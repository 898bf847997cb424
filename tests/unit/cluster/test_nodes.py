"""Worker nodes without starting any: the Serve config they get, the ports they are found by, and
the NGINX config that balances over them."""

from ray.serve.schema import ServeDeploySchema

from cluster.nodes import RayWorker, proxy_port, worker_index
from cluster.services import Nginx, load_serve_config
from cluster.settings import ClusterSettings


def deployments(config: dict) -> dict:
    return {d["name"]: d for d in config["applications"][0]["deployments"]}


def test_one_node_gets_the_serve_config_as_written():
    config = load_serve_config(ClusterSettings())
    ServeDeploySchema.model_validate(config)
    assert all("runtime_env" not in d.get("ray_actor_options", {}) for d in deployments(config).values())
    assert deployments(config)["Gateway"]["num_replicas"] == 1


def test_more_nodes_spread_the_gateway_and_the_model_and_a_new_node_set_restarts_them():
    settings = ClusterSettings()
    two = load_serve_config(settings, nodes=2, node_set="abc")
    ServeDeploySchema.model_validate(two)
    by_name = deployments(two)
    assert by_name["Gateway"]["num_replicas"] == 2
    for name in ("Gateway", "EmbeddingModel"):
        assert by_name[name]["ray_actor_options"]["runtime_env"]["env_vars"]["INFER_CLUSTER_NODES"] == "2:abc"
    assert "runtime_env" not in by_name["JobWorker"].get("ray_actor_options", {})
    other = deployments(load_serve_config(settings, nodes=2, node_set="def"))
    assert other["EmbeddingModel"] != by_name["EmbeddingModel"], "a new node set must change the config"
    assert deployments(load_serve_config(settings, nodes=3))["Gateway"]["num_replicas"] == 2


def test_a_worker_node_is_found_by_its_resource_and_its_proxy_by_its_index():
    settings = ClusterSettings()
    head = {"resources_total": {"CPU": 2.0, "node:__internal_head__": 1.0}}
    worker = {"resources_total": {"CPU": 1.0, "infer_worker_3": 1.0}}
    assert worker_index(head) is None
    assert worker_index(worker) == 3
    assert proxy_port(settings, head) == settings.serve_port
    assert proxy_port(settings, worker) == settings.worker_proxy_port_base + 3
    node = RayWorker("ray-worker-3", settings, index=3)
    assert node.proxy_port == proxy_port(settings, worker)
    assert node.resource in worker["resources_total"]
    assert node.head_address == f"[::ffff:127.0.0.1]:{settings.ray_gcs_port}"  # where the loopback GCS listens


def test_nginx_balances_over_the_given_proxies_and_retries_only_embeddings_after_sending(tmp_path):
    settings = ClusterSettings(state_dir=tmp_path, nginx_upstreams=["127.0.0.1:8000", "127.0.0.1:8101"])
    rendered = Nginx("nginx", settings).render()
    assert "server 127.0.0.1:8000 max_fails=3 fail_timeout=10s;" in rendered
    assert "server 127.0.0.1:8101 max_fails=3 fail_timeout=10s;" in rendered
    embeddings = rendered.split("location = /v1/embeddings {", 1)[1].split("}", 1)[0]
    assert "proxy_next_upstream error timeout http_502 non_idempotent;" in embeddings
    rest = (
        rendered.split("location = /v1/embeddings {", 1)[0]
        + rendered.split("location = /v1/embeddings {", 1)[1][len(embeddings) :]
    )
    assert rendered.count("non_idempotent") == 2  # the HTTP and the HTTPS server's embeddings location
    assert "proxy_next_upstream error timeout http_502;" in rest


def test_tls_can_be_turned_off_from_the_environment(monkeypatch):
    for value in ("off", "null", "None"):
        monkeypatch.setenv("INFER_NGINX_TLS_PORT", value)
        assert ClusterSettings().nginx_tls_port is None
    monkeypatch.setenv("INFER_NGINX_TLS_PORT", "9443")
    assert ClusterSettings().nginx_tls_port == 9443
