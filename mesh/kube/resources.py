"""The API resources the agent reads and writes: their names, paths and scope."""

from __future__ import annotations

from dataclasses import dataclass

from mesh.store import kinds
from mesh.store.kinds import GroupKind


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    field_selector: str | None = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def path(self) -> str:
        """The collection over every namespace (list and watch)."""
        return self.collection("")

    def collection(self, namespace: str) -> str:
        """The collection in one namespace (create); "" or a cluster-scoped kind: all."""
        base = f"/apis/{self.api_version}" if self.group else f"/api/{self.version}"
        ns = f"/namespaces/{namespace}" if namespace and self.namespaced else ""
        return f"{base}{ns}/{self.plural}"

    def item(self, namespace: str, name: str) -> str:
        """One object (get, replace; + "/status" for the status subresource)."""
        return f"{self.collection(namespace)}/{name}"

    @property
    def group_kind(self) -> GroupKind:
        return GroupKind(self.group, self.kind)


MESH_NODE = Resource("mesh.dev", "v1alpha1", "meshnodes", "MeshNode", namespaced=False)
LEASE = Resource("coordination.k8s.io", "v1", "leases", "Lease")
NODES = Resource("", "v1", "nodes", "Node", namespaced=False)
SERVICES = Resource("", "v1", "services", "Service")
ENDPOINT_SLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")
EVENTS = Resource("", "v1", "events", "Event")
MESH_IDENTITIES = Resource("mesh.dev", "v1alpha1", "meshidentities", "MeshIdentity",
                           namespaced=False)


def resources(node_name: str | None) -> list[Resource]:
    """Every kind the store holds. Pods of every node: network policy needs every pod's
    identity and named ports (`node_name` is kept for the callers that name their node)."""
    del node_name
    out = [
        Resource("", "v1", "namespaces", "Namespace", namespaced=False),
        SERVICES,
        Resource("", "v1", "secrets", "Secret"),
        Resource("", "v1", "configmaps", "ConfigMap"),
        NODES,
        Resource("", "v1", "pods", "Pod"),
        ENDPOINT_SLICES,
        Resource("networking.k8s.io", "v1", "ingresses", "Ingress"),
        Resource("networking.k8s.io", "v1", "ingressclasses", "IngressClass", namespaced=False),
        Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy"),
        Resource("policy.networking.k8s.io", "v1alpha2", "clusternetworkpolicies",
                 "ClusterNetworkPolicy", namespaced=False),
        Resource("gateway.networking.k8s.io", "v1", "gatewayclasses", "GatewayClass",
                 namespaced=False),
        Resource("gateway.networking.k8s.io", "v1", "gateways", "Gateway"),
        Resource("gateway.networking.k8s.io", "v1", "listenersets", "ListenerSet"),
        Resource("gateway.networking.x-k8s.io", "v1alpha1", "xlistenersets", "XListenerSet"),
        Resource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute"),
        Resource("gateway.networking.k8s.io", "v1", "grpcroutes", "GRPCRoute"),
        Resource("gateway.networking.k8s.io", "v1alpha2", "tlsroutes", "TLSRoute"),
        Resource("gateway.networking.k8s.io", "v1", "tcproutes", "TCPRoute"),
        Resource("gateway.networking.k8s.io", "v1", "udproutes", "UDPRoute"),
        Resource("gateway.networking.k8s.io", "v1beta1", "referencegrants", "ReferenceGrant"),
        Resource("gateway.networking.k8s.io", "v1", "backendtlspolicies", "BackendTLSPolicy"),
        Resource("gateway.networking.x-k8s.io", "v1alpha1", "xbackendtrafficpolicies",
                 "XBackendTrafficPolicy"),
        Resource("mesh.dev", "v1alpha1", "trafficpolicies", "TrafficPolicy"),
        MESH_IDENTITIES,
        Resource("mesh.dev", "v1alpha1", "meshnetworkpolicies", "MeshNetworkPolicy"),
    ]
    missing = kinds.KINDS - {r.group_kind for r in out}
    assert not missing, f"kinds the store holds without a resource to watch: {missing}"
    return out


# The kinds whose status the leader writes (each has a status subresource); the translator
# gives status to nothing else that the API would take (an IngressClass has no status).
STATUS_KINDS = frozenset({
    kinds.GATEWAY_CLASS, kinds.GATEWAY, kinds.LISTENER_SET, kinds.X_LISTENER_SET,
    kinds.HTTP_ROUTE, kinds.GRPC_ROUTE, kinds.TLS_ROUTE, kinds.TCP_ROUTE, kinds.UDP_ROUTE,
    kinds.BACKEND_TLS_POLICY,
    kinds.X_BACKEND_TRAFFIC_POLICY, kinds.TRAFFIC_POLICY, kinds.INGRESS,
    kinds.CLUSTER_NETWORK_POLICY, kinds.MESH_NETWORK_POLICY})
