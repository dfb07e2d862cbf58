"""GAMMA (the Gateway API for a service mesh): the node Envoy's mesh listener, from the
routes whose parent is a Service.

The datapath hands every TCP connection sent to such a Service port (its ClusterIP, however
the client found it: by DNS name or by address) to this one transparent listener; the
connection keeps the ClusterIP:port as its local address, so each Service port is one filter
chain matched by destination. A consumer route's chain also matches the addresses of its
namespace's pods, which makes it more specific than the producer's for those clients alone.
A Service port with consumer routes and no producer route reaches its endpoints as plain
TCP for every other client, as if no route applied.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mesh import ir
from mesh.store import kinds
from mesh.store.objects import ObjectKey
from mesh.store.store import StoreSnapshot
from mesh.translate import model
from mesh.translate.policy_attachment import PolicyIndex
from mesh.translate.route_builder import Resolution, RouteBuilder

# The mesh listener. Bound to the any-address: only there does Envoy read each accepted
# socket's own local address (the original destination the chains match on); bound to one
# address it takes that address for every connection. Connections that come to it directly
# (this node's address:15001) match no chain and are closed. The datapath finds it by
# looking up 127.0.0.1:PORT.
ADDRESS = "0.0.0.0"
PORT = 15001
NAME = "mesh"
KEY_PREFIX = "mesh|"


@dataclass(frozen=True, order=True)
class MeshParent:
    namespace: str
    name: str
    port: int
    consumer: str  # the consumer route's namespace; "" for producer routes


def key(p: MeshParent) -> str:
    """The route builder's listener key of a mesh parent's routes."""
    return f"{KEY_PREFIX}{p.namespace}|{p.name}|{p.port}|{p.consumer}"


def parse_key(text: str) -> MeshParent:
    ns, name, port, consumer = text[len(KEY_PREFIX):].split("|")
    return MeshParent(ns, name, int(port), consumer)


def pod_addresses(snapshot: StoreSnapshot) -> dict[str, list[str]]:
    """Every pod's IPv4 addresses, by namespace (status.podIPs, else status.podIP)."""
    out: dict[str, list[str]] = {}
    for pod in snapshot.of_kind(kinds.POD):
        for a in model.pod_ips(pod.body.get("status")):
            if model.is_ipv4(a):
                out.setdefault(pod.namespace, []).append(a)
    return {ns: sorted(set(v)) for ns, v in out.items()}


VISIBILITY = "mesh.dev/l7-visibility"  # on a Service or a Namespace: "http" (or "none")
_HTTP_APP_PROTOCOLS = frozenset({"http", "http2", "kubernetes.io/h2c", "grpc"})


def _speaks_http(port: model.ServicePort) -> bool:
    """A port that says it carries HTTP: its appProtocol, else its name (`http`, `http-*`,
    `grpc`, `grpc-*`, as meshes read port names). Proxying another protocol as HTTP would
    break it, so nothing is assumed."""
    if port.app_protocol:
        return port.app_protocol.lower() in _HTTP_APP_PROTOCOLS
    name = (port.name or "").lower()
    return any(name == p or name.startswith(p + "-") for p in ("http", "http2", "grpc"))


def visible_services(snapshot: StoreSnapshot, policies: PolicyIndex | None
                     ) -> set[tuple[str, str]]:
    """(namespace, name) of the Services some of whose HTTP may be seen: annotated `http`,
    in a namespace annotated so, or the target of a TrafficPolicy's l7Visibility (each
    port's answer is `port_visible`'s)."""
    namespaces = {ns.name for ns in snapshot.of_kind(kinds.NAMESPACE)
                  if (ns.annotations or {}).get(VISIBILITY) == "http"}
    out = set()
    for svc in snapshot.of_kind(kinds.SERVICE):
        own = (svc.annotations or {}).get(VISIBILITY)
        if own == "http" or (own is None and svc.namespace in namespaces):
            out.add((svc.namespace, svc.name))
    for p in policies.policies if policies else ():
        if p.l7_visibility is not None:
            out.update((p.obj.namespace, t.name) for t in p.targets)
    return out


def port_visible(svc: model.Service, port: model.ServicePort, snapshot: StoreSnapshot,
                 policies: PolicyIndex | None) -> bool:
    """A Service port's HTTP is seen: a TrafficPolicy's l7Visibility decides (the port's,
    then the Service's), else the Service's annotation, else its namespace's."""
    obj = svc.obj
    decided = policies.visibility(obj.namespace, obj.name, port.name) if policies else None
    if decided is not None:
        return decided == "HTTP"
    own = (obj.annotations or {}).get(VISIBILITY)
    if own is not None:
        return bool(own == "http")
    ns = snapshot.get(kinds.NAMESPACE, "", obj.namespace)
    return ns is not None and bool((ns.annotations or {}).get(VISIBILITY) == "http")


