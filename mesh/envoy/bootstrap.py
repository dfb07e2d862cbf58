"""The node Envoy's bootstrap: who it is, where its control plane is, and its safety limits.

Everything else reaches Envoy over ADS. The admin interface and the xDS connection are local
only: unix sockets (mode 0600) or loopback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.resource_monitors.downstream_connections.v3 import (  # noqa: F401
    downstream_connections_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from meshxds.address import ListenAddress

XDS_CLUSTER = "mesh_xds"
# The node's rate limit service (mesh/ratelimit), for global rate limits. Always defined, as
# every connection manager lists the rate limit filters; without the service its socket is
# missing and each global limit's failure mode decides.
RATELIMIT_CLUSTER = "mesh_ratelimit"
NO_RATELIMIT = ListenAddress.parse("unix:/nonexistent/mesh-ratelimit.sock")
# The agent's access log service (mesh/flows/accesslog.py): the L7 flows.
ACCESSLOG_CLUSTER = "mesh_accesslog"
NO_ACCESSLOG = ListenAddress.parse("unix:/nonexistent/mesh-accesslog.sock")
Protocol = Literal["delta", "sotw"]


@dataclass(frozen=True)
class BootstrapConfig:
    node_id: str
    xds: ListenAddress
    admin: ListenAddress
    node_cluster: str = "mesh"
    protocol: Protocol = "delta"
    max_downstream_connections: int = 50_000
    ratelimit: ListenAddress = NO_RATELIMIT
    accesslog: ListenAddress = NO_ACCESSLOG


def _address(addr: ListenAddress) -> dict[str, Any]:
    if addr.unix_path is not None:
        return {"pipe": {"path": str(addr.unix_path), "mode": 0o600}}
    return {"socket_address": {"address": addr.host, "port_value": addr.port}}


def _grpc_cluster(name: str, addr: ListenAddress, connect_timeout: str,
                  keepalive: bool) -> dict[str, Any]:
    h2: dict[str, Any] = {}
    if keepalive:
        h2["connection_keepalive"] = {"interval": "30s", "timeout": "5s"}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(addr)}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": h2},
            }
        },
    }


def _ads_source() -> dict[str, Any]:
    # 0s: wait for the control plane as long as it takes rather than start with a hole.
    return {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "0s"}


def bootstrap(cfg: BootstrapConfig) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "node": {"id": cfg.node_id, "cluster": cfg.node_cluster},
        "admin": {"address": _address(cfg.admin)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if cfg.protocol == "delta" else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{
                    "envoy_grpc": {
                        "cluster_name": XDS_CLUSTER,
                        # Reconnect quickly when the agent restarts: Envoy keeps serving
                        # meanwhile, and a restarted agent must see it back within a second
                        # (the default starts at 0.5 s and grows to 30 s). Envoy reads the ADS
                        # stream's backoff from EnvoyGrpc.retry_policy only: the GrpcService-
                        # level retry_policy is for other clients' retries, not this stream.
                        "retry_policy": {
                            "retry_back_off": {"base_interval": "0.05s", "max_interval": "1s"}
                        },
                    },
                }],
            },
            "cds_config": _ads_source(),
            "lds_config": _ads_source(),
        },
        "static_resources": {
            "clusters": [
                _grpc_cluster(XDS_CLUSTER, cfg.xds, "1s", keepalive=True),
                # A decision waits for the rate limit filter's timeout at most (50 ms):
                # connecting must not take longer.
                _grpc_cluster(RATELIMIT_CLUSTER, cfg.ratelimit, "0.05s", keepalive=False),
                _grpc_cluster(ACCESSLOG_CLUSTER, cfg.accesslog, "1s", keepalive=True),
            ],
        },
        "overload_manager": {
            "resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                    "downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": cfg.max_downstream_connections,
                },
            }],
        },
    }
    # Catch a malformed bootstrap here, with a Python traceback, not in Envoy's log.
    json_format.ParseDict(doc, bootstrap_pb2.Bootstrap())
    return doc
