"""L7 policy in the node's Envoy: the listener the datapath hands flows with L7 rules to.

One transparent listener (the connection keeps the client's address and the pod's as its
ends). Per pod and port a filter chain per group of clients that the same rules apply to
(matched by the client's address: Envoy takes the most specific), whose routes forward the
requests a rule allows to the pod and answer every other request 403 with a body naming the
policies; a last chain per pod and port answers 403 to any other client.
"""

from __future__ import annotations

from mesh import ir

NAME = "mesh-policy"
ADDRESS = "0.0.0.0"


def _routes(target: ir.L7Target, group: ir.L7Group, backend: ir.Backend,
            owners: ir.Owners) -> tuple[ir.Route, ...]:
    forward = ir.Forward((ir.WeightedBackend(backend.name, 1),))
    routes = []
    for i, rule in enumerate(group.rules):
        headers = [ir.StringMatch("Present" if v is None else "Exact", v or "", name)
                   for name, v in rule.headers]
        if rule.host is not None:
            headers.append(ir.StringMatch("Exact", rule.host, ":authority"))
        path = ir.StringMatch("RegularExpression", rule.path) if rule.path is not None \
            else ir.StringMatch("Prefix", "/")
        routes.append(ir.Route(f"allow-{i}", path, forward, headers=tuple(headers),
                               method=rule.method, owners=owners))
    routes.append(_deny(group.policies, owners))
    return tuple(routes)


def _deny(policies: tuple[str, ...], owners: ir.Owners) -> ir.Route:
    body = (f"Access denied by network policy {', '.join(policies)}\n" if policies
            else "Access denied by network policy\n")
    return ir.Route("deny", ir.StringMatch("Prefix", "/"), ir.DirectResponse(403, body),
                    owners=owners)


def policy_listener(state: ir.NetworkPolicies
                    ) -> tuple[ir.Listener | None, list[ir.RouteTable], list[ir.Backend]]:
    """The listener (None: no L7 rule on this node), its route tables and backends."""
    if not state.l7:
        return None, [], []
    chains: list[ir.FilterChain] = []
    tables: list[ir.RouteTable] = []
    backends: list[ir.Backend] = []
    owners: ir.Owners = frozenset()
    for target in state.l7:
        base = f"policy|{target.address}:{target.port}"
        backend = ir.Backend(base, (ir.Endpoint(target.address, target.port),),
                             protocol="h2c" if target.http2 else "http1")
        backends.append(backend)
        every: set[str] = set()
        for i, group in enumerate(target.groups):
            name = f"{base}|{i}"
            tables.append(ir.RouteTable(name, (ir.VirtualHost(
                name, ("*",), _routes(target, group, backend, owners)),)))
            chains.append(ir.FilterChain(name=name, route_table=name,
                                         destination=(target.address, target.port),
                                         source_ranges=group.sources))
            every.update(group.policies)
        name = f"{base}|others"
        tables.append(ir.RouteTable(name, (ir.VirtualHost(
            name, ("*",), (_deny(tuple(sorted(every)), owners),)),)))
        chains.append(ir.FilterChain(name=name, route_table=name,
                                     destination=(target.address, target.port)))
    return (ir.Listener(name=NAME, address=ADDRESS, port=state.proxy_port, protocol="HTTP",
                        chains=tuple(chains), transparent=True), tables, backends)
