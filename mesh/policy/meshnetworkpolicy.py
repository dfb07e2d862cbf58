"""MeshNetworkPolicy (mesh.dev/v1alpha1, gateway-api/meshnetworkpolicy.yaml): the project's
policy kind, in the spirit of CiliumNetworkPolicy, parsed into what the compiler needs.

A policy selects pods of its namespace and isolates them in each direction it lists (like a
NetworkPolicy with that policy type; the allows of both kinds add up). A rule allows its peers
(fromEndpoints: pods of the namespace; fromNamespaces: every pod of the namespaces selected;
fromCIDRs; fromEntities: world, host, remote-node, cluster, all; none of them: every peer) on
its ports (none: every port). An ingress port with HTTP or gRPC rules sends the peers' flows
to the node's Envoy, which lets a request through when one of the rules matches it and
answers 403 otherwise. An egress rule's toFQDNs (names, or patterns where `*` stands for the
characters of one label) allows the addresses the DNS answers give for them, for the records'
TTL: the node's DNS proxy sees the pod's queries and learns them.

Not enforced yet, and so failing closed (the port allows nothing, and the status says so):
L7 rules on egress.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh.policy.networkpolicy import Invalid, Selector, as_list, parse_selector
from mesh.store.objects import KubeObject

ENTITIES = ("world", "host", "remote-node", "cluster", "all")
NAME = re.compile(r"[-a-z0-9_]+(\.[-a-z0-9_]+)*")
PATTERN = re.compile(r"[-a-z0-9_*]+(\.[-a-z0-9_*]+)*")
MAX_FQDNS = 32  # per rule, as the CRD bounds them


@dataclass(frozen=True)
class HTTPRule:
    method: str | None = None
    path: str | None = None  # a regular expression the whole path matches
    host: str | None = None
    headers: tuple[tuple[str, str | None], ...] = ()  # (name, value; None: present)
    grpc: bool = False  # from a gRPC rule: the pod speaks HTTP/2


@dataclass(frozen=True)
class PortRule:
    protocol: str
    port: int | None  # None: every port
    end_port: int | None = None
    http: tuple[HTTPRule, ...] = ()  # gRPC rules arrive here as their HTTP/2 requests

    @property
    def l7(self) -> bool:
        return bool(self.http)


@dataclass(frozen=True)
class Rule:
    endpoints: tuple[Selector, ...] = ()
    namespaces: tuple[Selector, ...] = ()
    cidrs: tuple[str, ...] = ()
    entities: tuple[str, ...] = ()
    ports: tuple[PortRule, ...] = ()
    fqdns: tuple[str, ...] = ()  # toFQDNs: names and patterns, lower case, no trailing dot

    @property
    def any_peer(self) -> bool:
        return not (self.endpoints or self.namespaces or self.cidrs or self.entities
                    or self.fqdns)


def fqdn_regex(pattern: str) -> re.Pattern[str]:
    """What a toFQDNs name or pattern matches (names in lower case, no trailing dot): `*`
    any characters of one label (as Cilium's matchPattern); `*` alone, every name."""
    if pattern == "*":
        return re.compile(r".+")
    return re.compile(r"\.".join(
        "[-a-z0-9_]*".join(re.escape(part) for part in label.split("*"))
        for label in pattern.split(".")))


def _fqdns(raw: Any, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_FQDNS:
        raise Invalid(f"{where}: a list of at most {MAX_FQDNS}")
    out = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, Mapping) or ("matchName" in item) == ("matchPattern" in item):
            raise Invalid(f"{at}: one of matchName and matchPattern")
        field = "matchName" if "matchName" in item else "matchPattern"
        text = str(item[field]).lower().rstrip(".")
        if len(text) > 253 or not (NAME if field == "matchName" else PATTERN).fullmatch(text):
            raise Invalid(f"{at}.{field}: {item[field]!r} is not a DNS "
                          f"{'name' if field == 'matchName' else 'pattern'}")
        out.append(text)
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class MeshNetworkPolicy:
    namespace: str
    name: str
    selector: Selector
    ingress: tuple[Rule, ...] | None
    egress: tuple[Rule, ...] | None
    problems: tuple[str, ...] = ()


def _selectors(raw: Any, where: str) -> tuple[Selector, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise Invalid(f"{where}: must be a list")
    return tuple(parse_selector(s, f"{where}[{i}]") for i, s in enumerate(raw))


def _http(raw: Any, where: str) -> HTTPRule:
    if not isinstance(raw, Mapping):
        raise Invalid(f"{where}: must be an object")
    path = raw.get("path")
    if path is not None:
        try:
            re.compile(str(path))
        except re.error as e:
            raise Invalid(f"{where}.path: not a regular expression: {e}") from None
    headers = tuple((str(h.get("name")), None if h.get("value") is None else str(h["value"]))
                    for h in as_list(raw.get("headers"), f"{where}.headers")
                    if isinstance(h, Mapping))
    return HTTPRule(None if raw.get("method") is None else str(raw["method"]).upper(),
                    None if path is None else str(path),
                    None if raw.get("host") is None else str(raw["host"]).lower(), headers)


def _grpc(raw: Any, where: str) -> HTTPRule:
    """A gRPC rule as the HTTP/2 request it allows: POST /service/method."""
    if not isinstance(raw, Mapping) or not raw.get("service"):
        raise Invalid(f"{where}.service: required")
    method = raw.get("method")
    path = "/" + re.escape(str(raw["service"])) + "/" + (re.escape(str(method)) if method
                                                       else "[^/]+")
    return HTTPRule("POST", path, grpc=True)


def _ports(raw: Any, where: str, egress: bool, problems: list[str]) -> tuple[PortRule, ...]:
    out = []
    for i, p in enumerate(as_list(raw, where)):
        at = f"{where}[{i}]"
        if not isinstance(p, Mapping) or not isinstance(p.get("port"), int):
            raise Invalid(f"{at}.port: required, a number")
        protocol = str(p.get("protocol") or "TCP")
        if protocol not in ("TCP", "UDP", "SCTP"):
            raise Invalid(f"{at}.protocol: {protocol!r} is not TCP, UDP or SCTP")
        port, end = int(p["port"]), p.get("endPort")
        if not 1 <= port <= 65535 or (end is not None and not (
                isinstance(end, int) and port <= end <= 65535)):
            raise Invalid(f"{at}: port 1-65535, endPort from port to 65535")
        http = tuple(_http(h, f"{at}.http[{j}]")
                     for j, h in enumerate(as_list(p.get("http"), f"{at}.http")))
        http += tuple(_grpc(g, f"{at}.grpc[{j}]")
                      for j, g in enumerate(as_list(p.get("grpc"), f"{at}.grpc")))
        if http and protocol != "TCP":
            raise Invalid(f"{at}: HTTP and gRPC rules need protocol TCP")
        if http and end not in (None, port):
            raise Invalid(f"{at}: HTTP and gRPC rules need one port (no endPort)")
        if http and egress:
            problems.append(f"{at}: HTTP and gRPC rules on egress are not enforced yet; the "
                            "port allows nothing")
            continue
        out.append(PortRule(protocol, port, end if end != port else None, http))
    return tuple(out)


def _rules(raw: Any, where: str, egress: bool, problems: list[str]) -> tuple[Rule, ...]:
    if not isinstance(raw, list):
        raise Invalid(f"{where}: must be a list")
    out = []
    prefix = "to" if egress else "from"
    for i, r in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(r, Mapping):
            raise Invalid(f"{at}: must be an object")
        fqdns = _fqdns(r["toFQDNs"], f"{at}.toFQDNs") if egress and "toFQDNs" in r else ()
        if fqdns and any(r.get(f"to{kind}") for kind in ("Endpoints", "Namespaces", "CIDRs",
                                                         "Entities")):
            raise Invalid(f"{at}: toFQDNs goes in a rule of its own (no other peers)")
        if egress and "toFQDNs" in r and not fqdns:
            continue  # an empty list: the rule allows nothing
        cidrs = []
        for c in as_list(r.get(f"{prefix}CIDRs"), f"{at}.{prefix}CIDRs"):
            try:
                cidrs.append(str(ipaddress.ip_network(str(c), strict=False)))
            except ValueError as e:
                raise Invalid(f"{at}.{prefix}CIDRs: {e}") from None
        entities = tuple(str(e) for e in as_list(r.get(f"{prefix}Entities"),
                                                 f"{at}.{prefix}Entities"))
        bad = [e for e in entities if e not in ENTITIES]
        if bad:
            raise Invalid(f"{at}.{prefix}Entities: {bad[0]!r} is not one of "
                          f"{', '.join(ENTITIES)}")
        raw_ports = r.get("toPorts")
        ports = _ports(raw_ports, f"{at}.toPorts", egress, problems)
        if raw_ports and not ports:
            continue  # every port failed closed: the rule allows nothing
        out.append(Rule(_selectors(r.get(f"{prefix}Endpoints"), f"{at}.{prefix}Endpoints"),
                        _selectors(r.get(f"{prefix}Namespaces"), f"{at}.{prefix}Namespaces"),
                        tuple(cidrs), entities, ports, fqdns))
    return tuple(out)


def parse(obj: KubeObject) -> MeshNetworkPolicy:
    spec = obj.spec
    if "endpointSelector" not in spec:
        raise Invalid("spec.endpointSelector: required")
    problems: list[str] = []
    ingress = _rules(spec["ingress"], "spec.ingress", False, problems) \
        if "ingress" in spec else None
    egress = _rules(spec["egress"], "spec.egress", True, problems) if "egress" in spec else None
    return MeshNetworkPolicy(obj.namespace, obj.name,
                             parse_selector(spec["endpointSelector"], "spec.endpointSelector"),
                             ingress, egress, tuple(problems))
