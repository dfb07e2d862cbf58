"""The xDS resource types this control plane serves, and the order it pushes them in."""

from __future__ import annotations

from google.protobuf.message import Message

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# Make before break: a listener must not point at a route that points at a cluster Envoy lacks.
# Secrets come first because clusters and listeners that use TLS wait for them.
PUSH_ORDER: tuple[str, ...] = (SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE)

# In state-of-the-world xDS these types are "full state": a response lists every resource and
# whatever it omits is deleted. The other types are fetched by name.
FULL_STATE = frozenset({CLUSTER, LISTENER})

SHORT_NAMES = {
    SECRET: "secret",
    CLUSTER: "cluster",
    ENDPOINT: "endpoint",
    LISTENER: "listener",
    ROUTE: "route",
}


def type_url_of(message: Message) -> str:
    return "type.googleapis.com/" + message.DESCRIPTOR.full_name


def resource_name(message: Message) -> str:
    """The name xDS knows a resource by: `cluster_name` for endpoints, `name` for the rest."""
    if type_url_of(message) == ENDPOINT:
        return str(message.cluster_name)  # type: ignore[attr-defined]
    return str(message.name)  # type: ignore[attr-defined]
