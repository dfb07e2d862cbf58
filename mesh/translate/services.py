"""Services to L4 frontends: every ClusterIP port with the ready endpoints behind it, for the
datapath (the kube-proxy replacement). Headless Services (clusterIP None) and ExternalName
ones have no frontend."""

from __future__ import annotations

import ipaddress

from mesh import ir
from mesh.store import kinds
from mesh.store.store import StoreSnapshot
from mesh.translate.gateway.routes import RouteBuilder


def translate_services(snapshot: StoreSnapshot, routes: RouteBuilder
                       ) -> tuple[ir.ServiceFrontend, ...]:
    out: list[ir.ServiceFrontend] = []
    for obj in snapshot.of_kind(kinds.SERVICE):
        ip = obj.spec.get("clusterIP")
        if not isinstance(ip, str):
            continue
        try:
            address = ipaddress.IPv4Address(ip)
        except ValueError:
            continue  # None (headless), empty, or IPv6 (not yet)
        svc = routes.service(obj.namespace, obj.name)
        if svc is None or svc.type == "ExternalName":
            continue
        for port in svc.ports:
            if port.protocol not in ("TCP", "UDP") or not 0 < port.port < 65536:
                continue
            backends = tuple(ir.L4Backend(e.address, e.port)
                             for e in routes.endpoints(svc, port)
                             if _ipv4(e.address) and 0 < e.port < 65536)
            out.append(ir.ServiceFrontend(str(address), port.port, port.protocol, backends,
                                          frozenset({obj.key})))
    return tuple(sorted(out, key=lambda f: f.key))


def _ipv4(address: str) -> bool:
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        return False
    return True
