"""Phase 6: what is generated for each Gateway in the cluster: a Service of type
LoadBalancer (no selector) with an EndpointSlice of the addresses the Gateway is served on,
at its listeners' ports, carrying the Gateway's spec.infrastructure labels and annotations.

- `pool` mode: the Service has our loadBalancerClass, so no cloud load balancer provisions
  it; its status.loadBalancer.ingress is the pool address the Gateway was given (kubectl
  shows it as the Service's EXTERNAL-IP), and its endpoints are that address.
- `loadbalancer` mode: a cloud (or MetalLB) load balancer provisions it; its endpoints are
  the nodes' addresses, where every node's Envoy serves the Gateway; the address it is
  given becomes the Gateway's (the label `mesh.dev/gateway` says whose).
- `node` mode, and a Gateway with spec.addresses: nothing is generated (clients use the
  addresses as they are).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from mesh import ir
from mesh.store import kinds
from mesh.store.store import StoreSnapshot
from mesh.translate import addressing
from mesh.translate.config import TranslatorConfig
from mesh.translate.gateway.gateways import GATEWAY_SERVICE_LABEL, Gateway, Gateways
from mesh.translate.gateway.listeners import Listeners

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
POOL_CLASS = "mesh.dev/gateway-pool"
_MAX_NAME = 63  # a Service's name is a DNS label; so is a label's value


def generated_services(snapshot: StoreSnapshot, cfg: TranslatorConfig, gws: Gateways,
                       lis: Listeners) -> tuple[ir.GatewayService, ...]:
    if cfg.gateway_addresses == "node":
        return ()
    ports: dict[object, dict[tuple[int, str], None]] = {}
    for li in lis.listeners:
        if li.valid:
            ports.setdefault(li.gateway.obj.key, {})[(li.spec.port, li.spec.transport)] = None
    nodes: list[str] = []
    if cfg.gateway_addresses == "loadbalancer":
        nodes = addressing.ips(a for node in snapshot.of_kind(kinds.NODE)
                               for a in addressing.reachable_addresses(node))
    out = []
    for g in gws.gateways:
        wanted = ports.get(g.obj.key)
        if g.spec.addresses or g.parameters_ref is not None or not wanted or \
                len(g.obj.name) > _MAX_NAME:
            continue  # nothing to generate (or a name no label can hold)
        out.append(_service(g, sorted(wanted), cfg.gateway_addresses == "pool", nodes,
                            managed_by(cfg.controller_name)))
    return tuple(out)


def managed_by(controller_name: str) -> str:
    """The managed-by label's value for a controller's objects: its name as a label value
    (`mesh.dev/gateway-controller` -> `mesh.dev-gateway-controller`), so that two installs
    with different controller names never take each other's for their own."""
    value = re.sub(r"[^A-Za-z0-9._-]", "-", controller_name)[:_MAX_NAME]
    return value.strip("-._") or "mesh"


def service_name(gateway: str) -> str:
    """`mesh-gateway-<name>`, a DNS label: dots become dashes, a long name is cut and given
    a digest of the whole so that two long names stay apart."""
    name = f"mesh-gateway-{gateway}".replace(".", "-")
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(gateway.encode()).hexdigest()[:8]
    return f"{name[:_MAX_NAME - 9].rstrip('-')}-{digest}"


def _service(g: Gateway, ports: Iterable[tuple[int, str]], pool: bool,
             nodes: list[str], manager: str) -> ir.GatewayService:
    infra = g.obj.spec.get("infrastructure")
    infra = infra if isinstance(infra, dict) else {}
    labels = _strings(infra.get("labels"))
    labels.update({GATEWAY_NAME_LABEL: g.obj.name, GATEWAY_SERVICE_LABEL: g.obj.name,
                   MANAGED_BY_LABEL: manager})  # ours win over the Gateway's
    uid = g.obj.metadata.get("uid")
    return ir.GatewayService(
        namespace=g.obj.namespace, name=service_name(g.obj.name), gateway=g.obj.name,
        gateway_uid=uid if isinstance(uid, str) else "",
        labels=tuple(sorted(labels.items())),
        annotations=tuple(sorted(_strings(infra.get("annotations")).items())),
        ports=tuple(ir.GatewayServicePort(f"{t.lower()}-{p}", p, t) for p, t in ports),
        load_balancer_class=POOL_CLASS if pool else None,
        ingress=g.shown if pool else (), endpoints=g.shown if pool else tuple(nodes),
        owners=frozenset({g.obj.key}))


def _strings(raw: object) -> dict[str, str]:
    """A string map as the API's schema bounds it (at most 8 entries, checked there)."""
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}
