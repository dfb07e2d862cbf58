"""ClusterNetworkPolicy tiers to what the datapath enforces (ir.TierEntry), pure.

The datapath finds, per peer identity, the most specific entry for a protocol and port (an LPM
trie), not the rule that comes first. So the rules are flattened here: for each pod, tier,
direction and peer identity, the protocol and port space is cut where rules begin and end, and
each piece holds the action of the first rule (in the tier's order) that covers it. The
datapath then takes, of the entries its lookups find (the peer's identity, its CIDR identity,
any peer), the one of lowest precedence: the first rule that matches, as the specification
says.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from mesh import ir
from mesh.policy import clusternetworkpolicy as cnp
from mesh.policy import identities as ids
from mesh.policy.networkpolicy import Invalid
from mesh.store import kinds
from mesh.store.objects import KubeObject, ObjectKey
from mesh.store.store import StoreSnapshot
from mesh.translate.status import ClassStatus, policy_accepted

PROTOCOLS = ("TCP", "UDP", "SCTP")
MAX_PORT = 65535


@dataclass(frozen=True)
class Piece:
    """One rule's reach for one peer identity: a protocol (None: all) and a port range."""

    precedence: int
    action: str
    protocol: str | None
    low: int = 0
    high: int = MAX_PORT


def flatten(tier: str, direction: str, identity: int, pieces: Iterable[Piece]
            ) -> list[ir.TierEntry]:
    """Non-overlapping entries, each with the first rule that covers it."""
    pieces = list(pieces)
    out: list[ir.TierEntry] = []
    any_proto = [p for p in pieces if p.protocol is None]
    for proto in PROTOCOLS:
        mine = [p for p in pieces if p.protocol in (proto, None)]
        if not mine:
            continue
        cuts = sorted({0, MAX_PORT + 1} | {p.low for p in mine} | {p.high + 1 for p in mine})
        run: tuple[int, int, Piece] | None = None  # (low, high, the piece that wins there)
        for low, nxt in itertools.pairwise(cuts):
            covering = [p for p in mine if p.low <= low and nxt - 1 <= p.high]
            best = min(covering, key=lambda p: p.precedence) if covering else None
            if run is not None and best is run[2]:
                run = (run[0], nxt - 1, best)
                continue
            if run is not None:
                out.append(_entry(tier, direction, identity, proto, run))
            run = (low, nxt - 1, best) if best is not None else None
        if run is not None:
            out.append(_entry(tier, direction, identity, proto, run))
    if any_proto:  # every other protocol (no ports): the first rule for every protocol
        best = min(any_proto, key=lambda p: p.precedence)
        out.append(ir.TierEntry(tier, direction, identity, None, None, None, best.action,
                                best.precedence))
    return out


def entry_order(e: ir.TierEntry) -> tuple[str, str, int, str, int, int]:
    return (e.tier, e.direction, e.identity, e.protocol or "", e.port or 0, e.precedence)


def _entry(tier: str, direction: str, identity: int, proto: str,
           run: tuple[int, int, Piece]) -> ir.TierEntry:
    low, high, piece = run
    whole = low == 0 and high == MAX_PORT
    return ir.TierEntry(tier, direction, identity, proto, None if whole else low,
                        None if whole or high == low else high, piece.action, piece.precedence)


def pod_tiers(policies: list[cnp.ClusterNetworkPolicy], namespace_labels: Mapping[str, str],
              pod_labels: Mapping[str, str], local_ports: Mapping[str, tuple[int, str]],
              peer_identities: Callable[[cnp.Peer], list[int]],
              named_ports: Callable[[int, str], set[tuple[int, str]]],
              ) -> tuple[list[ir.TierEntry], list[tuple[int, str]]]:
    """A pod's tier entries, and the rule each precedence number stands for.
    `peer_identities`: the identities (label sets and CIDRs) a peer holds; `named_ports`:
    (identity, port name) -> the (port, protocol)s the identity's pods give that name."""
    entries: list[ir.TierEntry] = []
    names: list[tuple[int, str]] = []
    precedence = 0
    for tier in cnp.TIERS:
        # Every policy of the tier together: their entries for one peer identity share keys.
        pieces: dict[tuple[str, int], list[Piece]] = {}  # (direction, identity) -> pieces
        for policy in cnp.ordered(policies, tier):
            if not policy.selects(namespace_labels, pod_labels):
                continue
            for direction, rules in (("ingress", policy.ingress), ("egress", policy.egress)):
                for rule in rules:
                    precedence += 1
                    names.append((precedence, f"{policy.name}: {rule.name} ({rule.action})"))
                    for peer in rule.peers:
                        for identity in ([ids.ANY] if peer.everything
                                         else peer_identities(peer)):
                            pieces.setdefault((direction, identity), []).extend(
                                _pieces(rule, precedence, direction, identity, local_ports,
                                        named_ports))
        for (direction, identity), mine in pieces.items():
            entries += flatten(tier.lower(), direction, identity, mine)
    return sorted(entries, key=entry_order), names


def _pieces(rule: cnp.Rule, precedence: int, direction: str, identity: int,
            local_ports: Mapping[str, tuple[int, str]],
            named_ports: Callable[[int, str], set[tuple[int, str]]]) -> list[Piece]:
    if not rule.ports:
        return [Piece(precedence, rule.action, None)]
    out = []
    for p in rule.ports:
        if p.named is not None:
            # The destination pod's containerPort of that name: this pod's for ingress,
            # the peer identity's pods' for egress.
            found = ({local_ports[p.named]} if p.named in local_ports else set()) \
                if direction == "ingress" else named_ports(identity, p.named)
            out += [Piece(precedence, rule.action, proto, port, port) for port, proto in found]
        elif p.port is None:
            out.append(Piece(precedence, rule.action, p.protocol))
        else:
            out.append(Piece(precedence, rule.action, p.protocol, p.port,
                             p.end_port or p.port))
    return out


def statuses(snapshot: StoreSnapshot, parse: Callable[[KubeObject], cnp.ClusterNetworkPolicy]
             = cnp.parse) -> dict[ObjectKey, ClassStatus]:
    """Each ClusterNetworkPolicy's Accepted condition: True when every rule is enforced as
    written; False with the reason when it is refused (Invalid: nothing of it is enforced) or
    a peer fails closed (UnsupportedValue: what is enforced instead)."""
    out = {}
    for obj in snapshot.of_kind(kinds.CLUSTER_NETWORK_POLICY):
        try:
            parsed = parse(obj)
        except Invalid as e:
            out[obj.key] = policy_accepted(obj.generation, f"{e}; not enforced", (), "")
            continue
        out[obj.key] = policy_accepted(
            obj.generation, None, parsed.problems,
            f"{parsed.tier} tier, priority {parsed.priority}: enforced by every node's datapath")
    return out
