"""The policy maps' reconciler (bpf/lib/policy.h): the IR's ipcache and this node's pods'
policies against what the pinned maps hold; only the difference is written.

Order, so that no packet is judged by a half-written state it should not be: the ipcache and
the allowed entries that are new go in first, then the pods' isolation flags, then what is no
longer wanted goes; last the revision is bumped, and every flow decided before is decided again
at its next packet. While the writes happen a flow may briefly see the union of the old and the
new entries, never less than both. At start the reconciler reads the pinned maps back, so an
agent restart rewrites nothing that is right already, and the kernel kept enforcing meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import socket
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from mesh import ir
from mesh.datapath.layout import (
    EGRESS,
    EP_ADMIN,
    EP_BASELINE,
    EP_EGRESS_ISOLATED,
    EP_FQDN,
    EP_INGRESS_ISOLATED,
    INGRESS,
    IPPROTO,
    POLICY_ALLOW,
    POLICY_PREFIX_ANY_PORT,
    POLICY_PREFIX_ANY_PROTO,
    POLICY_STATS,
    TIER_ACTIONS,
    IpcacheInfo,
    IpcacheKey,
    PolicyEndpoint,
    PolicyEntry,
    PolicyKey,
    TierEntry,
    address_of,
    be16,
    be32,
)
from mesh.datapath.services import Table
from mesh.policy import identities as ids

log = logging.getLogger(__name__)
IpcacheValue = tuple[int, int]  # (identity, CIDR identity)
# (endpoint address, identity, direction, IP protocol, port, key prefix length)
PolicyKeyT = tuple[str, int, int, int, int, int]
_DIRECTION = {"ingress": INGRESS, "egress": EGRESS}


def port_prefixes(low: int, high: int) -> list[tuple[int, int]]:
    """[low, high] as the fewest (port, prefix bits of 16) blocks that cover it exactly."""
    out = []
    while low <= high:
        size = 0
        while size < 16 and low % (1 << (size + 1)) == 0 and low + (1 << (size + 1)) - 1 <= high:
            size += 1
        out.append((low, 16 - size))
        low += 1 << size
    return out


def entry_keys(address: str, direction: str, identity: int, protocol: str | None,
               port: int | None, end_port: int | None) -> list[PolicyKeyT]:
    """The LPM keys of one entry (a pod's, for a peer identity, a protocol and ports)."""
    d = _DIRECTION[direction]
    if protocol is None:
        return [(address, identity, d, 0, 0, POLICY_PREFIX_ANY_PROTO)]
    proto = IPPROTO[protocol]
    if port is None:
        return [(address, identity, d, proto, 0, POLICY_PREFIX_ANY_PORT)]
    return [(address, identity, d, proto, p, POLICY_PREFIX_ANY_PORT + bits)
            for p, bits in port_prefixes(port, end_port or port)]


def policy_keys(e: ir.EndpointPolicy, proxy_port: int = 0, dns_port: int = 0
                ) -> dict[PolicyKeyT, int]:
    """The LPM keys of an endpoint's allowed entries, with the proxy port of those with L7
    rules (0: none; an allow of the same key without L7 rules wins) and of its DNS (the DNS
    proxy's, which wins)."""
    out: dict[PolicyKeyT, int] = {}
    for a in sorted(e.allow, key=lambda a: a.dns):  # the DNS proxy's last: they win
        port = dns_port if a.dns else proxy_port if a.proxy else 0
        for k in entry_keys(e.address, a.direction, a.identity, a.protocol, a.port,
                            a.end_port):
            out[k] = port if a.dns else min(out.get(k, port), port)
    return out


def tier_keys(e: ir.EndpointPolicy, tier: str) -> dict[PolicyKeyT, tuple[int, int]]:
    """The LPM keys of an endpoint's entries in a ClusterNetworkPolicy tier, with their
    (action, precedence)."""
    return {k: (TIER_ACTIONS[t.action], t.precedence) for t in e.tiers if t.tier == tier
            for k in entry_keys(e.address, t.direction, t.identity, t.protocol, t.port,
                                t.end_port)}


def _ipcache_key(prefix: str) -> IpcacheKey:
    net = ipaddress.IPv4Network(prefix)
    return IpcacheKey(prefixlen=net.prefixlen, address=be32(str(net.network_address)))


def _key_of(k: Any) -> PolicyKeyT:
    """A map's key as the reconciler keeps it."""
    return (address_of(int(k.endpoint)), int(k.identity), int(k.direction), int(k.proto),
            int.from_bytes(int(k.dport).to_bytes(2, "little"), "big"), int(k.prefixlen))


def _policy_key(k: PolicyKeyT) -> PolicyKey:
    address, identity, direction, proto, port, prefixlen = k
    return PolicyKey(prefixlen=prefixlen, endpoint=be32(address), identity=identity,
                     direction=direction, proto=proto, dport=be16(port))


class PolicyReconciler:
    def __init__(self, ipcache: Table, endpoints: Table, policy: Table, revision: Any,
                 stats: Any | None = None, host_addresses: Iterable[str] = (),
                 tiers: Mapping[str, Table] | None = None) -> None:
        """`host_addresses`: this node's own addresses, the host's identity whatever the IR
        says (the kernel's source address towards a pod may be any of them). Applied from the
        agent's loop and, when the node's addresses change, from the forwarding's thread: one
        at a time."""
        self.ipcache, self.endpoints, self.policy = ipcache, endpoints, policy
        self.revision_table = revision
        self.stats_table = stats
        self.host_addresses = frozenset(host_addresses)
        self.ipcache_written: dict[str, IpcacheValue] = {}
        self.endpoints_written: dict[str, tuple[int, int]] = {}  # address -> (identity, flags)
        self.policy_written: dict[PolicyKeyT, int] = {}  # key -> proxy port
        # ClusterNetworkPolicy tiers ("admin", "baseline"): their maps and what they hold
        self.tiers = dict(tiers or {})
        self.tiers_written: dict[str, dict[PolicyKeyT, tuple[int, int]]] = {
            t: {} for t in self.tiers}
        self.writes = 0
        self._lock = threading.Lock()
        self._last = ir.NetworkPolicies()
        self._load()

    def _load(self) -> None:
        """What a previous agent left in the pinned maps."""
        with contextlib.suppress(Exception):
            for k, v in self.ipcache.items():
                net = ipaddress.IPv4Network(f"{address_of(int(k.address))}/{int(k.prefixlen)}")
                self.ipcache_written[str(net)] = (int(v.identity), int(v.cidr_identity))
        with contextlib.suppress(Exception):
            for k, v in self.endpoints.items():
                self.endpoints_written[address_of(int(k.value))] = (int(v.identity),
                                                                     int(v.flags))
        with contextlib.suppress(Exception):
            for k, v in self.policy.items():
                self.policy_written[_key_of(k)] = socket.ntohs(int(v.proxy_port))
        for tier, table in self.tiers.items():
            with contextlib.suppress(Exception):
                for k, v in table.items():
                    self.tiers_written[tier][_key_of(k)] = (int(v.action), int(v.precedence))

    def set_host_addresses(self, addresses: frozenset[str]) -> None:
        """This node's addresses now; the last state is written again if they changed."""
        if addresses != self.host_addresses:
            self.host_addresses = addresses
            self.apply(self._last)

    def apply(self, state: ir.NetworkPolicies) -> bool:
        """Write the difference; True if anything changed (the revision was bumped)."""
        with self._lock:
            self._last = state
            return self._apply(state)

    def _apply(self, state: ir.NetworkPolicies) -> bool:
        ipcache: dict[str, IpcacheValue] = {e.prefix: (e.identity, e.cidr_identity)
                                             for e in state.ipcache}
        for a in self.host_addresses:
            prefix = f"{a}/32"
            ipcache[prefix] = (ids.HOST, ipcache.get(prefix, (0, 0))[1])
        endpoints = {e.address: (e.identity, (EP_INGRESS_ISOLATED if e.ingress_isolated else 0)
                                 | (EP_EGRESS_ISOLATED if e.egress_isolated else 0)
                                 | (EP_ADMIN if any(t.tier == "admin" for t in e.tiers) else 0)
                                 | (EP_BASELINE if any(t.tier == "baseline" for t in e.tiers)
                                    else 0)
                                 | (EP_FQDN if e.fqdn else 0))
                     for e in state.endpoints}
        keys: dict[PolicyKeyT, int] = {}
        tiers: dict[str, dict[PolicyKeyT, tuple[int, int]]] = {t: {} for t in self.tiers}
        for e in state.endpoints:
            keys.update(policy_keys(e, state.proxy_port, state.dns_proxy_port))
            for tier, wanted in tiers.items():
                wanted.update(tier_keys(e, tier))
        before = self.writes
        for prefix, (identity, cidr) in ipcache.items():
            if self.ipcache_written.get(prefix) != (identity, cidr):
                self.ipcache[_ipcache_key(prefix)] = IpcacheInfo(identity=identity,
                                                                 cidr_identity=cidr)
                self.ipcache_written[prefix] = (identity, cidr)
                self.writes += 1
        for k, proxy in keys.items():
            if self.policy_written.get(k) != proxy:
                self.policy[_policy_key(k)] = PolicyEntry(flags=POLICY_ALLOW,
                                                          proxy_port=be16(proxy))
                self.policy_written[k] = proxy
                self.writes += 1
        for tier, wanted in tiers.items():
            written = self.tiers_written[tier]
            for k, (action, precedence) in wanted.items():
                if written.get(k) != (action, precedence):
                    self.tiers[tier][_policy_key(k)] = TierEntry(action=action,
                                                                 precedence=precedence)
                    written[k] = (action, precedence)
                    self.writes += 1
        for address, (identity, flags) in endpoints.items():
            if self.endpoints_written.get(address) != (identity, flags):
                self.endpoints[ctypes.c_uint32(be32(address))] = PolicyEndpoint(
                    identity=identity, flags=flags)
                self.endpoints_written[address] = (identity, flags)
                self.writes += 1
        for address in [a for a in self.endpoints_written if a not in endpoints]:
            with contextlib.suppress(KeyError):
                del self.endpoints[ctypes.c_uint32(be32(address))]
            del self.endpoints_written[address]
            self.writes += 1
        for k in [k for k in self.policy_written if k not in keys]:
            with contextlib.suppress(KeyError):
                del self.policy[_policy_key(k)]
            del self.policy_written[k]
            self.writes += 1
        for tier, wanted in tiers.items():
            written = self.tiers_written[tier]
            for k in [k for k in written if k not in wanted]:
                with contextlib.suppress(KeyError):
                    del self.tiers[tier][_policy_key(k)]
                del written[k]
                self.writes += 1
        for prefix in [p for p in self.ipcache_written if p not in ipcache]:
            with contextlib.suppress(KeyError):
                del self.ipcache[_ipcache_key(prefix)]
            del self.ipcache_written[prefix]
            self.writes += 1
        changed = self.writes != before
        if changed:
            self.bump()
        return changed

    def revision(self) -> int:
        return int(self.revision_table[ctypes.c_uint32(0)].value)

    def bump(self) -> None:
        """Every flow decided so far is decided again at its next packet."""
        self.revision_table[ctypes.c_uint32(0)] = ctypes.c_uint32(
            (self.revision() + 1) & 0xFFFFFFFF)

    def stats(self) -> Mapping[str, int]:
        """mesh_policy_stats summed over the CPUs, by name."""
        if self.stats_table is None:
            return {}
        return {name: sum(self.stats_table[ctypes.c_uint32(i)])
                for i, name in enumerate(POLICY_STATS)}

    def sizes(self) -> Mapping[str, int]:
        return {"ipcache": len(self.ipcache_written), "endpoints": len(self.endpoints_written),
                "policy": len(self.policy_written),
                **{t: len(w) for t, w in self.tiers_written.items()}}
