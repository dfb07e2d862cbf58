"""UDP listeners (a Gateway's UDP listener, its UDPRoute): Envoy's UDP proxy, a session per
client address and port, each session's datagrams to one upstream endpoint.

The UDP proxy routes to one cluster and has no weighted clusters, so a route with several
weighted backends gets a cluster of its own, each backend one locality weighted as the
route says: a session picks a backend by weight, then an endpoint of it, as the TCP proxy's
weighted clusters do.
"""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.udp.udp_proxy.v3 import route_pb2, udp_proxy_pb2
from google.protobuf import wrappers_pb2
from google.protobuf.message import Message

from mesh import ir
from mesh.sinks.envoy import clusters
from mesh.sinks.envoy import resources as r
from mesh.sinks.envoy.routes import INVALID_BACKEND

WEIGHTED_PREFIX = "udp-weighted/"


def target(li: ir.Listener) -> str:
    """The cluster the listener's sessions go to."""
    live = [b for c in li.chains for b in c.tcp_backends if b.weight > 0]
    if len(live) == 1:
        return live[0].backend or INVALID_BACKEND
    if not live or all(b.backend is None for b in live):
        return INVALID_BACKEND  # no cluster of that name: datagrams are dropped
    return WEIGHTED_PREFIX + li.name


def listener(li: ir.Listener) -> listener_pb2.Listener:
    out = listener_pb2.Listener(name=li.name, address=address_pb2.Address(
        socket_address=address_pb2.SocketAddress(
            protocol=address_pb2.SocketAddress.UDP, address=li.address,
            port_value=li.port)))
    out.udp_listener_config.SetInParent()
    proxy = udp_proxy_pb2.UdpProxyConfig(stat_prefix=li.name.replace(":", "_").replace("/", "_"))
    action = proxy.matcher.on_no_match.action  # every datagram: no matching on UDP
    action.name = "route"
    action.typed_config.Pack(route_pb2.Route(cluster=target(li)))
    f = out.listener_filters.add(name="envoy.filters.udp_listener.udp_proxy")
    f.typed_config.Pack(proxy)
    return out


def weighted_cluster(li: ir.Listener, backends: Mapping[str, ir.Backend]) -> list[Message]:
    """The cluster and endpoints of a listener whose route has several weighted backends
    (none when `target` names a backend's own cluster)."""
    name = target(li)
    if not name.startswith(WEIGHTED_PREFIX):
        return []
    cluster = clusters.cluster(ir.Backend(name=name, endpoints=(), protocol="udp"))
    cluster.common_lb_config.locality_weighted_lb_config.SetInParent()
    localities = []
    for w in (b for c in li.chains for b in c.tcp_backends):
        backend = backends.get(w.backend) if w.backend is not None else None
        if backend is None or w.weight <= 0 or not backend.endpoints:
            continue
        localities.append(endpoint_components_pb2.LocalityLbEndpoints(
            locality=base_pb2.Locality(sub_zone=backend.name),
            load_balancing_weight=wrappers_pb2.UInt32Value(value=w.weight),
            lb_endpoints=[r.lb_endpoint(e.address, e.port) for e in backend.endpoints]))
    return [cluster, endpoint_pb2.ClusterLoadAssignment(cluster_name=name,
                                                        endpoints=localities)]

