"""What the node's Envoy has accepted: per resource, the last ACKed version and the last NACK."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class AckState(enum.Enum):
    ACKED = "ACKED"  # Envoy runs the version we serve now.
    NACKED = "NACKED"  # Envoy rejected the version we serve now and keeps an older one.
    PENDING = "PENDING"  # Sent or about to be sent, no answer yet.


@dataclass
class ResourceAck:
    acked_version: str = ""
    acked_hash: str = ""
    acked_at: float = 0.0
    nack_version: str = ""
    nack_hash: str = ""
    nack_message: str = ""
    nacked_at: float = 0.0


@dataclass(frozen=True)
class ResourceStatus:
    """One resource as served to one node, and what that node's Envoy made of it."""

    node_id: str
    type_url: str
    name: str
    version: str  # the version of its type that we serve now
    hash: str
    ack: ResourceAck

    @property
    def state(self) -> AckState:
        if self.ack.acked_hash == self.hash:
            return AckState.ACKED
        if self.ack.nack_hash == self.hash:
            return AckState.NACKED
        return AckState.PENDING

    @property
    def programmed(self) -> bool:
        """True once the node's Envoy ACKed exactly the content we serve now."""
        return self.state is AckState.ACKED


class AckTracker:
    """ACK/NACK record of one node, by (type_url, name). Survives stream reconnects."""

    def __init__(self) -> None:
        self._acks: dict[tuple[str, str], ResourceAck] = {}

    def get(self, type_url: str, name: str) -> ResourceAck:
        return self._acks.get((type_url, name)) or ResourceAck()

    def ack(self, type_url: str, name: str, version: str, hash_: str, at: float) -> None:
        rec = self._acks.setdefault((type_url, name), ResourceAck())
        rec.acked_version, rec.acked_hash, rec.acked_at = version, hash_, at

    def nack(
        self, type_url: str, name: str, version: str, hash_: str, message: str, at: float
    ) -> None:
        rec = self._acks.setdefault((type_url, name), ResourceAck())
        rec.nack_version, rec.nack_hash, rec.nack_message, rec.nacked_at = (
            version,
            hash_,
            message,
            at,
        )

    def forget(self, type_url: str, name: str) -> None:
        self._acks.pop((type_url, name), None)
