"""NetworkPolicies to what the datapath enforces on this node (mesh/ir/policy.py), pure.

The datapath knows peers by identity (mesh/policy/identities.py), so a rule's peers become
identities here: a `podSelector`/`namespaceSelector` peer is every identity whose labels it
selects (an identity's labels hold its namespace and, prefixed `ns:`, that namespace's labels,
so both selectors are answered from the identity alone: a pod relabelled has another identity);
an `ipBlock` peer is every CIDR identity inside its `cidr` and outside its `except`s.

CIDR identities: the CIDRs and excepts of every policy cut the address space into classes, one
per CIDR (the longest that holds an address is its class). Each CIDR gets a number above the
label sets' (`CIDR_FIRST`...) and the ipcache gives every address the number of its class
beside its own identity, so an `ipBlock` selects pods and the world alike, by address, as
Kubernetes wants, at the cost of one more lookup per new flow.

Named ports resolve on the destination pod: for ingress the local pod's own `containerPorts`,
for egress those of the pods of each selected identity (two pods of one identity naming a port
differently both get both numbers: identities, not pods, are what the datapath knows).

A policy that cannot be parsed fails closed: the pods its selector takes (every pod of its
namespace if the selector itself is broken) are isolated both ways and it allows nothing.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mesh import ir
from mesh.policy import clusternetworkpolicy as cnp
from mesh.policy import identities as ids
from mesh.policy import meshnetworkpolicy as mnp
from mesh.policy import networkpolicy as netpol
from mesh.store import kinds
from mesh.store.objects import KubeObject, ObjectKey
from mesh.store.store import StoreSnapshot
from mesh.translate import addressing, model
from mesh.translate.cluster_network_policy import pod_tiers
from mesh.translate.encryption import tunnel_source
from mesh.translate.status import ClassStatus, policy_accepted

POLICY_PORT = 15002  # the node Envoy's listener for flows with L7 policy rules
DNS_PROXY_PORT = 15053  # the agent's DNS proxy (UDP and TCP, loopback), for toFQDNs rules
# What a pod with toFQDNs rules may always send, through the DNS proxy: its DNS, anywhere.
DNS_ALLOWS = (ir.PolicyAllow("egress", ids.ANY, "TCP", 53, dns=True),
              ir.PolicyAllow("egress", ids.ANY, "UDP", 53, dns=True))
CIDR_FIRST = 1 << 24  # CIDR identities: 2^24 .. 2^25-1 (Cilium's local scope starts there)
CIDR_SPAN = 1 << 24
# containerPort name -> the (port, protocol) pairs it names
NamedPorts = Mapping[str, frozenset[tuple[int, str]]]


@dataclass(frozen=True)
class _Identity:
    number: int
    namespace: str
    pod_labels: Mapping[str, str]
    namespace_labels: Mapping[str, str]


@dataclass(frozen=True)
class _Pod:
    address: str
    namespace: str
    labels: Mapping[str, str]
    identity: int
    ports: Mapping[str, tuple[int, str]]  # containerPort name -> (port, protocol)
    local: bool


class ParseMemo:
    """Parsed NetworkPolicies, ClusterNetworkPolicies and identities kept between translations
    by the caller, by object and content version: with 1,000 policies, parsing them all again
    for each change would cost more than the change. Only the current objects are kept (those
    asked for between `begin` and `end`); asked again after `end`, they are not parsed again
    (the policies' statuses read them so)."""

    def __init__(self) -> None:
        self.parsed: dict[tuple[ObjectKey, str], Any] = {}
        self._fresh: dict[tuple[ObjectKey, str], Any] = {}

    def get(self, obj: KubeObject, parse: Callable[[KubeObject], Any]) -> Any:
        """`parse(obj)`, or what it gave for this content before; an exception it raised is
        kept (and raised) the same way."""
        key = (obj.key, obj.version)
        found = self.parsed.get(key, _MISSING)
        if found is _MISSING:
            try:
                found = parse(obj)
            except netpol.Invalid as e:
                found = e
        self._fresh[key] = found
        if isinstance(found, netpol.Invalid):
            raise found
        return found

    def begin(self) -> None:
        self._fresh = {}

    def end(self) -> None:
        self.parsed = self._fresh


_MISSING = object()


def _identity(obj: KubeObject) -> _Identity | None:
    labels = obj.spec.get("labels")
    if not obj.name.isdigit() or not isinstance(labels, Mapping):
        return None
    number = int(obj.name)
    if not ids.FIRST <= number <= ids.LAST:
        return None
    text = {str(k): str(v) for k, v in labels.items()}
    return _Identity(
        number, text.get(ids.NAMESPACE_LABEL, ""),
        {k: v for k, v in text.items() if k != ids.NAMESPACE_LABEL and
         not k.startswith(ids.NAMESPACE_LABELS_PREFIX)},
        {k[len(ids.NAMESPACE_LABELS_PREFIX):]: v for k, v in text.items()
         if k.startswith(ids.NAMESPACE_LABELS_PREFIX)})


def _identities(snapshot: StoreSnapshot, memo: ParseMemo) -> dict[int, _Identity]:
    out = {}
    for obj in snapshot.of_kind(kinds.MESH_IDENTITY):
        found = memo.get(obj, _identity)
        if found is not None:
            out[found.number] = found
    return out


def container_ports(pod: KubeObject) -> dict[str, tuple[int, str]]:
    """A pod's named containerPorts: name -> (port, protocol)."""
    out = {}
    for c in model.as_list(pod.spec.get("containers")):
        if not isinstance(c, Mapping):
            continue
        for p in model.as_list(c.get("ports")):
            if isinstance(p, Mapping) and p.get("name") and \
                    isinstance(p.get("containerPort"), int):
                out[str(p["name"])] = (int(p["containerPort"]), str(p.get("protocol") or "TCP"))
    return out


def _pods(snapshot: StoreSnapshot, table: ids.IdentityTable, node: str | None) -> list[_Pod]:
    namespaces = {o.name: o.labels for o in snapshot.of_kind(kinds.NAMESPACE)}
    out = []
    for pod in snapshot.of_kind(kinds.POD):
        status = pod.body.get("status")
        if isinstance(status, Mapping) and status.get("phase") in ("Succeeded", "Failed"):
            continue
        labels = ids.identity_labels(pod.namespace, pod.labels,
                                     namespaces.get(pod.namespace, {}))
        number = table.find(labels)
        local = node is None or pod.spec.get("nodeName") in (None, node)
        for a in model.pod_ips(status):
            if model.is_ipv4(a):
                out.append(_Pod(a, pod.namespace, pod.labels,
                                ids.UNMANAGED if number is None else number,
                                container_ports(pod), local))
    return out


def cidr_identities(prefixes: Iterable[ipaddress.IPv4Network]) -> dict[ipaddress.IPv4Network,
                                                                          int]:
    """A number per CIDR, from its text (a CIDR keeps its number while others come and go);
    two CIDRs whose digests meet: the later in order probes on."""
    taken: dict[int, ipaddress.IPv4Network] = {}
    out = {}
    for net in sorted(set(prefixes), key=lambda n: (int(n.network_address), n.prefixlen)):
        start = int.from_bytes(hashlib.blake2b(str(net).encode(), digest_size=4).digest(),
                               "big") % CIDR_SPAN
        for i in range(CIDR_SPAN):
            n = CIDR_FIRST + (start + i) % CIDR_SPAN
            if n not in taken:
                taken[n] = net
                out[net] = n
                break
    return out


class _Compiler:
    """Rules to PolicyAllow entries, against one snapshot's identities, pods and CIDRs."""

    def __init__(self, identities: Mapping[int, _Identity], pods: list[_Pod],
                 cidrs: Mapping[ipaddress.IPv4Network, int]) -> None:
        self.identities = identities
        self.cidrs = cidrs
        # identity -> the named ports its pods have
        self.named: dict[int, dict[str, set[tuple[int, str]]]] = {}
        for p in pods:
            for name, port in p.ports.items():
                self.named.setdefault(p.identity, {}).setdefault(name, set()).add(port)
        self.pods_by_cidr: dict[int, set[int]] = {}  # CIDR identity -> pod identities in it
        for p in pods:
            c = cidr_of(ipaddress.IPv4Address(p.address), cidrs)
            if c:
                self.pods_by_cidr.setdefault(c, set()).add(p.identity)
        # Indexes, so that a selector is matched against the identities that carry its
        # matchLabels only (1,000 policies x 1,000 identities would be a million matches).
        self.by_namespace: dict[str, set[int]] = {}
        self.by_label: dict[tuple[str, str], set[int]] = {}
        self.by_namespace_label: dict[tuple[str, str], set[int]] = {}
        for ident in identities.values():
            self.by_namespace.setdefault(ident.namespace, set()).add(ident.number)
            for kv in ident.pod_labels.items():
                self.by_label.setdefault(kv, set()).add(ident.number)
            for kv in ident.namespace_labels.items():
                self.by_namespace_label.setdefault(kv, set()).add(ident.number)
        self._peers: dict[tuple[netpol.Peer, str], list[int]] = {}
        self._rules: dict[tuple[str, netpol.Rule, str, tuple[tuple[str, tuple[int, str]], ...]],
                          set[ir.PolicyAllow]] = {}

    def peer_identities(self, peer: netpol.Peer, policy_ns: str) -> list[int]:
        key = (peer, policy_ns)
        found = self._peers.get(key)
        if found is None:
            found = self._peers[key] = self._peer_identities(peer, policy_ns)
        return found

    def _candidates(self, peer: netpol.Peer, policy_ns: str) -> set[int] | None:
        """The identities a selector peer can select, from the indexes (None: all)."""
        out: set[int] | None = None
        if peer.namespaces is None:
            out = set(self.by_namespace.get(policy_ns, ()))
        for kv in peer.namespaces.labels if peer.namespaces is not None else ():
            found = self.by_namespace_label.get(kv, set())
            out = found.copy() if out is None else out & found
        for kv in peer.pods.labels if peer.pods is not None else ():
            found = self.by_label.get(kv, set())
            out = found.copy() if out is None else out & found
        return out

    def _peer_identities(self, peer: netpol.Peer, policy_ns: str) -> list[int]:
        if peer.cidr is not None:
            if ipaddress.ip_network(peer.cidr).version != 4:
                return []
            net = ipaddress.IPv4Network(peer.cidr)
            excepts = [ipaddress.IPv4Network(e) for e in peer.except_]
            return sorted(n for c, n in self.cidrs.items() if c.subnet_of(net) and
                          not any(c.subnet_of(e) for e in excepts))
        out = []
        candidates = self._candidates(peer, policy_ns)
        for ident in (self.identities.values() if candidates is None
                      else (self.identities[n] for n in candidates)):
            if peer.namespaces is None:
                if ident.namespace != policy_ns:
                    continue
            elif not peer.namespaces.matches(ident.namespace_labels):
                continue
            if peer.pods is None or peer.pods.matches(ident.pod_labels):
                out.append(ident.number)
        return sorted(out)

    def allows(self, direction: str, rule: netpol.Rule, policy_ns: str,
               local_ports: Mapping[str, tuple[int, str]]) -> set[ir.PolicyAllow]:
        key = (direction, rule, policy_ns, tuple(sorted(local_ports.items())))
        found = self._rules.get(key)
        if found is None:
            found = self._rules[key] = self._allows(direction, rule, policy_ns, local_ports)
        return found

    def _allows(self, direction: str, rule: netpol.Rule, policy_ns: str,
                local_ports: Mapping[str, tuple[int, str]]) -> set[ir.PolicyAllow]:
        peers: list[int] = []
        if not rule.peers:
            peers = [ids.ANY]
        for peer in rule.peers:
            peers += self.peer_identities(peer, policy_ns)
        out: set[ir.PolicyAllow] = set()
        ports = rule.ports or (None,)
        for port in ports:
            for peer_id in peers:
                out.update(self._entries(direction, peer_id, port, local_ports))
        return out

    def _entries(self, direction: str, peer_id: int, port: netpol.Port | None,
                 local_ports: Mapping[str, tuple[int, str]]) -> list[ir.PolicyAllow]:
        if port is None:
            return [ir.PolicyAllow(direction, peer_id)]
        if port.port is None:
            return [ir.PolicyAllow(direction, peer_id, port.protocol)]
        if isinstance(port.port, int):
            end = port.end_port if port.end_port and port.end_port != port.port else None
            return [ir.PolicyAllow(direction, peer_id, port.protocol, port.port, end)]
        # A named port: the destination's containerPort of that name and protocol.
        if direction == "ingress":
            found = local_ports.get(port.port)
            return [ir.PolicyAllow(direction, peer_id, port.protocol, found[0])] \
                if found and found[1] == port.protocol else []
        numbers = {n for n, proto in self.named_ports(peer_id, port.port)
                   if proto == port.protocol}
        return [ir.PolicyAllow(direction, peer_id, port.protocol, n) for n in sorted(numbers)]

    def named_ports(self, peer_id: int, name: str) -> set[tuple[int, str]]:
        """The (port, protocol)s the pods of a peer identity (any, a CIDR's) name `name`."""
        holders: Iterable[int]
        if peer_id == ids.ANY:
            holders = self.named
        elif peer_id >= CIDR_FIRST:
            holders = self.pods_by_cidr.get(peer_id, ())
        else:
            holders = (peer_id,)
        return {found for h in holders for found in self.named.get(h, {}).get(name, ())}

    def mesh_peer_identities(self, rule: mnp.Rule, policy_ns: str) -> list[int]:
        """The identities a MeshNetworkPolicy rule's peers hold."""
        if rule.any_peer:
            return [ids.ANY]
        out: set[int] = set()
        for sel in rule.endpoints:
            out.update(self.peer_identities(netpol.Peer(pods=sel), policy_ns))
        for sel in rule.namespaces:
            out.update(self.peer_identities(netpol.Peer(namespaces=sel), policy_ns))
        for text in rule.cidrs:
            if ipaddress.ip_network(text).version == 4:
                net = ipaddress.IPv4Network(text)
                out.update(n for c, n in self.cidrs.items() if c.subnet_of(net))
        for entity in rule.entities:
            if entity == "all":
                out.add(ids.ANY)
            elif entity == "world":
                out.add(ids.WORLD)
            elif entity == "host":
                out.add(ids.HOST)
            elif entity == "remote-node":
                out.add(ids.REMOTE_NODE)
            else:  # cluster: every pod, the nodes
                out.update(self.identities)
                out.update((ids.HOST, ids.REMOTE_NODE, ids.UNMANAGED))
        return sorted(out)

    def cnp_peer_identities(self, peer: cnp.Peer,
                            node_addresses: Callable[[netpol.Selector], list[str]]
                            ) -> list[int]:
        """The identities a ClusterNetworkPolicy peer holds: label sets for namespaces and
        pods; for networks and nodes (their addresses), the CIDR identities inside them."""
        if peer.nodes is None and not peer.networks:
            return self.peer_identities(
                netpol.Peer(pods=peer.pods, namespaces=peer.namespaces), "")
        nets = cnp_networks(peer, node_addresses)
        return sorted(number for c, number in self.cidrs.items()
                      if any(c.subnet_of(n) for n in nets))


def cnp_networks(peer: cnp.Peer, node_addresses: Callable[[netpol.Selector], list[str]]
                 ) -> list[ipaddress.IPv4Network]:
    """A ClusterNetworkPolicy peer's IPv4 networks: its `networks`, its nodes' addresses."""
    texts = list(peer.networks)
    if peer.nodes is not None:
        texts += [f"{a}/32" for a in node_addresses(peer.nodes)]
    return [ipaddress.IPv4Network(t) for t in texts if ipaddress.ip_network(t).version == 4]


def cidr_of(address: ipaddress.IPv4Address, cidrs: Mapping[ipaddress.IPv4Network, int]
            ) -> int:
    """The CIDR identity of the longest CIDR holding `address`, 0: none."""
    best: ipaddress.IPv4Network | None = None
    for net in cidrs:
        if address in net and (best is None or net.prefixlen > best.prefixlen):
            best = net
    return cidrs[best] if best is not None else 0


def _parsed(snapshot: StoreSnapshot, memo: ParseMemo
            ) -> tuple[list[netpol.NetworkPolicy], list[tuple[KubeObject, str]]]:
    good, bad = [], []
    for obj in snapshot.of_kind(kinds.NETWORK_POLICY):
        try:
            good.append(memo.get(obj, netpol.parse))
        except netpol.Invalid as e:
            bad.append((obj, str(e)))
    return good, bad


def translate_network_policies(snapshot: StoreSnapshot, node: str | None,
                               identity_table: ids.IdentityTable,
                               memo: ParseMemo | None = None) -> ir.NetworkPolicies:
    """The ipcache and this node's pods' policies. `node`: this node's name (None: every pod
    is this node's). `memo`: parsed objects kept from the previous call."""
    memo = memo if memo is not None else ParseMemo()
    memo.begin()
    try:
        return _translate(snapshot, node, identity_table, memo)
    finally:
        memo.end()


def _translate(snapshot: StoreSnapshot, node: str | None, identity_table: ids.IdentityTable,
               memo: ParseMemo) -> ir.NetworkPolicies:
    policies, broken = _parsed(snapshot, memo)
    problems = [ir.PolicyProblem(f"{o.namespace}/{o.name}",
                                 f"{msg}: the pods it selects are isolated both ways and it "
                                 "allows nothing", uid=_uid(o)) for o, msg in broken]
    nets: set[ipaddress.IPv4Network] = set()
    for p in policies:
        for rules in (p.ingress or (), p.egress or ()):
            for r in rules:
                for peer in r.peers:
                    if peer.cidr is None:
                        continue
                    net = ipaddress.ip_network(peer.cidr)
                    if net.version != 4:
                        problems.append(ir.PolicyProblem(
                            f"{p.namespace}/{p.name}",
                            f"ipBlock {peer.cidr}: IPv6 is not enforced (the datapath is IPv4 "
                            "only); the peer selects nothing",
                            uid=_uid(snapshot.get(kinds.NETWORK_POLICY, p.namespace, p.name))))
                        continue
                    nets.add(ipaddress.IPv4Network(net))
                    nets.update(ipaddress.IPv4Network(e) for e in peer.except_)
    meshes: list[mnp.MeshNetworkPolicy] = []
    for obj in snapshot.of_kind(kinds.MESH_NETWORK_POLICY):
        try:
            meshes.append(memo.get(obj, mnp.parse))
        except netpol.Invalid as e:
            broken.append((obj, str(e)))
            problems.append(ir.PolicyProblem(
                f"{obj.namespace}/{obj.name}", f"{e}: the pods it selects are isolated both "
                "ways and it allows nothing", "MeshNetworkPolicy", _uid(obj)))
    for m in meshes:
        problems += [ir.PolicyProblem(f"{m.namespace}/{m.name}", msg, "MeshNetworkPolicy")
                     for msg in m.problems]
        for mesh_rules in (m.ingress or (), m.egress or ()):
            for mesh_rule in mesh_rules:
                nets.update(ipaddress.IPv4Network(c) for c in mesh_rule.cidrs
                            if ipaddress.ip_network(c).version == 4)
    clustered: list[cnp.ClusterNetworkPolicy] = []
    for obj in snapshot.of_kind(kinds.CLUSTER_NETWORK_POLICY):
        try:
            clustered.append(memo.get(obj, cnp.parse))
        except netpol.Invalid as e:
            problems.append(ir.PolicyProblem(obj.name, f"{e}: not enforced",
                                             "ClusterNetworkPolicy", _uid(obj)))
    for c in clustered:
        problems += [ir.PolicyProblem(c.name, m, "ClusterNetworkPolicy",
                                      _uid(snapshot.get(kinds.CLUSTER_NETWORK_POLICY, "", c.name)))
                     for m in c.problems]
    nodes = {o.name: o for o in snapshot.of_kind(kinds.NODE)}

    def node_addresses(selector: netpol.Selector) -> list[str]:
        return sorted(a for n in nodes.values() if selector.matches(n.labels)
                      for a in addressing.reachable_addresses(n) if model.is_ipv4(a))

    for c in clustered:
        for rule in c.egress:
            for target in rule.peers:
                nets.update(cnp_networks(target, node_addresses))
    cidrs = cidr_identities(nets)
    identities = _identities(snapshot, memo)
    namespaces = {o.name: o.labels for o in snapshot.of_kind(kinds.NAMESPACE)}
    pods = _pods(snapshot, identity_table, node)
    compiler = _Compiler(identities, pods, cidrs)

    ipcache: dict[str, ir.IpcacheEntry] = {
        str(n): ir.IpcacheEntry(str(n), ids.WORLD, number) for n, number in cidrs.items()}
    for obj in snapshot.of_kind(kinds.NODE):
        for a in addressing.reachable_addresses(obj):
            if model.is_ipv4(a):
                ipcache[f"{a}/32"] = ir.IpcacheEntry(
                    f"{a}/32", ids.HOST if obj.name == node else ids.REMOTE_NODE,
                    cidr_of(ipaddress.IPv4Address(a), cidrs))
        # its address for its own traffic into the tunnel (mesh/translate/encryption.py)
        source = tunnel_source(obj)
        if source is not None:
            ipcache[f"{source}/32"] = ir.IpcacheEntry(
                f"{source}/32", ids.HOST if obj.name == node else ids.REMOTE_NODE,
                cidr_of(ipaddress.IPv4Address(source), cidrs))
    for pod in pods:
        ipcache[f"{pod.address}/32"] = ir.IpcacheEntry(
            f"{pod.address}/32", pod.identity,
            cidr_of(ipaddress.IPv4Address(pod.address), cidrs))

    endpoints = []
    # (pod address, port) -> peer identity -> (its HTTP rules, the policies they come from)
    l7: dict[tuple[str, int], dict[int, tuple[set[mnp.HTTPRule], set[str]]]] = {}
    for pod in pods:
        if not pod.local:
            continue
        isolated = {"ingress": False, "egress": False}
        allow: set[ir.PolicyAllow] = set()
        fqdn: set[ir.FqdnAllow] = set()
        names = set()
        for p in policies:
            if p.namespace != pod.namespace or not p.selector.matches(pod.labels):
                continue
            for direction, maybe in (("ingress", p.ingress), ("egress", p.egress)):
                if maybe is None:
                    continue
                isolated[direction] = True
                names.add(f"{p.namespace}/{p.name}")
                for r in maybe:
                    allow |= compiler.allows(direction, r, p.namespace, pod.ports)
        for m in meshes:
            if m.namespace != pod.namespace or not m.selector.matches(pod.labels):
                continue
            for direction, maybe_rules in (("ingress", m.ingress), ("egress", m.egress)):
                if maybe_rules is None:
                    continue
                isolated[direction] = True
                names.add(f"{m.namespace}/{m.name}")
                for mesh_rule in maybe_rules:
                    fqdn.update(ir.FqdnAllow(name, pr.protocol, pr.port, pr.end_port)
                                for name in mesh_rule.fqdns for pr in mesh_rule.ports)
                    if not mesh_rule.ports:
                        fqdn.update(ir.FqdnAllow(name) for name in mesh_rule.fqdns)
                    for peer_id in compiler.mesh_peer_identities(mesh_rule, m.namespace):
                        if not mesh_rule.ports:
                            allow.add(ir.PolicyAllow(direction, peer_id))
                        for pr in mesh_rule.ports:
                            allow.add(ir.PolicyAllow(direction, peer_id, pr.protocol, pr.port,
                                                     pr.end_port, proxy=pr.l7))
                            if pr.l7 and pr.port is not None:
                                l7.setdefault((pod.address, pr.port), {}).setdefault(
                                    peer_id, (set(), set()))
                                rules_, from_ = l7[(pod.address, pr.port)][peer_id]
                                rules_.update(pr.http)
                                from_.add(f"{m.namespace}/{m.name}")
        for obj, _ in broken:
            if obj.namespace == pod.namespace and _broken_selects(obj, pod.labels):
                isolated = {"ingress": True, "egress": True}
                names.add(f"{obj.namespace}/{obj.name}")
        tiers, tier_rules = pod_tiers(
            clustered, namespaces.get(pod.namespace, {}), pod.labels, pod.ports,
            lambda peer: compiler.cnp_peer_identities(peer, node_addresses),
            compiler.named_ports)
        if fqdn:
            allow.update(DNS_ALLOWS)
        endpoints.append(ir.EndpointPolicy(
            pod.address, pod.identity, isolated["ingress"], isolated["egress"],
            tuple(sorted(allow, key=_allow_order)), tuple(sorted(names)), tuple(tiers),
            tuple(tier_rules), tuple(sorted(fqdn, key=_fqdn_order))))
    targets = _l7_targets(l7, ipcache, cidrs)
    return ir.NetworkPolicies(
        ipcache=tuple(sorted(ipcache.values(), key=lambda e: _prefix_order(e.prefix))),
        endpoints=tuple(sorted(endpoints, key=lambda e: addressing.address_order(e.address))),
        problems=tuple(sorted(set(problems), key=lambda p: (p.policy, p.message))),
        l7=targets, proxy_port=POLICY_PORT if targets else 0,
        dns_proxy_port=DNS_PROXY_PORT if any(e.fqdn for e in endpoints) else 0)


def _l7_targets(l7: Mapping[tuple[str, int], Mapping[int, tuple[set[mnp.HTTPRule], set[str]]]],
                ipcache: Mapping[str, ir.IpcacheEntry],
                cidrs: Mapping[ipaddress.IPv4Network, int]) -> tuple[ir.L7Target, ...]:
    """What the node's Envoy checks: per pod and port, the clients (by address) that the same
    rules apply to. An identity's addresses are the ipcache's; a CIDR identity's, its CIDR;
    any peer and the world, every address (a more specific group wins in Envoy)."""
    by_identity: dict[int, list[str]] = {}
    for e in ipcache.values():
        if e.prefix.endswith("/32"):
            by_identity.setdefault(e.identity, []).append(e.prefix)
    cidr_prefix = {n: str(c) for c, n in cidrs.items()}
    out = []
    for (address, port), peers in sorted(l7.items()):
        groups: dict[frozenset[mnp.HTTPRule], tuple[set[str], set[str]]] = {}
        for identity, (rules, policies) in peers.items():
            if identity in (ids.ANY, ids.WORLD):
                sources = ["0.0.0.0/0"]
            elif identity in cidr_prefix:
                sources = [cidr_prefix[identity]]
            else:
                sources = by_identity.get(identity, [])
            srcs, names = groups.setdefault(frozenset(rules), (set(), set()))
            srcs.update(sources)
            names.update(policies)
        out.append(ir.L7Target(address, port, tuple(
            ir.L7Group(tuple(sorted(srcs, key=_prefix_order)),
                       tuple(sorted((ir.L7Rule(r.method, r.path, r.host, r.headers)
                                     for r in rules), key=repr)),
                       tuple(sorted(names)))
            for rules, (srcs, names) in sorted(
                groups.items(), key=lambda g: (sorted(g[1][1]), sorted(map(repr, g[0]))))
            if srcs), any(r.grpc for rs, _ in peers.values() for r in rs)))
    return tuple(out)


def _uid(obj: KubeObject | None) -> str:
    meta = obj.body.get("metadata") if obj is not None else None
    return str(meta.get("uid") or "") if isinstance(meta, Mapping) else ""


def _broken_selects(obj: KubeObject, labels: Mapping[str, str]) -> bool:
    field = "endpointSelector" if obj.group_kind == kinds.MESH_NETWORK_POLICY else "podSelector"
    try:
        return netpol.parse_selector(obj.spec.get(field), "").matches(labels)
    except netpol.Invalid:
        return True  # not even its selector: every pod of its namespace


def _allow_order(a: ir.PolicyAllow) -> tuple[str, int, str, int, int, bool, bool]:
    return (a.direction, a.identity, a.protocol or "", a.port or 0, a.end_port or 0, a.proxy,
            a.dns)


def _fqdn_order(a: ir.FqdnAllow) -> tuple[str, str, int, int]:
    return (a.pattern, a.protocol or "", a.port or 0, a.end_port or 0)


def _prefix_order(prefix: str) -> tuple[int, int]:
    net = ipaddress.IPv4Network(prefix)
    return (int(net.network_address), net.prefixlen)


def mesh_network_policy_statuses(snapshot: StoreSnapshot, memo: ParseMemo | None = None
                                 ) -> dict[ObjectKey, ClassStatus]:
    """Each MeshNetworkPolicy's Accepted condition: True when enforced as written; False,
    Invalid, when refused (the pods it selects are isolated both ways, nothing allowed);
    False, UnsupportedValue, when a rule or port fails closed (what is not enforced yet)."""
    out = {}
    for obj in snapshot.of_kind(kinds.MESH_NETWORK_POLICY):
        try:
            parsed = (memo or ParseMemo()).get(obj, mnp.parse)
        except netpol.Invalid as e:
            out[obj.key] = policy_accepted(
                obj.generation, f"{e}; the pods it selects are isolated both ways and it "
                "allows nothing", (), "")
            continue
        l7 = any(pr.l7 for r in parsed.ingress or () for pr in r.ports)
        out[obj.key] = policy_accepted(
            obj.generation, None, parsed.problems,
            "enforced by the datapath of the nodes of the pods it selects"
            + (" (HTTP and gRPC rules by their node's Envoy)" if l7 else ""))
    return out
