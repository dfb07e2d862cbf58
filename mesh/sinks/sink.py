"""What every sink offers: apply the IR, and say per object how far it got.

Statedb-style: `apply` diffs the desired state against what the sink last made real and
changes only the difference; `readiness` is per object, Ready, Pending (why) or Failed (the
error text: Envoy's NACK, a map write's errno). `Programmed` comes from every sink's
readiness, so the status code knows no sink's details.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from mesh.ir import IR
from mesh.store.objects import ObjectKey


class State(enum.Enum):
    READY = "Ready"
    PENDING = "Pending"
    FAILED = "Failed"


@dataclass(frozen=True)
class Readiness:
    state: State
    message: str = ""

    @property
    def ready(self) -> bool:
        return self.state is State.READY


READY = Readiness(State.READY)


class Sink(Protocol):
    name: str

    def apply(self, ir: IR) -> None:
        """Make the node do what `ir` says (only the difference to what it does now)."""

    def readiness(self) -> Mapping[ObjectKey, Readiness]:
        """Per object this sink carries, how far the node got; objects it does not
        carry are absent (and count as ready as far as this sink goes)."""

    async def wait_progress(self) -> None:
        """Return when readiness may have changed (an ACK, a NACK, a write done)."""


def combine(sinks_readiness: list[Mapping[ObjectKey, Readiness]],
            key: ObjectKey) -> Readiness:
    """One object's readiness over every sink: the first failure, else the first pending,
    else ready."""
    pending = None
    for readiness in sinks_readiness:
        r = readiness.get(key)
        if r is None or r.ready:
            continue
        if r.state is State.FAILED:
            return r
        pending = pending or r
    return pending or READY
