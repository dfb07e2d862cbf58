"""The encryption part of the IR: every other node as a WireGuard peer (where to reach it,
what it carries, its public key as published), and what the node's own annotation says."""

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


@dataclass(frozen=True)
class KeyProblem:
    """A Node whose published key is refused, and why (for a Warning Event on it)."""

    node: str
    uid: str
    message: str


@dataclass(frozen=True)
class Encryption:
    """The peers (sorted by node), and the refused keys of every node (this one's too)."""

    peers: tuple[EncryptionPeer, ...] = ()
    problems: tuple[KeyProblem, ...] = ()
