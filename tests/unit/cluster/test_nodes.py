"""Worker nodes without starting any: the Serve config they get, the ports they are found by, and
the NGINX config that balances over them."""

from ray.serve.schema import ServeDeploySchema

from cluster.nodes import RayWorker, proxy_address, proxy_port, worker_index
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
    for name in ("Gateway", "EmbeddingModel", "JobWorker"):
        assert by_name[name]["ray_actor_options"]["runtime_env"]["env_vars"]["INFER_CLUSTER_NODES"] == "2:abc"
    assert by_name["JobWorker"]["autoscaling_config"]["min_replicas"] == 2  # jobs go on when a node is lost
    # One replica per node, whatever order Ray places them in; none capped on one node.
    assert {by_name[name]["max_replicas_per_node"] for name in ("Gateway", "EmbeddingModel", "JobWorker")} == {1}
    assert all("max_replicas_per_node" not in d for d in deployments(load_serve_config(settings)).values())
    assert deployments(load_serve_config(settings))["JobWorker"]["autoscaling_config"]["min_replicas"] == 1
    other = deployments(load_serve_config(settings, nodes=2, node_set="def"))
    assert other["EmbeddingModel"] != by_name["EmbeddingModel"], "a new node set must change the config"
    assert deployments(load_serve_config(settings, nodes=3))["Gateway"]["num_replicas"] == 2


def test_a_worker_node_is_found_by_its_resource_and_its_proxy_by_its_index():
    settings = ClusterSettings(node_network="colocated")
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


def test_nginx_balances_over_the_given_proxies_and_retries_only_pure_posts_after_sending(tmp_path):
    settings = ClusterSettings(state_dir=tmp_path, nginx_upstreams=["127.0.0.1:8000", "127.0.0.1:8101"])
    rendered = Nginx("nginx", settings).render()
    assert "server 127.0.0.1:8000 max_fails=3 fail_timeout=10s;" in rendered
    assert "server 127.0.0.1:8101 max_fails=3 fail_timeout=10s;" in rendered
    embeddings = rendered.split("location ~ ^/v1/(embeddings|rerank)$ {", 1)[1].split("}", 1)[0]
    assert "proxy_next_upstream error timeout http_502 http_500 non_idempotent;" in embeddings
    rest = (
        rendered.split("location ~ ^/v1/(embeddings|rerank)$ {", 1)[0]
        + rendered.split("location ~ ^/v1/(embeddings|rerank)$ {", 1)[1][len(embeddings) :]
    )
    assert rendered.count("non_idempotent") == 2  # the HTTP and the HTTPS server's embeddings location
    assert "proxy_next_upstream error timeout http_502;" in rest


def test_tls_can_be_turned_off_from_the_environment(monkeypatch):
    for value in ("off", "null", "None"):
        monkeypatch.setenv("INFER_NGINX_TLS_PORT", value)
        assert ClusterSettings().nginx_tls_port is None
    monkeypatch.setenv("INFER_NGINX_TLS_PORT", "9443")
    assert ClusterSettings().nginx_tls_port == 9443


def test_the_netns_layout_puts_the_head_on_the_bridge_and_each_worker_at_an_address_of_its_own():
    settings = ClusterSettings(node_network="netns", node_subnet="10.88.0.0/24")
    assert settings.netns_layout
    assert settings.bridge_address == "10.88.0.1"
    assert settings.ray_node_ip == "10.88.0.1"  # the head is dialled over the bridge
    node = RayWorker("ray-worker-2", settings, index=2)
    assert node.namespace.name == "infer-node-2"
    assert node.namespace.address == "10.88.0.12"
    assert node.head_address == f"10.88.0.1:{settings.ray_gcs_port}"
    assert node.namespace.exec_argv(["ray", "start"]) == ["ip", "netns", "exec", "infer-node-2", "ray", "start"]
    # NGINX reaches the head's proxy on loopback, a worker's at the worker's address (its namespace forwards it).
    head = {"node_ip": "10.88.0.1", "resources_total": {"CPU": 2.0}}
    worker = {"node_ip": "10.88.0.12", "resources_total": {"infer_worker_2": 1.0}}
    assert proxy_address(settings, head) == f"127.0.0.1:{settings.serve_port}"
    assert proxy_address(settings, worker) == f"10.88.0.12:{settings.worker_proxy_port_base + 2}"


