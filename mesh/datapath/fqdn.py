"""toFQDNs in the datapath (bpf/lib/policy.h, mesh_policy_fqdn): the addresses each of this
node's pods may reach by name.

Names and their addresses come from the node's DNS proxy (mesh/dnsproxy.py): each answer it
passes to a pod is learned here first, so that the pod's connection to an address it has just
been given is allowed when it tries. The names are the node's to share, as Cilium's DNS cache
is: an answer one pod got opens its addresses to every pod of the node whose rules name it. An
address stays for its record's TTL (at least MIN_TTL: a record with TTL 0 would be gone before
the pod connects), then goes; a flow opened while it was allowed keeps its verdict (the policy
revision is not bumped for an expiry) until a policy change decides it again.

The cache is kept in a file of the agent's state directory (wall-clock expiries), so a
restarted agent keeps what its pods resolved before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from mesh import ir
from mesh.datapath.layout import (
    FQDN_PREFIX_ANY_PORT,
    FQDN_PREFIX_ANY_PROTO,
    IPPROTO,
    POLICY_ALLOW,
    FqdnKey,
    PolicyEntry,
    address_of,
    be16,
    be32,
)
from mesh.datapath.policy import port_prefixes
from mesh.datapath.services import Table
from mesh.policy.meshnetworkpolicy import fqdn_regex

log = logging.getLogger(__name__)
MIN_TTL = 5.0  # seconds an answer's addresses stay at least
MAX_NAMES = 16384  # names the cache holds; the ones expiring first make room
MAX_ADDRESSES = 64  # addresses kept per name (a bigger answer: its first ones)
# (endpoint address, peer address, IP protocol, port, key prefix length)
FqdnKeyT = tuple[str, str, int, int, int]


class DnsCache:
    """Names -> address -> expiry (wall clock), as the DNS proxy saw them answered."""

    def __init__(self) -> None:
        self.names: dict[str, dict[str, float]] = {}

    def learn(self, names: Iterable[str], addresses: Mapping[str, float], now: float
              ) -> list[str]:
        """Each name holds `addresses` (address -> TTL in seconds) from `now`; the names whose
        addresses changed (new ones, later expiries)."""
        changed = []
        for name in names:
            held = self.names.setdefault(name, {})
            before = dict(held)
            for address, ttl in list(addresses.items())[:MAX_ADDRESSES]:
                held[address] = max(held.get(address, 0.0), now + max(ttl, MIN_TTL))
            if len(held) > MAX_ADDRESSES:
                for address in sorted(held, key=held.__getitem__)[:len(held) - MAX_ADDRESSES]:
                    del held[address]
            if held != before:
                changed.append(name)
        if len(self.names) > MAX_NAMES:
            by_expiry = sorted(self.names, key=lambda n: max(self.names[n].values(), default=0))
            for name in by_expiry[:len(self.names) - MAX_NAMES]:
                del self.names[name]
        return changed

    def expire(self, now: float) -> bool:
        """Drop what expired; True if anything did."""
        gone = False
        for name in list(self.names):
            held = self.names[name]
            for address in [a for a, t in held.items() if t <= now]:
                del held[address]
                gone = True
            if not held:
                del self.names[name]
        return gone

    def next_expiry(self) -> float | None:
        return min((t for held in self.names.values() for t in held.values()), default=None)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.names, sort_keys=True))
        os.chmod(tmp, 0o600)
        tmp.replace(path)

    def load(self, path: Path, now: float) -> None:
        """What a previous agent saved, less what expired since; a broken file is ignored."""
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            data = json.loads(path.read_text())
            self.names = {str(n): {str(a): float(t) for a, t in held.items()}
                          for n, held in data.items()}
        self.expire(now)


def fqdn_keys(endpoint: str, address: str, allow: ir.FqdnAllow) -> list[FqdnKeyT]:
    """The LPM keys allowing `endpoint` to reach `address` as `allow` says."""
    if allow.protocol is None:
        return [(endpoint, address, 0, 0, FQDN_PREFIX_ANY_PROTO)]
    proto = IPPROTO[allow.protocol]
    if allow.port is None:
        return [(endpoint, address, proto, 0, FQDN_PREFIX_ANY_PORT)]
    return [(endpoint, address, proto, p, FQDN_PREFIX_ANY_PORT + bits)
            for p, bits in port_prefixes(allow.port, allow.end_port or allow.port)]


def _key(k: FqdnKeyT) -> FqdnKey:
    endpoint, address, proto, port, prefixlen = k
    return FqdnKey(prefixlen=prefixlen, endpoint=be32(endpoint), address=be32(address),
                   proto=proto, dport=be16(port))


class FqdnReconciler:
    """mesh_policy_fqdn from this node's pods' toFQDNs rules (the IR) and the DNS cache."""

    def __init__(self, table: Table, cache_file: Path | None = None) -> None:
        self.table = table
        self.cache = DnsCache()
        self.cache_file = cache_file
        if cache_file is not None:
            self.cache.load(cache_file, time.time())
        self.rules: dict[str, tuple[ir.FqdnAllow, ...]] = {}  # endpoint -> its rules
        self._regex: dict[str, re.Pattern[str]] = {}
        self.written: set[FqdnKeyT] = set()
        self._dirty = False
        self._loaded_checked = False  # the first rules prune what a previous agent left
        with contextlib.suppress(Exception):  # what a previous agent wrote
            for k, _ in table.items():
                self.written.add((address_of(int(k.endpoint)), address_of(int(k.address)),
                                  int(k.proto),
                                  int.from_bytes(int(k.dport).to_bytes(2, "little"), "big"),
                                  int(k.prefixlen)))

    def _matches(self, pattern: str, name: str) -> bool:
        regex = self._regex.get(pattern)
        if regex is None:
            regex = self._regex[pattern] = fqdn_regex(pattern)
        return regex.fullmatch(name) is not None

    def set_rules(self, endpoints: Sequence[ir.EndpointPolicy]) -> bool:
        """This node's pods' toFQDNs rules now (the IR changed); True if an entry went (the
        flows decided by it are to be decided again)."""
        rules = {e.address: e.fqdn for e in endpoints if e.fqdn}
        if rules == self.rules and self._loaded_checked:
            return False
        self.rules = rules
        self._regex = {}
        self._loaded_checked = True
        return self._reconcile()

    def learn(self, names: Iterable[str], addresses: Mapping[str, float],
              now: float | None = None) -> int:
        """An answer: `names` (the question and its CNAME chain, lower case, no trailing dot)
        hold `addresses` (address -> TTL). The entries it opens are written before this
        returns; how many were new."""
        changed = self.cache.learn(names, addresses, time.time() if now is None else now)
        if not changed:
            return 0
        self._dirty = True
        new = 0
        for endpoint, allows in self.rules.items():
            for allow in allows:
                if not any(self._matches(allow.pattern, n) for n in changed):
                    continue
                for address in addresses:
                    for k in fqdn_keys(endpoint, address, allow):
                        if k not in self.written:
                            self.table[_key(k)] = PolicyEntry(flags=POLICY_ALLOW)
                            self.written.add(k)
                            new += 1
        return new

    def expire(self, now: float | None = None) -> bool:
        """Remove the entries whose names all expired; saves the cache when it changed."""
        gone = self.cache.expire(time.time() if now is None else now)
        if gone:
            self._reconcile()
        if (gone or self._dirty) and self.cache_file is not None:
            with contextlib.suppress(OSError):
                self.cache.save(self.cache_file)
        self._dirty = False
        return gone

    def wanted(self) -> set[FqdnKeyT]:
        out: set[FqdnKeyT] = set()
        for endpoint, allows in self.rules.items():
            for allow in allows:
                for name, held in self.cache.names.items():
                    if self._matches(allow.pattern, name):
                        for address in held:
                            out.update(fqdn_keys(endpoint, address, allow))
        return out

    def _reconcile(self) -> bool:
        wanted = self.wanted()
        for k in wanted - self.written:
            self.table[_key(k)] = PolicyEntry(flags=POLICY_ALLOW)
        gone = self.written - wanted
        for k in gone:
            with contextlib.suppress(KeyError):
                del self.table[_key(k)]
        self.written = wanted
        return bool(gone)

    def entries(self) -> dict[str, list[str]]:
        """Endpoint -> the addresses its rules reach now (for `mesh policy status`)."""
        out: dict[str, set[str]] = {}
        for endpoint, address, *_ in self.written:
            out.setdefault(endpoint, set()).add(address)
        return {e: sorted(a) for e, a in sorted(out.items())}

