"""Kubernetes NetworkPolicy (networking.k8s.io/v1): what it allows, as the API defines it.

A pod is isolated for ingress (egress) once a policy of its namespace selects it with
`Ingress` (`Egress`) among its policyTypes; an isolated pod accepts (sends) only what some
rule of those policies allows; policies add up, none denies. A connection needs both: the
source's egress and the destination's ingress. Replies of an allowed connection always pass
(the datapath's connection tracking). The peer of a rule: pods of the policy's namespace by
`podSelector`, pods of namespaces by `namespaceSelector` (and `podSelector` within them), or
addresses by `ipBlock` (`cidr` less `except`); a rule without peers takes every peer. Its
ports: a number or the name of the destination pod's containerPort, a protocol (TCP unless
said), a range to `endPort`; none, every port.

This module is the semantics, pure: `parse` refuses what the API server refuses (with its
reasons), `Decision.verdict` answers "would A reach B on this port, and which policies
decide", which the datapath's maps and `mesh policy` are made from.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.store.objects import KubeObject

PROTOCOLS = ("TCP", "UDP", "SCTP")


class Invalid(ValueError):
    """A policy the API server would refuse."""


def as_list(raw: Any, where: str) -> list[Any]:
    """A list field: absent or null, empty; anything but a list, refused."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise Invalid(f"{where}: must be a list")
    return raw


# -- selectors ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Selector:
    """A label selector: matchLabels and matchExpressions (In, NotIn, Exists,
    DoesNotExist); empty selects everything."""

    labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.labels):
            return False
        for key, op, values in self.expressions:
            present = key in labels
            if op == "In":
                ok = present and labels[key] in values
            elif op == "NotIn":
                ok = not (present and labels[key] in values)
            elif op == "Exists":
                ok = present
            else:  # DoesNotExist
                ok = not present
            if not ok:
                return False
        return True


def parse_selector(raw: Any, where: str) -> Selector:
    if raw is None:
        return Selector()
    if not isinstance(raw, Mapping):
        raise Invalid(f"{where}: must be a label selector")
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, Mapping):
        raise Invalid(f"{where}.matchLabels: must be a map")
    expressions = []
    for i, e in enumerate(as_list(raw.get("matchExpressions"), f"{where}.matchExpressions")):
        op = e.get("operator") if isinstance(e, Mapping) else None
        values = tuple(str(v) for v in as_list(e.get("values"), f"{where}.values")) \
            if isinstance(e, Mapping) \
            else ()
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise Invalid(f"{where}.matchExpressions[{i}].operator: {op!r} is not one of "
                          "In, NotIn, Exists, DoesNotExist")
        if op in ("In", "NotIn") and not values:
            raise Invalid(f"{where}.matchExpressions[{i}].values: must be non-empty for {op}")
        if op in ("Exists", "DoesNotExist") and values:
            raise Invalid(f"{where}.matchExpressions[{i}].values: must be empty for {op}")
        expressions.append((str(e.get("key")), str(op), values))
    return Selector(tuple(sorted((str(k), str(v)) for k, v in labels.items())),
                    tuple(expressions))


# -- the policy -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Port:
    protocol: str  # TCP | UDP | SCTP
    port: int | str | None  # a number, a containerPort's name, or None: every port
    end_port: int | None = None

    def matches(self, port: int, protocol: str, named: Mapping[str, tuple[int, str]]) -> bool:
        if protocol != self.protocol:
            return False
        if self.port is None:
            return True
        if isinstance(self.port, str):
            # A name means the destination pod's containerPort of that name (and protocol).
            found = named.get(self.port)
            return found is not None and found == (port, protocol)
        return self.port <= port <= (self.end_port or self.port)


@dataclass(frozen=True)
class Peer:
    pods: Selector | None = None  # None with namespaces: every pod of those namespaces
    namespaces: Selector | None = None  # None: the policy's own namespace
    cidr: str | None = None  # ipBlock
    except_: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    peers: tuple[Peer, ...]  # empty: every peer
    ports: tuple[Port, ...]  # empty: every port


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    selector: Selector
    ingress: tuple[Rule, ...] | None  # None: the policy does not isolate for ingress
    egress: tuple[Rule, ...] | None


def _port(raw: Any, where: str) -> Port:
    if not isinstance(raw, Mapping):
        raise Invalid(f"{where}: must be an object")
    protocol = raw.get("protocol") or "TCP"  # the API server's default
    if protocol not in PROTOCOLS:
        raise Invalid(f"{where}.protocol: {protocol!r} is not one of TCP, UDP, SCTP")
    port = raw.get("port")
    end = raw.get("endPort")
    if isinstance(port, bool) or not (port is None or isinstance(port, (int, str))):
        raise Invalid(f"{where}.port: must be a number or a name")
    if isinstance(port, int) and not 1 <= port <= 65535:
        raise Invalid(f"{where}.port: {port} is not between 1 and 65535")
    if end is not None:
        if port is None:
            raise Invalid(f"{where}.endPort: may not be set without port")
        if isinstance(port, str):
            raise Invalid(f"{where}.endPort: may not be set with a named port")
        if not isinstance(end, int) or isinstance(end, bool) or end < port or end > 65535:
            raise Invalid(f"{where}.endPort: must be a number from port ({port}) to 65535")
    return Port(str(protocol), port, end)


