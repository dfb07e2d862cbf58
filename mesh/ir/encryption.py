"""The encryption part of the IR: every other node as a peer (where to reach it, what it
carries, its WireGuard public key and IPsec SPIs as published), and what the node's own
annotations say."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncryptionPeer:
    """Another node: its underlay address (the tunnel's endpoint), its pod CIDRs (what the
    tunnel to it carries), and its public key (base64) if it published a usable one;
    `problem` says why one was refused (the peer then stays down: strict mode drops what
    would go to it)."""

    node: str
    endpoint: str
    allowed_ips: tuple[str, ...]
    public_key: str | None = None
    problem: str = ""
    # IPsec: the key SPIs it announced having states for (mesh.dev/ipsec-spis)
    ipsec_spis: tuple[int, ...] = ()


@dataclass(frozen=True)
class KeyProblem:
    """A Node whose published key is refused, and why (for a Warning Event on it)."""

    node: str
    uid: str
    message: str


@dataclass(frozen=True)
class Encryption:
    """The peers (sorted by node), the refused keys of every node (this one's too), and
    what this node's Node says its key is."""

    peers: tuple[EncryptionPeer, ...] = ()
    problems: tuple[KeyProblem, ...] = ()
    # This node's own annotation as the API server has it (None: none): when it is not the
    # node's key, the key is published again.
    published_key: str | None = None
    # This node's address for its own traffic into the tunnel (its pod CIDR's first address,
    # as Cilium's router IP: the peers' allowed IPs take it in, their pods' replies come
    # back through the tunnel); None: no pod CIDR yet.
    tunnel_source: str | None = None
    # This node's underlay address and pod CIDRs (IPsec's states and policies name them).
    address: str | None = None
    pod_cidrs: tuple[str, ...] = ()
    # This node's IPsec announcement as the API server has it (None: none).
    published_spis: str | None = None
