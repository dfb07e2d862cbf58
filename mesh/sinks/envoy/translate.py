"""IR -> Envoy resources: clusters and endpoints, route configurations, listeners, secrets.

Per-route behaviour (header changes, timeouts, retries, mirrors, CORS) lives in RDS, and the
HTTP filter list of every connection manager is the same fixed list: a route change never
touches a listener, so it never drains connections.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

from envoy.config.route.v3 import route_components_pb2 as rc
from google.protobuf.message import Message

from mesh import ir
from mesh.sinks.envoy import clusters, listeners, routes, secrets, udp
from mesh.sinks.envoy import resources as r
from mesh.store.objects import ObjectKey
from meshxds import types


@dataclass
class EnvoyConfig:
    resources: list[Message]
    # The objects each xDS resource carries, as given; `owned` inverts it when asked (by the
    # status, off the push path: at 10,000 routes that is 10 ms).
    owners: list[tuple[Iterable[ObjectKey], str, str]] = field(default_factory=list)

    def own(self, owners: Iterable[ObjectKey], type_url: str, name: str) -> None:
        self.owners.append((owners, type_url, name))

    @functools.cached_property
    def owned(self) -> dict[ObjectKey, set[tuple[str, str]]]:
        """Which xDS resources carry each object: Programmed waits for all of them to be
        ACKed."""
        out: dict[ObjectKey, set[tuple[str, str]]] = {}
        for owners, type_url, name in self.owners:
            for o in owners:
                out.setdefault(o, set()).add((type_url, name))
        return out


class EnvoyCache:
    """Virtual host messages of the previous conversion, by name, with the IR they were made
    from: a virtual host equal to last time's converts to the same message, and in one that
    changed, routes equal to last time's keep theirs. Keyed by content (IR equality), never
    by object identity."""

    def __init__(self) -> None:
        self.vhosts: dict[str, tuple[ir.VirtualHost, rc.VirtualHost]] = {}


def to_envoy(model: ir.IR, cache: EnvoyCache | None = None) -> EnvoyConfig:
    out = EnvoyConfig([])
    previous = cache.vhosts if cache is not None else {}
    fresh: dict[str, tuple[ir.VirtualHost, rc.VirtualHost]] = {}

    def vhost(vh: ir.VirtualHost) -> rc.VirtualHost:
        hit = previous.get(vh.name)
        if hit is not None and hit[0] == vh:
            msg = hit[1]
        else:
            old = dict(zip(hit[0].routes, hit[1].routes, strict=True)) if hit is not None \
                else {}
            msg = rc.VirtualHost(name=vh.name, domains=list(vh.domains), routes=[
                m if (m := old.get(x)) is not None else routes.route(x) for x in vh.routes])
        fresh[vh.name] = (vh, msg)
        return msg

    for b in model.backends:
        out.resources += [clusters.cluster(b), r.load_assignment(
            b.name, [(e.address, e.port) for e in b.endpoints],
            [(e.address, e.port) for e in b.sticky_endpoints])]
        out.own(b.owners, types.CLUSTER, b.name)
    out.resources += [secrets.certificate(c) for c in model.certificates]
    out.resources += [secrets.trust_bundle(b) for b in model.trust_bundles]
    for table in model.route_tables:
        out.resources.append(routes.route_configuration(table, vhost))
        out.own(table.owners, types.ROUTE, table.name)
    by_name: dict[str, ir.Backend] | None = None  # only UDP listeners need it
    for listener in model.listeners:
        if listener.protocol == "UDP":
            if by_name is None:
                by_name = {b.name: b for b in model.backends}
            out.resources.append(udp.listener(listener))
            extra = udp.weighted_cluster(listener, by_name)
            out.resources += extra
            if extra:
                out.own(listener.owners, types.CLUSTER, udp.target(listener))
        else:
            out.resources.append(listeners.listener(listener))
        out.own(listener.owners, types.LISTENER, listener.name)
    if cache is not None:
        cache.vhosts = fresh
    return out
