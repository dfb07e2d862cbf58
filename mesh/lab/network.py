"""The lab's network: an underlay (a bridge in a namespace of its own), nodes as network
namespaces joined to it, each with a pod CIDR routed over the underlay to it.

Addresses (documented in the README): the underlay is 172.30.<lab>.0/24, node i at .10+i,
and the host (the machine running the lab) at .1 through a veth `mlab<lab>` whose other end
is on the underlay's bridge: the host reaches NodePorts and Gateways on the nodes' addresses,
and Gateways on the lab's pool 172.31.<lab>.0/24 through the first node (the route goes with
the veth).
<lab> is the lowest index no running lab uses. A lab's Nodes get their pod CIDRs (/24s of
10.244.0.0/16) from the controller manager (at most 200 nodes; the pod networks of two labs
never meet, so they may repeat). Names carry the
lab's name so two labs and the host's own interfaces never meet; everything is made with
iproute2 and recorded in the lab's state, so `mesh lab down` removes what was made, and
nothing else (the host's veth goes with the underlay's namespace).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass


class LabError(RuntimeError):
    pass


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    cmd = ["ip", "netns", "exec", netns, "ip", *args] if netns else ["ip", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and out.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out.stdout


def sysctl(netns: str, setting: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", setting], check=True,
                   capture_output=True)


@dataclass(frozen=True)
class NodeNet:
    name: str  # also its namespace
    index: int
    underlay_ip: str
    pod_cidr: str


def underlay_ns(lab: str) -> str:
    return f"{lab}-underlay"


def plan(lab: str, nodes: int, lab_index: int = 0) -> list[NodeNet]:
    if not 1 <= nodes <= 200:
        raise LabError("a lab has 1 to 200 nodes")
    return [NodeNet(f"{lab}-node{i}", i, f"172.30.{lab_index}.{10 + i}",
                    f"10.244.{i}.0/24") for i in range(1, nodes + 1)]


def host_link(lab_index: int) -> str:
    return f"mlab{lab_index}"


def host_address(lab_index: int) -> str:
    return f"172.30.{lab_index}.1"


def gateway_pool(lab_index: int) -> str:
    """The agents' address pool for Gateways that ask for no address: served on every node
    (a local route for the whole range on each node's loopback, so Envoy binds any of its
    addresses), and routed from the host to the first node."""
    return f"172.31.{lab_index}.0/24"


def route_pool(pool: str, nodes: list[NodeNet]) -> None:
    for n in nodes:
        ip("route", "add", "local", pool, "dev", "lo", netns=n.name)
    ip("route", "replace", pool, "via", nodes[0].underlay_ip)


def build(lab: str, nodes: list[NodeNet], lab_index: int = 0, routes: bool = True) -> None:
    """The underlay, the host's link to it, and every node; with `routes`, routes to every
    other node's pods (NodeNet.pod_cidr; the lab routes its Nodes' own pod CIDRs instead,
    once the controller manager has given them)."""
    under = underlay_ns(lab)
    ip("netns", "add", under)
    ip("link", "add", "br0", "type", "bridge", netns=under)
    ip("link", "set", "br0", "up", netns=under)
    ip("link", "set", "lo", "up", netns=under)
    host = host_link(lab_index)
    ip("link", "add", host, "type", "veth", "peer", "name", "host", "netns", under)
    ip("link", "set", "host", "master", "br0", "up", netns=under)
    ip("addr", "add", f"{host_address(lab_index)}/24", "dev", host)
    ip("link", "set", host, "up")
    for n in nodes:
        ip("netns", "add", n.name)
        ip("link", "set", "lo", "up", netns=n.name)
        sysctl(n.name, "net.ipv4.ip_forward=1")
        # veth: eth0 in the node, its peer on the underlay's bridge
        peer = f"n{n.index}"
        ip("link", "add", "eth0", "netns", n.name, "type", "veth", "peer", "name", peer,
           "netns", under)
        ip("link", "set", peer, "master", "br0", "up", netns=under)
        ip("addr", "add", f"{n.underlay_ip}/24", "dev", "eth0", netns=n.name)
        ip("link", "set", "eth0", "up", netns=n.name)
    for n in nodes if routes else []:
        for other in nodes:
            if other is not n:
                ip("route", "add", other.pod_cidr, "via", other.underlay_ip, netns=n.name)


def teardown(lab: str, nodes: list[str]) -> list[str]:
    """Remove the lab's namespaces (their links go with them); what could not be removed."""
    left = []
    for ns in [*nodes, underlay_ns(lab)]:
        out = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True,
                             check=False)
        if out.returncode != 0 and "No such file" not in out.stderr:
            left.append(f"{ns}: {out.stderr.strip()}")
    return left


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
