"""The kinds the store keeps, by API group and kind: the translator selects objects by both,
so a `Service` of some other group never passes for the core one."""

from __future__ import annotations

from typing import NamedTuple

CORE = ""
GATEWAY_GROUP = "gateway.networking.k8s.io"
GATEWAY_X_GROUP = "gateway.networking.x-k8s.io"  # experimental kinds (XListenerSet)
NETWORKING_GROUP = "networking.k8s.io"
DISCOVERY_GROUP = "discovery.k8s.io"
POLICY_GROUP = "policy.networking.k8s.io"  # the Network Policy API (ClusterNetworkPolicy)
MESH_GROUP = "mesh.dev"  # the project's own kinds (policies)


class GroupKind(NamedTuple):
    group: str
    kind: str

    def __str__(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind


NAMESPACE = GroupKind(CORE, "Namespace")
SERVICE = GroupKind(CORE, "Service")
SECRET = GroupKind(CORE, "Secret")
CONFIG_MAP = GroupKind(CORE, "ConfigMap")
NODE = GroupKind(CORE, "Node")
POD = GroupKind(CORE, "Pod")
ENDPOINT_SLICE = GroupKind(DISCOVERY_GROUP, "EndpointSlice")
INGRESS = GroupKind(NETWORKING_GROUP, "Ingress")
INGRESS_CLASS = GroupKind(NETWORKING_GROUP, "IngressClass")
NETWORK_POLICY = GroupKind(NETWORKING_GROUP, "NetworkPolicy")
CLUSTER_NETWORK_POLICY = GroupKind(POLICY_GROUP, "ClusterNetworkPolicy")
GATEWAY_CLASS = GroupKind(GATEWAY_GROUP, "GatewayClass")
GATEWAY = GroupKind(GATEWAY_GROUP, "Gateway")
LISTENER_SET = GroupKind(GATEWAY_GROUP, "ListenerSet")
X_LISTENER_SET = GroupKind(GATEWAY_X_GROUP, "XListenerSet")
HTTP_ROUTE = GroupKind(GATEWAY_GROUP, "HTTPRoute")
GRPC_ROUTE = GroupKind(GATEWAY_GROUP, "GRPCRoute")
TLS_ROUTE = GroupKind(GATEWAY_GROUP, "TLSRoute")
TCP_ROUTE = GroupKind(GATEWAY_GROUP, "TCPRoute")
UDP_ROUTE = GroupKind(GATEWAY_GROUP, "UDPRoute")
REFERENCE_GRANT = GroupKind(GATEWAY_GROUP, "ReferenceGrant")
BACKEND_TLS_POLICY = GroupKind(GATEWAY_GROUP, "BackendTLSPolicy")
TRAFFIC_POLICY = GroupKind(MESH_GROUP, "TrafficPolicy")
MESH_IDENTITY = GroupKind(MESH_GROUP, "MeshIdentity")
MESH_NETWORK_POLICY = GroupKind(MESH_GROUP, "MeshNetworkPolicy")
X_BACKEND_TRAFFIC_POLICY = GroupKind(GATEWAY_X_GROUP, "XBackendTrafficPolicy")

KINDS = frozenset({
    NAMESPACE, SERVICE, SECRET, CONFIG_MAP, NODE, POD, ENDPOINT_SLICE, INGRESS, INGRESS_CLASS,
    GATEWAY_CLASS, GATEWAY, LISTENER_SET, X_LISTENER_SET, HTTP_ROUTE, GRPC_ROUTE, TLS_ROUTE,
    TCP_ROUTE, UDP_ROUTE, REFERENCE_GRANT, BACKEND_TLS_POLICY, TRAFFIC_POLICY,
    X_BACKEND_TRAFFIC_POLICY, MESH_IDENTITY, NETWORK_POLICY, CLUSTER_NETWORK_POLICY,
    MESH_NETWORK_POLICY,
})
CLUSTER_SCOPED = frozenset({NAMESPACE, NODE, GATEWAY_CLASS, INGRESS_CLASS, MESH_IDENTITY,
                            CLUSTER_NETWORK_POLICY})
# The status fields the translator reads, by kind (a Node's addresses, a Pod's IPs, a
# LoadBalancer Service's ingress, the pool addresses a Gateway's status publishes): part of
# their content, and nothing else of their status is, so that a Node's heartbeat or a Pod's
# probe results do not look like a change to translate. (For the kinds whose status the
# agent writes, the Kubernetes watch keeps only what is read.)
STATUS_READ: dict[GroupKind, tuple[str, ...]] = {
    NODE: ("addresses",), POD: ("podIP", "podIPs"), SERVICE: ("loadBalancer",),
    GATEWAY: ("addresses",)}
# Groups whose kinds are known by kind alone in messages and `mesh status`.
_WELL_KNOWN = frozenset({CORE, GATEWAY_GROUP, NETWORKING_GROUP, DISCOVERY_GROUP})


def display(gk: GroupKind) -> str:
    """The kind as people name it: bare for well-known groups, qualified otherwise."""
    return gk.kind if gk.group in _WELL_KNOWN else str(gk)
