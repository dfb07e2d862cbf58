"""The datapath's verdict, computed from the IR the way bpf/lib/policy.h computes it from the
maps: the peer's identity and CIDR identity from the ipcache (longest prefix), the local pod's
isolation, then its allowed entries by identity, CIDR identity and any. `mesh policy` explains
a verdict with it, and the tests hold the compiled IR to the upstream cases with it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mesh import ir
from mesh.policy import identities as ids


@dataclass(frozen=True)
class Peer:
    identity: int
    cidr_identity: int


@dataclass(frozen=True)
class Side:
    """One end's decision: whether it passes, and why."""

    allowed: bool
    reason: str


def peer_of(policies: ir.NetworkPolicies, address: str) -> Peer:
    """The ipcache's answer for an address (world when nothing holds it)."""
    ip = ipaddress.IPv4Address(address)
    best: tuple[int, ir.IpcacheEntry] | None = None
    for e in policies.ipcache:
        net = ipaddress.IPv4Network(e.prefix)
        if ip in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, e)
    if best is None:
        return Peer(ids.WORLD, 0)
    return Peer(best[1].identity, best[1].cidr_identity)


def _matches(a: ir.PolicyAllow, direction: str, identity: int, protocol: str,
             port: int) -> bool:
    if a.direction != direction or a.identity != identity:
        return False
    if a.protocol is None:
        return True
    if a.protocol != protocol:
        return False
    return a.port is None or a.port <= port <= (a.end_port or a.port)


def _tier(endpoint: ir.EndpointPolicy, tier: str, direction: str, peer: Peer, protocol: str,
          port: int) -> ir.TierEntry | None:
    """The tier's entry for a flow as the datapath finds it: per identity the most specific
    entry (the LPM trie's answer), then of those the one of lowest precedence."""
    found: list[ir.TierEntry] = []
    lookups = {peer.identity, ids.ANY} | ({peer.cidr_identity} if peer.cidr_identity else set())
    for identity in lookups:
        mine = [e for e in endpoint.tiers if e.tier == tier and e.direction == direction and
                e.identity == identity and
                (e.protocol is None or (e.protocol == protocol and (
                    e.port is None or e.port <= port <= (e.end_port or e.port))))]
        if mine:
            found.append(max(mine, key=lambda e: (e.protocol is not None, e.port is not None)))
    return min(found, key=lambda e: e.precedence) if found else None


def decide(endpoint: ir.EndpointPolicy | None, direction: str, peer: Peer, protocol: str,
           port: int) -> Side:
    """`endpoint`'s side of a new flow (`direction`: ingress when it receives): the Admin
    tier, the NetworkPolicies, the Baseline tier."""
    if endpoint is None:
        return Side(True, "not a pod of this node's policy (not isolated)")
    if direction == "ingress" and peer.identity == ids.HOST:
        return Side(True, "the host always reaches its own pods")
    rules = dict(endpoint.tier_rules)
    admin = _tier(endpoint, "admin", direction, peer, protocol, port)
    if admin is not None and admin.action != "Pass":
        return Side(admin.action == "Accept", f"Admin tier: {rules.get(admin.precedence)}")
    passed = f" (Admin tier passed: {rules.get(admin.precedence)})" if admin else ""
    isolated = endpoint.ingress_isolated if direction == "ingress" else \
        endpoint.egress_isolated
    if isolated:
        if peer.identity == ids.HOST and direction == "ingress":
            return Side(True, "the host always reaches its own pods")
        for identity, what in ((peer.identity, "identity"), (peer.cidr_identity, "CIDR"),
                               (ids.ANY, "any peer")):
            if identity == 0 and what != "any peer":
                continue
            for a in endpoint.allow:
                if _matches(a, direction, identity, protocol, port):
                    via = " through the node's DNS proxy (toFQDNs)" if a.dns else ""
                    return Side(True, f"allowed by {what} {identity}{via} "
                                      f"({', '.join(endpoint.policies)}){passed}")
        names = sorted({f.pattern for f in endpoint.fqdn if direction == "egress" and (
            f.protocol is None or (f.protocol == protocol and (
                f.port is None or f.port <= port <= (f.end_port or f.port))))})
        if names:
            return Side(False, f"{', '.join(endpoint.policies)} isolate(s) it for egress and "
                               f"allow this port only to addresses the node's DNS proxy saw "
                               f"answered for {', '.join(names)} (toFQDNs){passed}")
        return Side(False, f"{', '.join(endpoint.policies)} isolate(s) it for {direction} "
                           f"and allow no such peer and port{passed}")
    baseline = _tier(endpoint, "baseline", direction, peer, protocol, port)
    if baseline is not None and baseline.action != "Pass":
        return Side(baseline.action == "Accept",
                    f"Baseline tier: {rules.get(baseline.precedence)}{passed}")
    return Side(True, f"no policy isolates it for {direction}{passed}")


def endpoint(policies: ir.NetworkPolicies, address: str) -> ir.EndpointPolicy | None:
    return next((e for e in policies.endpoints if e.address == address), None)


def verdict(source_node: ir.NetworkPolicies, destination_node: ir.NetworkPolicies,
            source: str, destination: str, protocol: str, port: int) -> tuple[bool, str]:
    """Whether a new flow from `source` to `destination` passes: the source's egress on its
    node, then the destination's ingress on its node."""
    out = decide(endpoint(source_node, source), "egress", peer_of(source_node, destination),
                 protocol, port)
    if not out.allowed:
        return False, f"source's egress {out.reason}"
    into = decide(endpoint(destination_node, destination), "ingress",
                  peer_of(destination_node, source), protocol, port)
    if not into.allowed:
        return False, f"destination's ingress {into.reason}"
    return True, f"source's egress: {out.reason}; destination's ingress: {into.reason}"
