"""Phase 1: GatewayClasses and Gateways. Which classes are ours, which Gateways are theirs
and parse, and for each Gateway what is decided before its listeners: the addresses it is
served on (allocated from the pool in the Gateways' order, so that they stay stable), the
addresses its status lists, the certificate it presents to TLS backends, and whether it is
refused (address types, infrastructure parameters)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mesh.store import kinds
from mesh.store.objects import KubeObject, ObjectKey
from mesh.store.store import StoreSnapshot
from mesh.translate import addressing, model
from mesh.translate.config import TranslatorConfig
from mesh.translate.gateway.references import References, certificate_secret
from mesh.translate.route_builder import RouteBuilder
from mesh.translate.status import Reason

# The label that names the Gateway a LoadBalancer Service publishes (gateway_addresses
# "loadbalancer").
GATEWAY_SERVICE_LABEL = "mesh.dev/gateway"


@dataclass(frozen=True)
class Gateway:
    """One of our Gateways, and what is decided about it as a whole."""

    spec: model.Gateway
    addresses: tuple[str, ...]  # served on
    unusable: tuple[str, ...]  # static addresses this node cannot serve
    shown: tuple[str, ...]  # what its status lists: where clients reach it
    unassigned: str  # why `shown` is empty yet ("" if it is not)
    backend_certificate: str | None  # presented to TLS backends
    backend_certificate_problem: tuple[str, str] | None  # (reason, message)
    # spec.infrastructure.parametersRef: none is supported, so a Gateway that names one is
    # refused (and its own listeners not served) rather than run without what it asked for.
    parameters_ref: Any = None

    @property
    def obj(self) -> KubeObject:
        return self.spec.obj

    @property
    def unsupported_address_types(self) -> list[str]:
        return sorted({t for t, _ in self.spec.addresses if t != "IPAddress"})


@dataclass(frozen=True)
class Gateways:
    classes: tuple[KubeObject, ...]  # ours (controllerName), in the snapshot's order
    gateways: tuple[Gateway, ...]  # ours that parse, in the snapshot's order
    invalid: tuple[tuple[KubeObject, str], ...]  # ours that do not parse, and why
    addresses: Mapping[str, str]  # "gateway/ns/name[/i]" -> address: the next input

    def by_key(self) -> dict[ObjectKey, Gateway]:
        return {g.obj.key: g for g in self.gateways}


def decide_gateways(snapshot: StoreSnapshot, cfg: TranslatorConfig, refs: References,
                    routes: RouteBuilder, previous_addresses: Mapping[str, str],
                    node_addresses: frozenset[str] | None) -> Gateways:
    """`routes` is given the certificates Gateways present to backends."""
    classes = tuple(gc for gc in snapshot.of_kind(kinds.GATEWAY_CLASS)
                    if gc.spec.get("controllerName") == cfg.controller_name)
    names = {gc.name for gc in classes}
    parsed: list[model.Gateway] = []
    invalid: list[tuple[KubeObject, str]] = []
    for obj in snapshot.of_kind(kinds.GATEWAY):
        class_name = obj.spec.get("gatewayClassName")
        if not isinstance(class_name, str) or class_name not in names:
            continue
        try:
            parsed.append(model.parse_gateway(obj))
        except model.Invalid as e:
            invalid.append((obj, str(e)))
    assigned: dict[str, str] = {}
    out = []
    # A static address another Node has is served there (each node's Envoy serves the
    # Gateway's addresses it has): not one this node cannot use.
    elsewhere = frozenset(a for node in snapshot.of_kind(kinds.NODE)
                          if node.name != cfg.node_name
                          for a in addressing.reachable_addresses(node))
    for g in parsed:
        addresses, others, unusable = _addresses(g, cfg, previous_addresses, assigned,
                                                 node_addresses, elsewhere)
        shown, unassigned = _status_addresses(snapshot, cfg, g, addresses, others)
        cert, problem = _backend_client_certificate(refs, routes, g)
        infrastructure = g.obj.spec.get("infrastructure")
        params = (infrastructure or {}).get("parametersRef") \
            if isinstance(infrastructure, dict) else None
        out.append(Gateway(g, tuple(addresses), tuple(unusable), tuple(shown), unassigned,
                           cert, problem, params))
    return Gateways(classes, tuple(out), tuple(invalid), assigned)


def _addresses(g: model.Gateway, cfg: TranslatorConfig, previous: Mapping[str, str],
               assigned: dict[str, str], node_addresses: frozenset[str] | None,
               elsewhere: frozenset[str] = frozenset()
               ) -> tuple[list[str], list[str], list[str]]:
    """(the addresses to serve the Gateway on, its static ones other nodes serve, the
    static ones no node can use); what it is given is recorded in `assigned`."""
    key = f"gateway/{g.obj.namespace}/{g.obj.name}"
    if any(t != "IPAddress" for t, _ in g.addresses):
        return [], [], []  # not accepted (UnsupportedAddress): nothing to serve
    usable: list[str] = []
    others: list[str] = []
    unusable: list[str] = []
    for _, value in g.addresses:
        if not value:
            continue  # an IPAddress without a value asks for one to be assigned
        try:
            ok = _usable(value, node_addresses) or _in_pool(value, cfg.address_pool)
        except ValueError:
            ok = False
        (usable if ok else others if value in elsewhere else unusable).append(value)
    if not usable and not others and not unusable:
        if cfg.gateway_addresses != "pool":
            return addressing.ips(node_addresses or ()), [], []  # the node's: not allocated
        allocated = addressing.allocate(cfg.address_pool, previous, assigned, key)
        usable = [allocated] if allocated else []
    for i, address in enumerate(usable):
        assigned[key if i == 0 else f"{key}/{i}"] = address
    return usable, others, unusable


def _in_pool(address: str, pool: str) -> bool:
    """An address of the pool this node serves Gateways on (where the pool is routed to
    the nodes, a Gateway may ask for one of them)."""
    return ipaddress.ip_address(address) in ipaddress.ip_network(pool)


def _usable(address: str, node_addresses: frozenset[str] | None) -> bool:
    """A static address the node can serve: loopback, or one of the node's own."""
    ip = ipaddress.ip_address(address)
    return node_addresses is None or ip.is_loopback or str(ip) in node_addresses


