"""The netns layout: each worker node in a network namespace of its own, with an address of its own.

Where the bring-up runs as root (and iproute2 is there), the machine gets a private node network,
as a rack of machines would have: a Linux bridge on the host holds the head's address (the first
of INFER_NODE_SUBNET, 10.77.0.1 by default), and worker node i lives in network namespace
`infer-node-<i>`, joined to the bridge by a veth pair, at the subnet's address 10 + i. Traffic
between nodes then crosses a real interface: Ray's head (GCS, raylet, object manager) and the
stateful services listen on the bridge address as well as on loopback, with their credentials, and
a partition is made by taking a node's link down (`link_down`).

Nothing here forwards the node network to the outside: the bridge is not NATed and the host does not
route for it, so only this machine's processes and its node namespaces reach what listens there.

One thing Ray does here that it does not do on loopback: when a node's address is not loopback, its
Prometheus endpoints (the node's metrics, the dashboard's and the autoscaler's) listen on every
address, with no credentials and no setting to say otherwise. `guard_ports` keeps them for this
machine and the node network: an nftables table of ours drops connections to those ports that
arrive on any other interface (what a security group does for a real cluster).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass

BRIDGE = "infer-br0"
NAMESPACE_PREFIX = "infer-node-"
NFT_TABLE = "infer_cluster"  # family inet
FORWARD_TABLE = "infer_node_forward"  # family ip, inside a node's namespace


class NetnsError(RuntimeError):
    """An `ip` command of the netns layout failed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


@functools.lru_cache
def available() -> bool:
    """Whether this process may make namespaces, links and the port guard: root, iproute2 and nftables
    installed, and the kernel's netfilter answering (a container may lack it)."""
    if os.geteuid() != 0 or not all(shutil.which(p) or os.path.exists(f"/usr/sbin/{p}") for p in ("ip", "nft")):
        return False
    try:
        return _nft("list", "tables", check=False).returncode == 0
    except OSError:
        return False


