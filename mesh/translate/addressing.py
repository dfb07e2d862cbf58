"""Where the translator serves things: addresses from the pool, kept stable across
translations, and this node's own addresses (from its Node object)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from mesh.store import kinds
from mesh.store.objects import KubeObject
from mesh.store.store import StoreSnapshot
from mesh.translate import model


def allocate(pool: str, previous: Mapping[str, str], assigned: Mapping[str, str],
             key: str) -> str | None:
    """An address of `pool` for `key` (a Gateway's, the Ingresses'): the one it had in the
    previous translation if no one has taken it since, else the first that neither this
    translation (`assigned`) nor the previous one gave to another key. None: none left."""
    used = set(assigned.values())
    prev = previous.get(key)
    if prev is not None and prev not in used:
        return prev
    taken = used | {v for k, v in previous.items() if k != key}
    for host in ipaddress.ip_network(pool).hosts():
        if str(host) not in taken:
            return str(host)
    return None


def published(snapshot: StoreSnapshot, pool: str) -> dict[str, str]:
    """The pool addresses Gateways' status lists (the status writer's allocation), keyed as
    `allocate` keys them: on a cluster every node's agent serves a Gateway on the address the
    leader gave it, whatever order each node saw the Gateways in."""
    try:
        net = ipaddress.ip_network(pool)
    except ValueError:
        return {}
    out = {}
    for gw in snapshot.of_kind(kinds.GATEWAY):
        status = gw.body.get("status")
        entries = status.get("addresses") if isinstance(status, Mapping) else None
        values = [str(a.get("value")) for a in entries or ()
                  if isinstance(a, Mapping) and a.get("type", "IPAddress") == "IPAddress"
                  and model.is_ip(str(a.get("value")))] if isinstance(entries, list) else []
        values = [v for v in values if ipaddress.ip_address(v) in net]
        key = f"gateway/{gw.namespace}/{gw.name}"
        for i, v in enumerate(values):
            out[key if i == 0 else f"{key}/{i}"] = v
    return out


def ips(values: Iterable[Any]) -> list[str]:
    """The IP addresses among `values` (a Node also lists its Hostname), in a stable order."""
    return sorted({str(v) for v in values if model.is_ip(str(v))}, key=address_order)


def address_order(a: str) -> tuple[int, Any]:
    ip = ipaddress.ip_address(a)
    return ip.version, ip


def node_address_entries(node: KubeObject) -> list[tuple[Any, str]]:
    """A Node's status.addresses as (type, address), entries of the wrong shape left out."""
    status = node.body.get("status")
    entries = status.get("addresses") if isinstance(status, Mapping) else None
    return [(a.get("type"), str(a.get("address"))) for a in entries or ()
            if isinstance(a, Mapping) and a.get("address")] if isinstance(entries, list) else []


def reachable_addresses(node: KubeObject) -> list[str]:
    """The addresses a Node is reached at (InternalIP, ExternalIP: not its Hostname)."""
    return [a for t, a in node_address_entries(node) if t in ("InternalIP", "ExternalIP")]


def node_addresses(snapshot: StoreSnapshot, node_name: str | None) -> frozenset[str] | None:
    """The addresses of this node's Node object (status.addresses), or None when there is
    none to go by."""
    node = snapshot.get(kinds.NODE, "", node_name) if node_name else None
    if node is None:
        return None
    return frozenset(a for _, a in node_address_entries(node))