def test_in_the_netns_layout_the_stores_listen_on_the_bridge_too_and_workers_dial_them_there():
    settings = ClusterSettings(
        node_network="netns",
        redis_url="redis://127.0.0.1:6390/2",
        mongo_url="mongodb://user:pw@localhost:27018/?directConnection=true",
        rabbitmq_url="amqp://127.0.0.1:5673/infer",
        s3_endpoint="https://s3.example.com",
    )
    assert settings.bind_hosts("127.0.0.1") == ["127.0.0.1", "10.77.0.1"]
    assert settings.bind_hosts("192.0.2.7") == ["192.0.2.7"]  # a store elsewhere is left where it is
    assert settings.node_service_env() == {
        "INFER_REDIS_URL": "redis://10.77.0.1:6390/2",
        "INFER_MONGO_URL": "mongodb://user:pw@10.77.0.1:27018/?directConnection=true",
        "INFER_RABBITMQ_URL": "amqp://10.77.0.1:5673/infer",
    }
    colocated = ClusterSettings(node_network="colocated")
    assert colocated.ray_node_ip == "127.0.0.1"
    assert colocated.bridge_address is None
    assert colocated.bind_hosts("127.0.0.1") == ["127.0.0.1"]
    assert colocated.node_service_env() == {}
    assert ClusterSettings(node_network="netns", ray_node_ip="192.0.2.9").ray_node_ip == "192.0.2.9"


def test_a_deploy_carries_the_code_digest_so_changed_code_is_rolled_out(tmp_path):
    from cluster.local import code_digest, with_code_digest

    for directory in ("serve_app", "deployments"):
        (tmp_path / directory).mkdir()
        (tmp_path / directory / "a.py").write_text("x = 1\n")
    before = code_digest(tmp_path)
    (tmp_path / "deployments" / "a.py").write_text("x = 2\n")
    assert code_digest(tmp_path) != before
    config = {"applications": [{"deployments": [{"name": "A"}, {"name": "B", "ray_actor_options": {"num_cpus": 1}}]}]}
    stamped = with_code_digest(config, "abc")
    assert stamped["applications"][0]["runtime_env"]["env_vars"]["INFER_CODE_DIGEST"] == "abc"  # the build
    for deployment in stamped["applications"][0]["deployments"]:
        assert deployment["ray_actor_options"]["runtime_env"]["env_vars"]["INFER_CODE_DIGEST"] == "abc"


def test_the_cluster_is_settled_only_when_every_deployment_is_healthy(monkeypatch):
    from cluster import local

    settings = ClusterSettings()
    state = {"status": "RUNNING", "deployments": {"Gateway": {"status": "HEALTHY"}, "JobWorker": {"status": "HEALTHY"}}}
    monkeypatch.setattr(local, "serve_details", lambda _: {"applications": {settings.serve_app_name: state}})
    assert local.serve_settled(settings)[0]
    state["deployments"]["JobWorker"]["status"] = "UPDATING"  # a replica still loading, /readyz already 200
    settled, said = local.serve_settled(settings)
    assert not settled
    assert "JobWorker" in said
    state["deployments"]["JobWorker"]["status"] = "HEALTHY"
    state["status"] = "DEPLOYING"
    assert not local.serve_settled(settings)[0]

    def unreadable(_):
        raise OSError("dashboard down")

    monkeypatch.setattr(local, "serve_details", unreadable)
    settled, said = local.serve_settled(settings)
    assert not settled
    assert "unread" in said