def _nft(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    result = subprocess.run([nft, *args], input=stdin, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetnsError(f"nft {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


def guard_ports(ports: list[int]) -> None:
    """Admit TCP connections to `ports` only from loopback and the node bridge (made or replaced at once)."""
    listed = ", ".join(str(p) for p in sorted(set(ports)))
    chains = f"""
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname != {{ "lo", "{BRIDGE}" }} tcp dport {{ {listed} }} drop
    }}"""
    _nft("-f", "-", stdin=replace_table("inet", NFT_TABLE, chains))


def replace_table(family: str, name: str, chains: str) -> str:
    """An nft script that makes the table or replaces it whole, at once: its chains as given."""
    return f"table {family} {name} {{}}\ndelete table {family} {name}\ntable {family} {name} {{{chains}\n}}\n"


def guarded_ports() -> set[int]:
    """The ports our table guards now (empty when it is not there)."""
    listing = _nft("list", "table", "inet", NFT_TABLE, check=False).stdout
    found = set()
    for line in listing.splitlines():
        if "tcp dport" in line and "drop" in line:
            inside = line.split("tcp dport", 1)[1].split("drop", 1)[0]
            found |= {int(p) for p in inside.replace("{", " ").replace("}", " ").replace(",", " ").split()}
    return found


def remove_guard() -> None:
    _nft("delete", "table", "inet", NFT_TABLE, check=False)


def bridge_address(subnet: ipaddress.IPv4Network) -> str:
    return str(subnet.network_address + 1)


def node_address(subnet: ipaddress.IPv4Network, index: int) -> str:
    return str(subnet.network_address + 10 + index)


def link_exists(name: str, namespace: str | None = None) -> bool:
    prefix = ("-n", namespace) if namespace else ()
    return _ip(*prefix, "link", "show", name, check=False).returncode == 0


def ensure_bridge(subnet: ipaddress.IPv4Network) -> None:
    """The bridge with the head's address, up (made if missing; left as it is if present)."""
    if not link_exists(BRIDGE):
        _ip("link", "add", BRIDGE, "type", "bridge")
    address = f"{bridge_address(subnet)}/{subnet.prefixlen}"
    if address not in _ip("-o", "addr", "show", "dev", BRIDGE).stdout:
        _ip("addr", "add", address, "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")


def remove_bridge() -> None:
    if link_exists(BRIDGE):
        _ip("link", "del", BRIDGE, check=False)


@dataclass(frozen=True)
class NodeNamespace:
    """Worker node `index`'s namespace, its veth pair (host end on the bridge) and its address."""

    subnet: ipaddress.IPv4Network
    index: int

    @property
    def name(self) -> str:
        return f"{NAMESPACE_PREFIX}{self.index}"

    @property
    def host_link(self) -> str:
        return f"infer-veth{self.index}"  # the node's end is `eth0` inside its namespace

    @property
    def address(self) -> str:
        return node_address(self.subnet, self.index)

    def exists(self) -> bool:
        return self.name in _ip("netns", "list", check=False).stdout.split()

    def ensure(self) -> None:
        """The namespace, wired to the bridge, loopback and eth0 up, default route via the head."""
        ensure_bridge(self.subnet)
        if not self.exists():
            _ip("netns", "add", self.name)
        if not link_exists("eth0", self.name):
            _ip("link", "del", self.host_link, check=False)  # a half-made pair from an earlier failure
            _ip("link", "add", self.host_link, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        _ip("link", "set", self.host_link, "master", BRIDGE)
        _ip("link", "set", self.host_link, "up")
        inside = ("-n", self.name)
        address = f"{self.address}/{self.subnet.prefixlen}"
        if address not in _ip(*inside, "-o", "addr", "show", "dev", "eth0").stdout:
            _ip(*inside, "addr", "add", address, "dev", "eth0")
        _ip(*inside, "link", "set", "lo", "up")
        _ip(*inside, "link", "set", "eth0", "up")
        _ip(*inside, "route", "replace", "default", "via", bridge_address(self.subnet))

    def forward_to_loopback(self, ports: list[int | tuple[int, int]]) -> None:
        """Connections that reach the node's address at these ports (a port, or a range low..high) go to the
        same port on the namespace's loopback, where Serve binds (its one HTTP host, loopback, for every
        node): the node's proxy and its gateway replicas' own ports, reached by NGINX over the bridge.

        A DNAT rule in the namespace does it, as a relay would without a process of its own; the kernel
        routes to loopback from eth0 only with `route_localnet` set on it, and an input rule then drops
        anything else from eth0 addressed to loopback, so the rest of the node's loopback-only listeners
        stay unreachable from the node network. Made or replaced at once."""
        listed = ", ".join(str(p) if isinstance(p, int) else f"{p[0]}-{p[1]}" for p in ports)
        sysctl = "/proc/sys/net/ipv4/conf/eth0/route_localnet"
        run = subprocess.run(
            self.exec_argv(["sh", "-c", f"echo 1 > {sysctl}"]), capture_output=True, text=True, check=False
        )
        if run.returncode != 0:
            raise NetnsError(f"{self.name}: setting route_localnet: {run.stderr.strip() or run.returncode}")
        chains = f"""
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "eth0" ip daddr {self.address} tcp dport {{ {listed} }} dnat to 127.0.0.1
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "eth0" ip daddr 127.0.0.0/8 ct status dnat accept
        iifname "eth0" ip daddr 127.0.0.0/8 drop
    }}"""
        rules = replace_table("ip", FORWARD_TABLE, chains)
        nft = shutil.which("nft") or "/usr/sbin/nft"
        run = subprocess.run(self.exec_argv([nft, "-f", "-"]), input=rules, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise NetnsError(f"{self.name}: nft: {run.stderr.strip() or run.returncode}")

    def remove(self) -> None:
        """The namespace and its veth pair, unless a process still runs inside."""
        if remove_namespace(self.name):
            _ip("link", "del", self.host_link, check=False)

    def link_down(self) -> None:
        """A partition: the node's cable pulled, at the host's end."""
        _ip("link", "set", self.host_link, "down")

    def link_up(self) -> None:
        _ip("link", "set", self.host_link, "up")

    def exec_argv(self, argv: list[str]) -> list[str]:
        """argv run inside the namespace (`ip netns exec` execs it: the pid stays the program's)."""
        return ["ip", "netns", "exec", self.name, *argv]


def remove_namespace(name: str) -> bool:
    """Remove a node namespace (and with it its end of the veth pair) unless a process still runs in it."""
    if _ip("netns", "pids", name, check=False).stdout.strip():
        return False
    return _ip("netns", "del", name, check=False).returncode == 0


def namespaces() -> list[str]:
    """Every node namespace on this machine (ours by name)."""
    names = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.split()]
    return [n for n in names if n.startswith(NAMESPACE_PREFIX)]