def listener(snapshot: StoreSnapshot, routes: RouteBuilder, parents: Iterable[MeshParent]
             ) -> tuple[ir.Listener | None, dict[tuple[str, int], int]]:
    """The mesh listener (None: no mesh route and nothing to see), and the Service frontends
    (ClusterIP, port) whose connections the datapath must hand to it, with its port. A
    Service with L7 visibility gets, on each of its HTTP ports no route has, a chain whose
    one route sends every request to the Service as the datapath would have: Envoy is there
    to log the requests (flows), not to route them."""
    by_port: dict[tuple[str, str, int], set[str]] = {}
    for p in parents:
        by_port.setdefault((p.namespace, p.name, p.port), set()).add(p.consumer)
    visible: dict[tuple[str, str, int], None] = {}
    for ns, name in sorted(visible_services(snapshot, routes.policies)):
        svc = routes.service(ns, name)
        if svc is None:
            continue
        for vport in svc.ports:
            if vport.protocol == "TCP" and _speaks_http(vport) and \
                    (ns, name, vport.port) not in by_port and \
                    port_visible(svc, vport, snapshot, routes.policies):
                by_port[(ns, name, vport.port)] = set()
                visible[(ns, name, vport.port)] = None
    pods: dict[str, list[str]] | None = None
    chains: list[ir.FilterChain] = []
    redirects: dict[tuple[str, int], int] = {}
    for (ns, name, port), consumers in sorted(by_port.items()):
        svc = routes.service(ns, name)
        address = svc.obj.spec.get("clusterIP") if svc is not None else None
        sport = next((p for p in svc.ports if p.port == port), None) if svc else None
        if svc is None or sport is None or sport.protocol != "TCP" or \
                not isinstance(address, str) or not model.is_ipv4(address):
            continue  # headless (no ClusterIP to take the traffic at) or not TCP
        dest = (address, port)
        base = f"mesh/{ns}/{name}:{port}"
        owners = frozenset({svc.obj.key})
        if (ns, name, port) in visible:
            ref = model.BackendObjectRef("", "Service", ns, name, port)
            table = routes.passthrough_table(
                base, routes.backend(ref, svc.obj, Resolution()), owners)
            chains.append(ir.FilterChain(name=base, route_table=table, destination=dest,
                                         owners=owners))
        elif "" in consumers:
            chains.append(_chain(routes, MeshParent(ns, name, port, ""), base, dest, owners))
        else:
            ref = model.BackendObjectRef("", "Service", ns, name, port)
            backend = routes.backend(ref, svc.obj, Resolution())
            chains.append(ir.FilterChain(name=base, destination=dest, owners=owners,
                                         tcp_backends=(ir.WeightedBackend(backend, 1),)))
        for consumer in sorted(consumers - {""}):
            if pods is None:
                pods = pod_addresses(snapshot)
            sources = pods.get(consumer)
            if not sources:
                continue  # no client pod there (yet): nothing to match
            chains.append(_chain(routes, MeshParent(ns, name, port, consumer),
                                 f"{base}@{consumer}", dest, owners,
                                 tuple(f"{a}/32" for a in sources)))
        redirects[dest] = PORT
    if not chains:
        return None, {}
    owners = frozenset(o for c in chains for o in c.owners)
    return ir.Listener(name=NAME, address=ADDRESS, port=PORT, protocol="HTTP",
                       chains=tuple(chains), owners=owners, transparent=True), redirects



def _chain(routes: RouteBuilder, parent: MeshParent, name: str, dest: tuple[str, int],
           owners: frozenset[ObjectKey], sources: tuple[str, ...] = ()) -> ir.FilterChain:
    """A Service port's chain: its HTTP and gRPC routes' table, or, with TCPRoutes alone,
    the oldest TCPRoute's backends (connections proxied as bytes). HTTP routes win over
    TCPRoutes on one port: they say more about the same connections."""
    k = key(parent)
    stream = routes.stream_routes(k)
    if stream and not routes.has_http(k):
        _, backends, route_owners = stream[0]
        return ir.FilterChain(name=name, destination=dest, owners=owners | route_owners,
                              tcp_backends=backends, source_ranges=sources)
    table = routes.http_table(name, [(k, None)], parent.port)
    return ir.FilterChain(name=name, route_table=table, destination=dest, owners=owners,
                          source_ranges=sources)
