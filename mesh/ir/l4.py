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
    """One ClusterIP:port/protocol and the ready endpoints behind it (sorted)."""

    address: str
    port: int
    protocol: str  # TCP | UDP
    backends: tuple[L4Backend, ...]
    owners: Owners = frozenset()

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.address, self.port, self.protocol)
