"""What the translator is given besides the snapshot, and what it gives back."""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh import ir
from mesh.store.objects import ObjectKey
from mesh.translate.status import ObjectStatus

DEFAULT_CONTROLLER = "mesh.dev/gateway-controller"
DEFAULT_INGRESS_CONTROLLER = "mesh.dev/ingress-controller"


@dataclass(frozen=True)
class TranslatorConfig:
    controller_name: str = DEFAULT_CONTROLLER
    ingress_controller: str = DEFAULT_INGRESS_CONTROLLER
    address_pool: str = "127.0.100.0/24"
    # The store's Node object that describes this node (its addresses are the ones a
    # Gateway's static addresses must be among); None, or no such Node: any address is
    # taken as usable, and Envoy says if it cannot bind.
    node_name: str | None = None
    # Whether the node runs the rate limit service (global rate limits can be enforced).
    global_rate_limits: bool = False
    # Where a Gateway without spec.addresses gets its address: "pool" (one of address_pool,
    # which this node serves), "node" (served on this node's addresses; the status lists
    # every node's), "loadbalancer" (served on this node's addresses; the status lists the
    # ingress addresses of the LoadBalancer Service labelled mesh.dev/gateway=<name> in the
    # Gateway's namespace).
    gateway_addresses: str = "pool"
    # ingress-nginx's use-forwarded-headers: the Ingress proxy sits behind a load balancer
    # that writes X-Forwarded-For and X-Forwarded-Proto. The client's address for the
    # Ingresses' allow and deny lists is then X-Forwarded-For's last one, and a request
    # with X-Forwarded-Proto other than "http" is not redirected to HTTPS.
    use_forwarded_headers: bool = False

    def __post_init__(self) -> None:
        if self.gateway_addresses not in ("pool", "node", "loadbalancer"):
            raise ValueError(f"gateway_addresses: {self.gateway_addresses!r} is not one of "
                             "pool, node, loadbalancer")


@dataclass
class Translation:
    ir: ir.IR
    status: dict[ObjectKey, ObjectStatus]
    # Gateway (or the Ingress address key) -> address: the next translation's input, so
    # that addresses stay stable (the caller persists them).
    addresses: dict[str, str] = field(default_factory=dict)
