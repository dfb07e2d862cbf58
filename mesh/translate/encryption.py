"""Nodes to encryption peers (mesh/ir/encryption.py), pure: each other Node's underlay address,
pod CIDRs, published WireGuard public key (the `mesh.dev/wireguard-public-key` annotation its
agent writes) and IPsec announcement (`mesh.dev/ipsec-spis`: the key SPIs it has states for).

A key is refused, with a problem naming the node, when it does not parse as a WireGuard public
key (base64 of 32 bytes, not a point of low order), or when two Nodes publish the same one (a
copied annotation: WireGuard tells peers apart by key, so neither can be trusted to be the
node it claims). A refused or missing key leaves the peer down: the sink keeps its traffic
out of the tunnel, and strict mode drops it rather than send it in the clear.
"""

from __future__ import annotations

import ipaddress

from mesh import ir
from mesh.encryption.ipsec import SPIS_ANNOTATION, parse_spis
from mesh.encryption.keys import ANNOTATION, InvalidKey, parse_public
from mesh.store import kinds
from mesh.store.objects import KubeObject
from mesh.store.store import StoreSnapshot
from mesh.translate import addressing


def _pod_cidrs(node: KubeObject) -> tuple[str, ...]:
    spec = node.spec
    raw = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    out = []
    for c in raw if isinstance(raw, list) else []:
        try:
            out.append(str(ipaddress.ip_network(str(c), strict=False)))
        except ValueError:
            continue
    return tuple(out)


def tunnel_source(node: KubeObject) -> str | None:
    """A node's address for its own traffic into the tunnel: the first address of its IPv4
    pod CIDR (which host-local's IPAM keeps for the gateway, and the pods here do not use:
    their gateway is 169.254.1.1)."""
    for cidr in _pod_cidrs(node):
        net = ipaddress.ip_network(cidr)
        if net.version == 4 and net.num_addresses > 2:
            return str(net.network_address + 1)
    return None


def _endpoint(node: KubeObject) -> str | None:
    """The address its tunnel ends at: its first InternalIP (IPv4 first)."""
    found = []
    for a in addressing.reachable_addresses(node):
        try:
            found.append(ipaddress.ip_address(a))
        except ValueError:
            continue  # not an address (a Node's status written by hand)
    found.sort(key=lambda a: a.version)
    return str(found[0]) if found else None


def translate_encryption(snapshot: StoreSnapshot, node_name: str | None) -> ir.Encryption:
    nodes = sorted(snapshot.of_kind(kinds.NODE), key=lambda n: n.name)
    keys: dict[str, str] = {}
    problems: dict[str, str] = {}
    for n in nodes:
        text = (n.annotations or {}).get(ANNOTATION)
        if text is None:
            continue
        try:
            if not isinstance(text, str):
                raise InvalidKey("not a string")
            parse_public(text)
            keys[n.name] = text.strip()
        except InvalidKey as e:
            problems[n.name] = f"annotation {ANNOTATION}: {e}; the node gets no tunnel"
    by_key: dict[str, list[str]] = {}
    for name, key in keys.items():
        by_key.setdefault(key, []).append(name)
    for names in by_key.values():
        if len(names) > 1:
            for name in names:
                others = ", ".join(n for n in names if n != name)
                problems[name] = (f"annotation {ANNOTATION}: the same key as node {others}'s; "
                                  "the node gets no tunnel")
                del keys[name]
    peers = []
    for n in nodes:
        if n.name == node_name:
            continue
        endpoint = _endpoint(n)
        cidrs = _pod_cidrs(n)
        if endpoint is None or not cidrs:
            continue  # nothing to reach it at, or nothing to carry: not a peer yet
        spis, problem = _spis(n)
        peers.append(ir.EncryptionPeer(n.name, endpoint, cidrs, keys.get(n.name),
                                       problems.get(n.name, problem), spis))
    own = snapshot.get(kinds.NODE, "", node_name) if node_name else None
    notes = (own.annotations or {}) if own is not None else {}
    return ir.Encryption(
        tuple(peers),
        tuple(ir.KeyProblem(name, _uid(snapshot, name), message)
              for name, message in sorted(problems.items())),
        _text(notes.get(ANNOTATION)),
        tunnel_source(own) if own is not None else None,
        _endpoint(own) if own is not None else None,
        _pod_cidrs(own) if own is not None else (),
        _text(notes.get(SPIS_ANNOTATION)))


def _spis(node: KubeObject) -> tuple[tuple[int, ...], str]:
    """A node's IPsec announcement, and what is wrong with it ("" if nothing)."""
    text = (node.annotations or {}).get(SPIS_ANNOTATION)
    if text is None:
        return (), ""
    try:
        if not isinstance(text, str):
            raise ValueError("not a string")
        return parse_spis(text), ""
    except ValueError as e:
        return (), f"annotation {SPIS_ANNOTATION}: {e}; nothing is sent to it through ESP"


def _uid(snapshot: StoreSnapshot, name: str) -> str:
    node = snapshot.get(kinds.NODE, "", name)
    return str((node.metadata.get("uid") if node is not None else "") or "")


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