def test_direct_ingress_sends_nginx_to_each_gateway_replicas_own_port(monkeypatch):
    from cluster import nodes
    from cluster.nodes import ingress_upstreams, live_upstreams
    from cluster.services import ray_env

    settings = ClusterSettings(ray_node_ip="10.77.0.1")
    assert settings.serve_direct_ingress, "direct ingress is the default"
    env = ray_env(settings)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == (
        "30000",
        "31000",
    )
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "10"  # two of nginx-sync's reads
    assert "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in ray_env(ClusterSettings(serve_direct_ingress=False))

    def group(*targets, app="inference", protocol="HTTP"):
        return {"app_name": app, "protocol": protocol, "route_prefix": "/", "targets": list(targets)}

    def replica(ip, port):
        return {"ip": ip, "port": port, "instance_id": "", "name": f"SERVE_REPLICA::inference#Gateway#{port}"}

    # The shape Ray 2.60's dashboard serves at /api/serve/applications/ (target_groups).
    details = {
        "target_groups": [
            group(replica("10.77.0.1", 30001), replica("10.77.0.11", 30000)),
            group(replica("10.77.0.1", 40000), protocol="gRPC"),
            group(replica("10.77.0.1", 30009), app="another"),
        ],
        "proxies": {"head-id": {"status": "HEALTHY"}},
    }
    # This machine's node is reached at Serve's host (the replica binds it), another node at its address.
    assert ingress_upstreams(settings, details) == ["10.77.0.11:30000", "127.0.0.1:30001"]
    # No replica running: Ray names the head's proxy instead, and the proxies are used.
    proxy = {"ip": "10.77.0.1", "port": 8000, "instance_id": "", "name": "SERVE_PROXY_ACTOR-abc"}
    assert ingress_upstreams(settings, {"target_groups": [group(proxy)]}) is None
    assert ingress_upstreams(settings, {}) is None

    # NGINX's list: the replicas' ports first, the head's proxy as their backup; the proxy alone without them.
    head = {"node_id": "head-id", "node_ip": "10.77.0.1", "resources_total": {"CPU": 2.0}}
    monkeypatch.setattr(nodes, "serve_details", lambda _settings: details)
    assert live_upstreams(settings, [head]) == ["10.77.0.11:30000", "127.0.0.1:30001", "127.0.0.1:8000 backup"]
    monkeypatch.setattr(nodes, "serve_details", lambda _settings: {"proxies": details["proxies"]})
    assert live_upstreams(settings, [head]) == ["127.0.0.1:8000"]
    monkeypatch.setattr(nodes, "serve_details", lambda _settings: details)
    assert live_upstreams(settings.model_copy(update={"serve_direct_ingress": False}), [head]) == ["127.0.0.1:8000"]


def test_a_node_namespace_forwards_the_proxy_port_and_the_replicas_ports_to_its_loopback(monkeypatch):
    from cluster import netns

    calls = []

    def run(argv, **kwargs):
        calls.append((argv, kwargs.get("input")))
        return type("Done", (), {"returncode": 0, "stderr": "", "stdout": ""})()

    monkeypatch.setattr(netns.subprocess, "run", run)
    namespace = RayWorker("ray-worker-1", ClusterSettings(node_network="netns"), index=1).namespace
    namespace.forward_to_loopback([8101, (30000, 31000)])
    (sysctl, _), (nft, rules) = calls
    assert sysctl[:4] == ["ip", "netns", "exec", "infer-node-1"]
    assert "echo 1 > /proc/sys/net/ipv4/conf/eth0/route_localnet" in sysctl[-1]
    assert nft[:4] == ["ip", "netns", "exec", "infer-node-1"]
    assert nft[-2:] == ["-f", "-"]
    assert 'iifname "eth0" ip daddr 10.77.0.11 tcp dport { 8101, 30000-31000 } dnat to 127.0.0.1' in rules
    # Only what was forwarded reaches loopback from the node network: nothing else addressed to 127.0.0.0/8.
    assert 'iifname "eth0" ip daddr 127.0.0.0/8 ct status dnat accept\n' in rules
    assert 'iifname "eth0" ip daddr 127.0.0.0/8 drop\n' in rules


def test_status_lists_each_deployment_with_its_target_bounds_and_replica_states(monkeypatch):
    from cluster import local

    details = {
        "applications": {
            "inference": {
                "deployments": {
                    "EmbeddingModel": {
                        "status": "UPSCALING",
                        "target_num_replicas": 2,
                        "deployment_config": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}},
                        "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}],
                    },
                    "Gateway": {
                        "status": "HEALTHY",
                        "target_num_replicas": 1,
                        "deployment_config": {"num_replicas": 1},
                        "replicas": [{"state": "RUNNING"}],
                    },
                }
            }
        }
    }
    monkeypatch.setattr(local, "serve_details", lambda _settings: details)
    assert local.deployments(ClusterSettings()) == [
        {
            "name": "EmbeddingModel",
            "status": "UPSCALING",
            "target": 2,
            "bounds": "1-2",
            "replicas": {"RUNNING": 1, "STARTING": 1},
        },
        {"name": "Gateway", "status": "HEALTHY", "target": 1, "bounds": None, "replicas": {"RUNNING": 1}},
    ]
