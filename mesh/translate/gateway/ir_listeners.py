"""Phase 4: the IR listeners. One per address and port the Gateways' served listeners
share (plain HTTP: one route table for the port; HTTPS and TLS: a filter chain per listener
by SNI, the most specific hostname first; TCP and UDP: the oldest route's backends, a UDP
port being a listener of its own), and GAMMA's mesh listener. A Gateway that
presents a client certificate to TLS backends gets its tables' routes sent to backends that
do."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mesh import ir
from mesh.store.store import StoreSnapshot
from mesh.translate.gateway import gamma, hostnames
from mesh.translate.gateway.attachment import Attachment
from mesh.translate.gateway.gateways import Gateway, Gateways
from mesh.translate.gateway.listeners import Listener, Listeners
from mesh.translate.route_builder import RouteBuilder


@dataclass(frozen=True)
class Served:
    listeners: tuple[ir.Listener, ...]  # the Gateways', then the mesh listener
    # (ClusterIP, port) -> the mesh listener's port: the Service frontends whose
    # connections the datapath hands to it.
    redirects: Mapping[tuple[str, int], int]


def build_listeners(snapshot: StoreSnapshot, routes: RouteBuilder, gws: Gateways,
                    lis: Listeners, att: Attachment) -> Served:
    """`routes` assembles the route tables the listeners name."""
    gateways = gws.by_key()
    by_port: dict[tuple[str, int, str], list[Listener]] = {}
    for li in lis.listeners:
        g = gateways[li.gateway.obj.key]
        if _served(li, g):
            for address in g.addresses:
                by_port.setdefault((address, li.spec.port, li.spec.transport),
                                   []).append(li)
    out = []
    for (address, port, transport), group in sorted(by_port.items()):
        protocol = group[0].spec.protocol
        owners = frozenset(li.owner.key for li in group)
        chains: list[ir.FilterChain] = []
        if protocol in ("TCP", "UDP"):
            chains += _stream_chain(routes, group[0])
        elif protocol == "HTTP":
            table = routes.http_table(f"{address}:{port}",
                                      [(li.key, li.spec.hostname) for li in group], port)
            _present_client_certificate(routes, table, gateways[group[0].gateway.obj.key])
            chains.append(ir.FilterChain(name="http", route_table=table, owners=owners))
        else:
            https = [li.spec.hostname for li in group if li.spec.protocol == "HTTPS"]
            for li in _most_specific_first(group):
                chains += _tls_chains(routes, li, gateways[li.gateway.obj.key], https)
        name = f"{address}:{port}/udp" if transport == "UDP" else f"{address}:{port}"
        out.append(ir.Listener(name=name, address=address, port=port,
                               protocol=protocol, chains=tuple(chains), owners=owners))
    mesh_listener, redirects = gamma.listener(snapshot, routes, att.mesh_parents)
    if mesh_listener is not None:
        out.append(mesh_listener)
    return Served(tuple(out), redirects)


def _served(li: Listener, g: Gateway) -> bool:
    """A valid listener whose references resolve, unless its Gateway is refused for its
    parameters: then only the Gateway's own listeners are left out, not those its
    ListenerSets add."""
    return li.valid and not li.unresolved and \
        not (g.parameters_ref is not None and li.owner.key == g.obj.key)


def _tls_chains(routes: RouteBuilder, li: Listener, g: Gateway,
                https: list[str | None]) -> list[ir.FilterChain]:
    """`https`: the hostnames of the HTTPS listeners on the port (this one's included)."""
    sni = (li.spec.hostname,) if li.spec.hostname else ()
    owner = frozenset({li.owner.key})
    if li.spec.protocol == "HTTPS":
        own = li.spec.hostname
        table = routes.http_table(li.key, [(li.key, own)], li.spec.port,
                                  misdirected=own is not None,
                                  elsewhere=hostnames.narrower(own, https))
        _present_client_certificate(routes, table, g)
        return [ir.FilterChain(name=li.key, server_names=sni,
                               certificates=li.certificates, route_table=table,
                               client_validation=li.client_validation, owners=owner)]
    chains = []
    for names, backends, owners in routes.stream_routes(li.key):
        chains.append(ir.FilterChain(
            name=f"{li.key}/{names[0]}", server_names=tuple(n for n in names if n != "*"),
            certificates=li.certificates if li.spec.tls_mode != "Passthrough" else (),
            tcp_backends=backends, owners=owners | owner))
    return chains


def _stream_chain(routes: RouteBuilder, li: Listener) -> list[ir.FilterChain]:
    """A TCP or UDP listener's one chain: nothing tells routes apart, so the oldest route
    attached is served (the specification's conflict rule); the others stay attached."""
    attached = routes.stream_routes(li.key)
    if not attached:
        return []
    _, backends, owners = attached[0]
    return [ir.FilterChain(name=li.key, tcp_backends=backends,
                           owners=owners | {li.owner.key})]


def _present_client_certificate(routes: RouteBuilder, table: str, g: Gateway) -> None:
    if g.backend_certificate is not None:
        routes.present_client_certificate(table, g.backend_certificate)


def _most_specific_first(lis: Iterable[Listener]) -> list[Listener]:
    return sorted(lis, key=lambda li: (li.spec.hostname is None,
                                       (li.spec.hostname or "").startswith("*"),
                                       -len(li.spec.hostname or "")))
