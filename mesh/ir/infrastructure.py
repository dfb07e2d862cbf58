"""The Kubernetes objects generated for Gateways: what load balancers and tools see of a
Gateway. Not a node's doing: the elected leader keeps them as the IR says."""

from __future__ import annotations

from dataclasses import dataclass

from mesh.ir.l7 import Owners


@dataclass(frozen=True)
class GatewayServicePort:
    name: str
    port: int
    protocol: str  # TCP | UDP


@dataclass(frozen=True)
class GatewayService:
    """A Gateway's Service (type LoadBalancer, no selector) and its EndpointSlice: the
    addresses the Gateway is served on, at its listeners' ports. Owned by the Gateway (the
    garbage collector removes it with the Gateway)."""

    namespace: str
    name: str
    gateway: str  # the Gateway's name
    gateway_uid: str  # for the owner reference ("" outside Kubernetes: none)
    labels: tuple[tuple[str, str], ...]  # the Gateway's spec.infrastructure.labels and ours
    annotations: tuple[tuple[str, str], ...]  # its spec.infrastructure.annotations
    ports: tuple[GatewayServicePort, ...]
    # Set: no cloud load balancer takes the Service (loadBalancerClass), and the leader
    # publishes these addresses in its status.loadBalancer.ingress itself (the pool's).
    load_balancer_class: str | None
    ingress: tuple[str, ...]
    endpoints: tuple[str, ...]  # where the Gateway is served (the EndpointSlice's addresses)
    owners: Owners = frozenset()
