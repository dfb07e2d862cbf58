"""ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2): the cluster administrator's tiers
around the namespaces' NetworkPolicies, as its specification defines them.

A connection is judged, for each end's direction (the source's egress, the destination's
ingress), by the Admin tier first: its policies by `priority` (lower first), each policy's rules
in the order written; the first rule that matches decides: Accept (allowed, nothing else
consulted), Deny (dropped), Pass (the rest of the tier skipped). Then the NetworkPolicies of the
pod's namespace, if any isolates it. Then the Baseline tier, the same way (Pass there ends it).
Nothing decided: allowed.

A rule matches when one of its peers holds the other end and one of its protocols (none: every
protocol and port) the connection's. Peers: `namespaces` (pods of the namespaces selected),
`pods` (a namespace and a pod selector), and for egress `nodes` (the selected Nodes'
addresses) and `networks` (CIDRs). `domainNames` is not supported here: as the specification
asks of a peer an implementation cannot honour, the rule fails closed (an Accept rule matches
nothing, a Deny or Pass rule matches everything), and the policy's status says so.

This module parses (refusing what the CRD's schema refuses) and gives the rules in precedence
order; mesh/translate/network_policy.py compiles them for the datapath.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh.policy.networkpolicy import Invalid, Selector, as_list, parse_selector
from mesh.store.objects import KubeObject

TIERS = ("Admin", "Baseline")
ACTIONS = ("Accept", "Deny", "Pass")
MAX_RULES = 25


@dataclass(frozen=True)
class Peer:
    namespaces: Selector | None = None  # with pods: the pods' namespaces
    pods: Selector | None = None
    nodes: Selector | None = None
    networks: tuple[str, ...] = ()
    everything: bool = False  # a peer that fails closed as "every peer"


@dataclass(frozen=True)
class PortMatch:
    protocol: str | None  # TCP | UDP | SCTP; None: a named port (its protocol from the pod)
    port: int | None = None  # None: every port
    end_port: int | None = None
    named: str | None = None


@dataclass(frozen=True)
class Rule:
    name: str
    action: str
    peers: tuple[Peer, ...]
    ports: tuple[PortMatch, ...]  # empty: every protocol and port


@dataclass(frozen=True)
class ClusterNetworkPolicy:
    name: str
    tier: str
    priority: int
    subject_namespaces: Selector | None  # subject.namespaces; None with subject_pods
    subject_pods: Selector | None
    ingress: tuple[Rule, ...]
    egress: tuple[Rule, ...]
    problems: tuple[str, ...] = ()  # what is not enforced as written

    def selects(self, namespace_labels: Mapping[str, str], pod_labels: Mapping[str, str]
                ) -> bool:
        if self.subject_namespaces is None:
            return False
        if not self.subject_namespaces.matches(namespace_labels):
            return False
        return self.subject_pods is None or self.subject_pods.matches(pod_labels)


def _ports(raw: Any, where: str) -> tuple[PortMatch, ...]:
    out = []
    for i, p in enumerate(as_list(raw, where)):
        at = f"{where}[{i}]"
        if not isinstance(p, Mapping) or len(p) != 1:
            raise Invalid(f"{at}: exactly one of tcp, udp, sctp, destinationNamedPort")
        if "destinationNamedPort" in p:
            out.append(PortMatch(None, named=str(p["destinationNamedPort"])))
            continue
        proto = next(iter(p))
        if proto not in ("tcp", "udp", "sctp"):
            raise Invalid(f"{at}: {proto!r} is not tcp, udp, sctp or destinationNamedPort")
        dest = (p[proto] or {}).get("destinationPort") if isinstance(p[proto], Mapping) \
            else None
        if dest is None:
            out.append(PortMatch(proto.upper()))
            continue
        if "number" in dest:
            n = dest["number"]
            if not isinstance(n, int) or not 1 <= n <= 65535:
                raise Invalid(f"{at}.{proto}.destinationPort.number: 1 to 65535")
            out.append(PortMatch(proto.upper(), n))
        elif "range" in dest:
            r = dest["range"]
            start, end = r.get("start"), r.get("end")
            if not (isinstance(start, int) and isinstance(end, int) and
                    1 <= start <= end <= 65535):
                raise Invalid(f"{at}.{proto}.destinationPort.range: start <= end, 1 to 65535")
            out.append(PortMatch(proto.upper(), start, end))
        else:
            raise Invalid(f"{at}.{proto}.destinationPort: number or range")
    return tuple(out)


def _peer(raw: Any, where: str, egress: bool, problems: list[str]) -> Peer:
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise Invalid(f"{where}: exactly one peer field")
    kind = next(iter(raw))
    value = raw[kind]
    if kind == "namespaces":
        return Peer(namespaces=parse_selector(value, f"{where}.namespaces"))
    if kind == "pods":
        if not isinstance(value, Mapping):
            raise Invalid(f"{where}.pods: must be an object")
        return Peer(namespaces=parse_selector(value.get("namespaceSelector") or {},
                                              f"{where}.pods.namespaceSelector"),
                    pods=parse_selector(value.get("podSelector") or {},
                                        f"{where}.pods.podSelector"))
    if egress and kind == "nodes":
        return Peer(nodes=parse_selector(value, f"{where}.nodes"))
    if egress and kind == "networks":
        nets = []
        for n in as_list(value, f"{where}.networks"):
            try:
                nets.append(str(ipaddress.ip_network(str(n), strict=True)))
            except ValueError as e:
                raise Invalid(f"{where}.networks: {e}") from None
        return Peer(networks=tuple(nets))
    # domainNames (or a field of a newer version): fail closed, as the specification asks.
    problems.append(f"{where}: {kind} is not supported; the rule fails closed")
    return Peer(everything=True)


def _rules(raw: Any, where: str, egress: bool, problems: list[str]) -> tuple[Rule, ...]:
    rules = raw or []
    if not isinstance(rules, list):
        raise Invalid(f"{where}: must be a list")
    if len(rules) > MAX_RULES:
        raise Invalid(f"{where}: at most {MAX_RULES} rules")
    out = []
    for i, r in enumerate(rules):
        at = f"{where}[{i}]"
        if not isinstance(r, Mapping):
            raise Invalid(f"{at}: must be an object")
        action = r.get("action")
        if action not in ACTIONS:
            raise Invalid(f"{at}.action: {action!r} is not one of Accept, Deny, Pass")
        peers_raw = r.get("to" if egress else "from")
        if not isinstance(peers_raw, list) or not peers_raw:
            raise Invalid(f"{at}.{'to' if egress else 'from'}: at least one peer")
        peers = []
        for j, p in enumerate(peers_raw):
            peer = _peer(p, f"{at}.{'to' if egress else 'from'}[{j}]", egress, problems)
            if peer.everything and action == "Accept":
                continue  # fails closed: an Accept that cannot be honoured matches nothing
            peers.append(peer)
        if not peers:
            continue
        out.append(Rule(str(r.get("name") or f"rule {i}"), str(action), tuple(peers),
                        _ports(r.get("protocols"), f"{at}.protocols")))
    return tuple(out)


def parse(obj: KubeObject) -> ClusterNetworkPolicy:
    spec = obj.spec
    tier = spec.get("tier")
    if tier not in TIERS:
        raise Invalid(f"spec.tier: {tier!r} is not Admin or Baseline")
    priority = spec.get("priority")
    if not isinstance(priority, int) or isinstance(priority, bool) or \
            not 0 <= priority <= 1000:
        raise Invalid("spec.priority: a number from 0 to 1000")
    subject = spec.get("subject")
    if not isinstance(subject, Mapping) or len(subject) != 1:
        raise Invalid("spec.subject: exactly one of namespaces, pods")
    if "namespaces" in subject:
        namespaces = parse_selector(subject["namespaces"] or {}, "spec.subject.namespaces")
        pods = None
    elif "pods" in subject and isinstance(subject["pods"], Mapping):
        namespaces = parse_selector(subject["pods"].get("namespaceSelector") or {},
                                    "spec.subject.pods.namespaceSelector")
        pods = parse_selector(subject["pods"].get("podSelector") or {},
                              "spec.subject.pods.podSelector")
    else:
        raise Invalid("spec.subject: exactly one of namespaces, pods")
    problems: list[str] = []
    ingress = _rules(spec.get("ingress"), "spec.ingress", False, problems)
    egress = _rules(spec.get("egress"), "spec.egress", True, problems)
    return ClusterNetworkPolicy(obj.name, str(tier), int(priority), namespaces, pods,
                                ingress, egress, tuple(problems))


def ordered(policies: list[ClusterNetworkPolicy], tier: str) -> list[ClusterNetworkPolicy]:
    """A tier's policies in precedence order: priority, then name (the specification leaves
    equal priorities to the implementation: by name, so every node orders them alike)."""
    return sorted((p for p in policies if p.tier == tier), key=lambda p: (p.priority, p.name))
