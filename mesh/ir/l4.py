"""The L4 part of the IR: service frontends the node's datapath balances in the kernel."""

from __future__ import annotations

from dataclasses import dataclass

from mesh.ir.l7 import Owners


@dataclass(frozen=True)
class L4Backend:
    address: str
    port: int


@dataclass(frozen=True)
class ServiceFrontend:
    """One ClusterIP:port/protocol (or a NodePort on one of this node's addresses) and the
    ready endpoints behind it (sorted)."""

    address: str
    port: int
    protocol: str  # TCP | UDP
    backends: tuple[L4Backend, ...]
    owners: Owners = frozenset()
    # "random", or "maglev": a packet balanced per packet (NodePort from outside) picks
    # its backend by consistent hashing of the client's address and port, the same on
    # every node. Connections of the node's own pods are balanced once, at connect.
    algorithm: str = "random"
    external: bool = False  # a NodePort: balanced at the node's underlay device too
    problem: str = ""  # what of the Service was not taken, and what is done instead
    # L7 configuration applies (a GAMMA route): the datapath hands TCP connections to the
    # node's Envoy, on this port of its mesh listener, instead of balancing them itself.
    proxy_port: int | None = None

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.address, self.port, self.protocol)
