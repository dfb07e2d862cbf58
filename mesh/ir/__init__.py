"""The intermediate representation: what the node must do, in plain typed data.

Produced by the pure translator from a store snapshot; consumed by the sinks (Envoy over xDS
now; BPF maps and encryption peers later). One module per concern: `l7` for what the node's
Envoy serves, `l4` for the service frontends the datapath balances in the kernel,
`infrastructure` for the Kubernetes objects generated for Gateways (which the leader keeps),
`policy` for network policy (identities, the ipcache, each local pod's allowed peers);
encryption peers join later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.ir.directory import Directory, DirectoryNode, DirectoryPod, DirectoryService
from mesh.ir.encryption import Encryption, EncryptionPeer, KeyProblem
from mesh.ir.infrastructure import GatewayService, GatewayServicePort
from mesh.ir.l4 import L4Backend, ServiceFrontend
from mesh.ir.l7 import (
    UNIT_SECONDS,
    Action,
    Backend,
    BackendSettings,
    Certificate,
    CircuitBreaker,
    ClientValidation,
    Cors,
    DirectResponse,
    Endpoint,
    ExtAuth,
    FilterChain,
    Forward,
    HashPolicy,
    HeaderOps,
    HealthCheck,
    Listener,
    LoadBalancer,
    Mirror,
    OutlierDetection,
    Owners,
    RateLimit,
    RateLimitSelector,
    Redirect,
    Retry,
    Route,
    RouteTable,
    SessionPersistence,
    StringMatch,
    TrustBundle,
    UpstreamTLS,
    VirtualHost,
    WeightedBackend,
)
from mesh.ir.policy import (
    EndpointPolicy,
    FqdnAllow,
    IdentityMap,
    IpcacheEntry,
    L7Group,
    L7Rule,
    L7Target,
    Labels,
    NetworkPolicies,
    PolicyAllow,
    PolicyProblem,
    TierEntry,
)

__all__ = [
    "IR",
    "UNIT_SECONDS",
    "Action",
    "Backend",
    "BackendSettings",
    "Certificate",
    "CircuitBreaker",
    "ClientValidation",
    "Cors",
    "DirectResponse",
    "Directory",
    "DirectoryNode",
    "DirectoryPod",
    "DirectoryService",
    "Encryption",
    "EncryptionPeer",
    "Endpoint",
    "EndpointPolicy",
    "ExtAuth",
    "FilterChain",
    "Forward",
    "FqdnAllow",
    "GatewayService",
    "GatewayServicePort",
    "HashPolicy",
    "HeaderOps",
    "HealthCheck",
    "IdentityMap",
    "IpcacheEntry",
    "KeyProblem",
    "L4Backend",
    "L7Group",
    "L7Rule",
    "L7Target",
    "Labels",
    "Listener",
    "LoadBalancer",
    "Mirror",
    "NetworkPolicies",
    "OutlierDetection",
    "Owners",
    "PolicyAllow",
    "PolicyProblem",
    "RateLimit",
    "RateLimitSelector",
    "Redirect",
    "Retry",
    "Route",
    "RouteTable",
    "ServiceFrontend",
    "SessionPersistence",
    "StringMatch",
    "TierEntry",
    "TrustBundle",
    "UpstreamTLS",
    "VirtualHost",
    "WeightedBackend",
]


@dataclass(frozen=True)
class IR:
    """Everything one node must do."""

    listeners: tuple[Listener, ...] = ()
    route_tables: tuple[RouteTable, ...] = ()
    backends: tuple[Backend, ...] = ()
    certificates: tuple[Certificate, ...] = ()
    trust_bundles: tuple[TrustBundle, ...] = ()
    services: tuple[ServiceFrontend, ...] = ()  # L4: for the datapath
    # Cluster-wide, the same on every node: the leader applies them.
    gateway_services: tuple[GatewayService, ...] = ()
    # Network policy: the pods' security identities, and what this node's pods may do.
    identities: IdentityMap = field(default_factory=IdentityMap)
    network_policies: NetworkPolicies = field(default_factory=NetworkPolicies)
    # Transparent encryption: the other nodes as WireGuard peers.
    encryption: Encryption = field(default_factory=Encryption)
    # The cluster's pods and Services by address: the flows' names for their ends.
    directory: Directory = field(default_factory=Directory)