def _peer(raw: Any, where: str) -> Peer:
    if not isinstance(raw, Mapping):
        raise Invalid(f"{where}: must be an object")
    block = raw.get("ipBlock")
    if block is not None and not isinstance(block, Mapping):
        raise Invalid(f"{where}.ipBlock: must be an object")
    if block is not None:
        if "podSelector" in raw or "namespaceSelector" in raw:
            raise Invalid(f"{where}: ipBlock may not be combined with a selector")
        try:
            cidr = ipaddress.ip_network(str(block.get("cidr")), strict=False)
            excepts = [ipaddress.ip_network(str(e), strict=False)
                       for e in as_list(block.get("except"), f"{where}.ipBlock.except")]
        except ValueError as error:
            raise Invalid(f"{where}.ipBlock: {error}") from None
        for net in excepts:
            if net.version != cidr.version or not net.subnet_of(cidr):  # type: ignore[arg-type]
                raise Invalid(f"{where}.ipBlock.except: {net} is not within {cidr}")
        return Peer(cidr=str(cidr), except_=tuple(str(net) for net in excepts))
    if "podSelector" not in raw and "namespaceSelector" not in raw:
        raise Invalid(f"{where}: needs podSelector, namespaceSelector or ipBlock")
    return Peer(
        pods=parse_selector(raw["podSelector"], f"{where}.podSelector")
        if "podSelector" in raw else None,
        namespaces=parse_selector(raw["namespaceSelector"], f"{where}.namespaceSelector")
        if "namespaceSelector" in raw else None)


def _rules(raw: Any, peers_key: str, where: str) -> tuple[Rule, ...]:
    out = []
    for i, r in enumerate(as_list(raw, where)):
        if not isinstance(r, Mapping):
            raise Invalid(f"{where}[{i}]: must be an object")
        out.append(Rule(
            tuple(_peer(p, f"{where}[{i}].{peers_key}[{j}]") for j, p in enumerate(
                as_list(r.get(peers_key), f"{where}[{i}].{peers_key}"))),
            tuple(_port(p, f"{where}[{i}].ports[{j}]") for j, p in enumerate(
                as_list(r.get("ports"), f"{where}[{i}].ports")))))
    return tuple(out)


def parse(obj: KubeObject) -> NetworkPolicy:
    spec = obj.spec
    if "podSelector" not in spec:
        raise Invalid("spec.podSelector: required")
    types = spec.get("policyTypes")
    if types is None:
        # The API server's default: Ingress always, Egress when there are egress rules.
        types = ["Ingress"] + (["Egress"] if spec.get("egress") else [])
    if not isinstance(types, list) or any(t not in ("Ingress", "Egress") for t in types):
        raise Invalid("spec.policyTypes: each must be Ingress or Egress")
    ingress = _rules(spec.get("ingress"), "from", "spec.ingress")
    egress = _rules(spec.get("egress"), "to", "spec.egress")
    return NetworkPolicy(obj.namespace, obj.name,
                         parse_selector(spec["podSelector"], "spec.podSelector"),
                         ingress if "Ingress" in types else None,
                         egress if "Egress" in types else None)


# -- decisions ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    """One end of a connection: a pod (namespace set) or an address outside the pods."""

    address: str
    namespace: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    # containerPort name -> (port, protocol): what a named port in a policy means for it
    ports: Mapping[str, tuple[int, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    # The policies that decided: those that allowed, or (denied) those that isolate the end
    # that refused. Each as "namespace/name (Ingress|Egress)".
    policies: tuple[str, ...]
    reason: str


@dataclass
class Decision:
    policies: Sequence[NetworkPolicy]
    namespaces: Mapping[str, Mapping[str, str]]  # namespace -> its labels

    def _peer_matches(self, peer: Peer, policy: NetworkPolicy, other: Endpoint) -> bool:
        if peer.cidr is not None:
            ip = ipaddress.ip_address(other.address)
            return ip in ipaddress.ip_network(peer.cidr) and not any(
                ip in ipaddress.ip_network(e) for e in peer.except_)
        if other.namespace is None:
            return False  # selectors select pods
        if peer.namespaces is None:
            if other.namespace != policy.namespace:
                return False
        elif not peer.namespaces.matches(self.namespaces.get(other.namespace, {})):
            return False
        return peer.pods is None or peer.pods.matches(other.labels)

    def _side(self, pod: Endpoint, other: Endpoint, direction: str, port: int,
              protocol: str, destination: Endpoint) -> tuple[bool, tuple[str, ...]]:
        """Whether `pod`'s policies let the connection through in `direction`, and which
        policies decide (none: `pod` is not isolated that way)."""
        isolating = []
        allowing = []
        for p in self.policies:
            rules = p.ingress if direction == "Ingress" else p.egress
            if rules is None or p.namespace != pod.namespace or not p.selector.matches(
                    pod.labels):
                continue
            name = f"{p.namespace}/{p.name} ({direction})"
            isolating.append(name)
            if any((not r.peers or any(self._peer_matches(x, p, other) for x in r.peers)) and
                   (not r.ports or any(x.matches(port, protocol, destination.ports)
                                       for x in r.ports)) for r in rules):
                allowing.append(name)
        if not isolating:
            return True, ()
        return bool(allowing), tuple(allowing or isolating)

    def verdict(self, source: Endpoint, destination: Endpoint, port: int,
                protocol: str) -> Verdict:
        decided: list[str] = []
        for pod, other, direction, end in (
                (source, destination, "Egress", "source's egress"),
                (destination, source, "Ingress", "destination's ingress")):
            if pod.namespace is None:
                continue  # an address outside the pods: no policy of its own
            ok, by = self._side(pod, other, direction, port, protocol, destination)
            if not ok:
                return Verdict(False, by, f"the {end} policies allow no such connection")
            decided += by
        return Verdict(True, tuple(decided), "allowed by policy" if decided
                       else "no policy isolates either end")
