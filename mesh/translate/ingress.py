"""Ingress v1 to IR: the Ingresses of our IngressClass share one address, on ports 80 and
(when any has TLS) 443.

Paths: `Exact` matches exactly, `Prefix` by whole path segments, `ImplementationSpecific` as a
plain string prefix. Longest path first, Exact before Prefix on equal length, then the oldest
Ingress. The default backend answers what no rule matches, on every host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mesh import ir
from mesh.store import kinds
from mesh.store.objects import ObjectKey
from mesh.store.store import StoreSnapshot
from mesh.translate import model
from mesh.translate.gateway.routes import Resolution, RouteBuilder
from mesh.translate.status import IngressStatus, ObjectStatus


@dataclass
class IngressResult:
    listeners: tuple[ir.Listener, ...] = ()
    status: dict[ObjectKey, ObjectStatus] = field(default_factory=dict)
    used_address: str | None = None


def _our_classes(snapshot: StoreSnapshot, controller: str) -> tuple[set[str], str | None]:
    ours, default = set(), None
    for obj in snapshot.of_kind(kinds.INGRESS_CLASS):
        if obj.spec.get("controller") == controller:
            ours.add(obj.name)
            if obj.annotations.get("ingressclass.kubernetes.io/is-default-class") == "true":
                default = obj.name
    return ours, default


def translate_ingresses(snapshot: StoreSnapshot, cfg: Any, routes: RouteBuilder,
                        allocate: Callable[[], str | None]) -> IngressResult:
    classes, default = _our_classes(snapshot, cfg.ingress_controller)
    ingresses = []
    result = IngressResult()
    for obj in sorted(snapshot.of_kind(kinds.INGRESS), key=lambda o: (o.created, o.namespace,
                                                                  o.name)):
        try:
            ing = model.parse_ingress(obj)
        except model.Invalid:
            continue
        if (ing.class_name or default) in classes:
            ingresses.append(ing)
    if not ingresses:
        return result
    address = allocate()
    if address is None:
        return result
    result.used_address = address
    hosts: dict[str, list[tuple[tuple[Any, ...], ir.Route]]] = {}
    defaults: list[ir.Route] = []
    tls: list[tuple[tuple[str, ...], str, ObjectKey]] = []
    for ing in ingresses:
        obj = ing.obj
        result.status[obj.key] = IngressStatus((address,))
        for i, rule in enumerate(ing.rules):
            host = rule.host or "*"
            for j, p in enumerate(rule.paths):
                route = _route(routes, ing, p.backend, _path(p.path, p.path_type),
                               f"{obj.namespace}/{obj.name}/rule{i}/path{j}")
                exact = p.path_type == "Exact"
                key = (-len(p.path), not exact, obj.created, obj.namespace, obj.name, i, j)
                hosts.setdefault(host, []).append((key, route))
        if ing.default_backend is not None:
            defaults.append(_route(routes, ing, ing.default_backend,
                                   ir.StringMatch("Prefix", "/"),
                                   f"{obj.namespace}/{obj.name}/default"))
        for tls_hosts, secret_name in ing.tls:
            secret = snapshot.get(kinds.SECRET, obj.namespace, secret_name)
            cert = routes.certificate(secret) if secret is not None else None
            if cert is not None:
                tls.append((tls_hosts, cert, obj.key))
    hosts.setdefault("*", [])
    owners = frozenset(i.obj.key for i in ingresses)
    vhosts = []
    for host in sorted(hosts, key=lambda h: (h == "*", h.startswith("*"), h)):
        ordered = [r for _, r in sorted(hosts[host], key=lambda kr: kr[0])]
        domains = (host,)
        vhosts.append(ir.VirtualHost(f"ingress/{host}", domains,
                                     tuple(ordered) + tuple(defaults[:1])))
    table = ir.RouteTable("ingress", tuple(vhosts), owners)
    routes.put_table(table)
    listeners = [ir.Listener(f"{address}:80", address, 80, "HTTP",
                             (ir.FilterChain("ingress-http", route_table="ingress",
                                             owners=owners),), owners)]
    if tls:
        chains = tuple(ir.FilterChain(f"ingress-tls/{n}", server_names=tuple(h),
                                      certificates=(cert,), route_table="ingress",
                                      owners=frozenset({key}))
                       for n, (h, cert, key) in enumerate(tls))
        listeners.append(ir.Listener(f"{address}:443", address, 443, "HTTPS", chains, owners))
    result.listeners = tuple(listeners)
    return result


def _path(path: str, path_type: str) -> ir.StringMatch:
    if path_type == "Exact":
        return ir.StringMatch("Exact", path)
    if path_type == "Prefix" and path != "/" and not path.endswith("/"):
        return ir.StringMatch("PathSeparatedPrefix", path)
    return ir.StringMatch("Prefix", path)


def _route(routes: RouteBuilder, ing: model.Ingress, backend: model.IngressBackend,
           path: ir.StringMatch, name: str) -> ir.Route:
    obj = ing.obj
    port = backend.port_number
    svc = routes.service(obj.namespace, backend.service)
    if port is None and svc is not None:
        port = next((p.port for p in svc.ports if p.name == backend.port_name), None)
    res = Resolution()
    target = routes.backend(model.BackendObjectRef("", "Service", obj.namespace,
                                                   backend.service, port), obj, res)
    action: ir.Action = ir.Forward((ir.WeightedBackend(target, 1),)) if target else \
        ir.DirectResponse(503, "")
    return ir.Route(name=name, path=path, action=action, owners=frozenset({obj.key}))

