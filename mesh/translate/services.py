"""Services to L4 frontends: every ClusterIP port with the ready endpoints behind it, for the
datapath (the kube-proxy replacement), and for NodePort and LoadBalancer Services each
nodePort on each of this node's addresses. Headless Services (clusterIP None) and
ExternalName ones have no frontend.

`mesh.dev/lb-algorithm: maglev` (or `random`, the default) on a Service picks how packets
balanced per packet (NodePort traffic from outside the node) choose their backend."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from mesh import ir
from mesh.store import kinds
from mesh.store.store import StoreSnapshot
from mesh.translate import model
from mesh.translate.route_builder import RouteBuilder

LB_ALGORITHM = "mesh.dev/lb-algorithm"
ALGORITHMS = ("random", "maglev")


def translate_services(snapshot: StoreSnapshot, routes: RouteBuilder,
                       node_addresses: frozenset[str] | None = None,
                       redirects: Mapping[tuple[str, int], int] | None = None
                       ) -> tuple[ir.ServiceFrontend, ...]:
    """`node_addresses`: this node's (its Node object's); NodePorts are served on its IPv4
    ones other than loopback and link-local. `redirects`: the (ClusterIP, port) frontends
    whose TCP connections go to the node Envoy's mesh listener, on that port."""
    redirects = redirects or {}
    out: list[ir.ServiceFrontend] = []
    external = sorted(a for a in node_addresses or () if _node_port_address(a))
    for obj in snapshot.of_kind(kinds.SERVICE):
        ip = obj.spec.get("clusterIP")
        if not isinstance(ip, str):
            continue
        try:
            address = ipaddress.IPv4Address(ip)
        except ValueError:
            continue  # None (headless), empty, or IPv6 (not yet)
        svc = routes.service(obj.namespace, obj.name)
        if svc is None or svc.type == "ExternalName":
            continue
        algorithm = obj.annotations.get(LB_ALGORITHM, "random")
        problem = ""
        if algorithm not in ALGORITHMS:
            problem = (f"annotation {LB_ALGORITHM}: {str(algorithm)[:64]!r} is not one of "
                       f"{', '.join(ALGORITHMS)}; balanced at random")
            algorithm = "random"
        node_ports = _node_ports(obj.spec) if svc.type in ("NodePort", "LoadBalancer") else {}
        for port in svc.ports:
            if port.protocol not in ("TCP", "UDP") or not 0 < port.port < 65536:
                continue
            backends = tuple(ir.L4Backend(e.address, e.port)
                             for e in routes.endpoints(svc, port)
                             if model.is_ipv4(e.address) and 0 < e.port < 65536)
            owners = frozenset({obj.key})
            proxy = redirects.get((str(address), port.port)) if port.protocol == "TCP" else None
            out.append(ir.ServiceFrontend(str(address), port.port, port.protocol, backends,
                                          owners, algorithm, problem=problem,
                                          proxy_port=proxy))
            node_port = node_ports.get((port.port, port.protocol))
            if node_port is not None:
                out.extend(ir.ServiceFrontend(a, node_port, port.protocol, backends, owners,
                                              algorithm, external=True, problem=problem)
                           for a in external)
    # Two Services asking for one nodePort (the API server would refuse the second): the
    # first by key keeps it.
    unique: dict[tuple[str, int, str], ir.ServiceFrontend] = {}
    for f in sorted(out, key=lambda f: (f.key, sorted(f.owners))):
        unique.setdefault(f.key, f)
    return tuple(unique.values())


def _node_ports(spec: Mapping[str, Any]) -> dict[tuple[int, str], int]:
    out = {}
    ports = spec.get("ports")
    for p in ports if isinstance(ports, list) else ():
        if not isinstance(p, Mapping):
            continue
        number, node_port = p.get("port"), p.get("nodePort")
        if isinstance(number, int) and isinstance(node_port, int) and 0 < node_port < 65536:
            out[(number, str(p.get("protocol") or "TCP"))] = node_port
    return out


def _node_port_address(address: str) -> bool:
    try:
        a = ipaddress.IPv4Address(address)
    except ValueError:
        return False
    return not (a.is_loopback or a.is_link_local or a.is_unspecified)