def _status_addresses(snapshot: StoreSnapshot, cfg: TranslatorConfig, g: model.Gateway,
                      served: list[str], others: Sequence[str] = ()
                      ) -> tuple[list[str], str]:
    """(the addresses the Gateway's status lists, why there are none yet or ""). Where
    clients reach it: what this node serves (and, of its static addresses, those other
    nodes serve), unless the Gateway asked for nothing in particular and the addresses
    come from the nodes or a LoadBalancer Service."""
    mode = cfg.gateway_addresses
    if any(value for _, value in g.addresses):
        static = [value for _, value in g.addresses if value in served or value in others]
        return static, ""
    if mode == "pool" or not served:
        return served, ""
    if mode == "node":
        every = sorted({a for node in snapshot.of_kind(kinds.NODE)
                        for a in addressing.ips(addressing.reachable_addresses(node))},
                       key=addressing.address_order)
        return every or served, ""
    services = sorted(
        (svc for svc in snapshot.of_kind(kinds.SERVICE)
         if svc.namespace == g.obj.namespace and
         svc.labels.get(GATEWAY_SERVICE_LABEL) == g.obj.name),
        key=lambda svc: svc.name)
    if not services:
        return [], f"no LoadBalancer Service labelled {GATEWAY_SERVICE_LABEL}=" \
            f"{g.obj.name} in {g.obj.namespace}"
    out: list[str] = []
    for svc in services:
        if svc.spec.get("type") != "LoadBalancer":
            continue
        status = svc.body.get("status")
        lb = status.get("loadBalancer") if isinstance(status, Mapping) else None
        for entry in (lb.get("ingress") or []) if isinstance(lb, Mapping) else []:
            if isinstance(entry, Mapping):
                value = entry.get("ip") or entry.get("hostname")
                if isinstance(value, str) and value and value not in out:
                    out.append(value)
    balancers = [svc for svc in services if svc.spec.get("type") == "LoadBalancer"]
    if not balancers:
        return [], f"Service {g.obj.namespace}/{services[0].name} (labelled " \
            f"{GATEWAY_SERVICE_LABEL}={g.obj.name}) is not of type LoadBalancer"
    if not out:
        return [], f"waiting for Service {g.obj.namespace}/{balancers[0].name} " \
            "(type LoadBalancer) to be given an address"
    return out, ""


def _backend_client_certificate(refs: References, routes: RouteBuilder, g: model.Gateway
                                ) -> tuple[str | None, tuple[str, str] | None]:
    """(the certificate the Gateway presents to TLS backends, or why it cannot):
    Gateway spec.tls.backend.clientCertificateRef."""
    ref = g.backend_client_certificate
    if ref is None:
        return None, None
    found = certificate_secret(refs, routes, ref, g.obj, "clientCertificateRef",
                               Reason.INVALID_CLIENT_CERTIFICATE_REF)
    return (None, found) if isinstance(found, tuple) else (found, None)
