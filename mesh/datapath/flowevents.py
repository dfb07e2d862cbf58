"""The datapath's flow events (bpf/lib/flow.h): the switch, the ring buffer read on a thread
of its own, and the counters of events sent and lost.

Events are handed over in batches (what one poll of the ring returned), as raw records: the
reader does as little per event as it can, so the kernel's ring is emptied fast; decoding
and naming happen on the consumer's side (mesh/flows/datapath.py).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from mesh.datapath.layout import FLOW_EVENT, FLOW_STATS, FlowConfig, address_of
from mesh.datapath.programs import Loaded

log = logging.getLogger(__name__)
POLL_MS = 100  # the longest a reader waits for the ring before it looks at `stop`


@dataclass(frozen=True)
class FlowEvent:
    """One struct flow_event, decoded."""

    time_ns: int  # CLOCK_MONOTONIC
    saddr: str
    daddr: str
    sport: int
    dport: int
    proto: int
    packets: tuple[int, int]  # initiator -> responder, the replies
    bytes: tuple[int, int]
    ifindex: int
    type: int  # layout.FLOW_NEW, FLOW_CHANGED, FLOW_CLOSED
    verdict: int  # flow.proto's Verdict number
    reason: int  # flow.proto's DropReason number, with DROPPED
    point: int  # flow.proto's TraceObservationPoint number
    is_reply: bool
    tcp_flags: int
    policy: int = 0  # with a policy drop: whose (layout.FLOW_POLICY_INGRESS, _EGRESS)
    # NEW of a connection balanced at its socket: the frontend it was translated from
    xlate_address: str = ""
    xlate_port: int = 0


def decode(raw: bytes) -> FlowEvent:
    (time_ns, saddr, daddr, sport, dport, proto, p0, p1, b0, b1, ifindex, type_, verdict,
     reason, point, is_reply, tcp_flags, policy, xport, xaddr) = FLOW_EVENT.unpack_from(raw)
    xlated = xaddr != b"\0\0\0\0"
    return FlowEvent(time_ns, address_of(int.from_bytes(saddr, "little")),
                     address_of(int.from_bytes(daddr, "little")),
                     int.from_bytes(sport, "big"), int.from_bytes(dport, "big"), proto,
                     (p0, p1), (b0, b1), ifindex, type_, verdict, reason, point,
                     bool(is_reply), tcp_flags, policy,
                     address_of(int.from_bytes(xaddr, "little")) if xlated else "",
                     int.from_bytes(xport, "big") if xlated else 0)


class FlowEvents:
    """The flow events of a loaded bpf/fwd.c."""

    def __init__(self, loaded: Loaded) -> None:
        self._loaded = loaded
        self._config = loaded.table("mesh_flow_config")
        self._stats = loaded.table("mesh_flow_stats")

    def enable(self, on: bool) -> None:
        """Track connections and send events (the programs look at each packet), or not."""
        self._config[ctypes.c_uint32(0)] = FlowConfig(enabled=int(on))

    def enabled(self) -> bool:
        return bool(self._config[ctypes.c_uint32(0)].enabled)

    def counters(self) -> dict[str, int]:
        """Events sent into the ring and lost (it was full), all CPUs, since the load."""
        return {name: int(sum(self._stats[ctypes.c_uint32(i)]))
                for i, name in enumerate(FLOW_STATS)}

    def read(self, deliver: Callable[[list[bytes]], None], stop: threading.Event) -> None:
        """Read the ring until `stop` is set (on the calling thread, which this blocks),
        handing each poll's events to `deliver` as raw records, oldest first."""
        batch: list[bytes] = []
        size = FLOW_EVENT.size

        def take(_ctx: object, data: int, _size: int) -> int:
            batch.append(ctypes.string_at(data, size))
            return 0

        ring = self._loaded.table("mesh_flow_events")
        ring.open_ring_buffer(take)
        bpf = self._loaded.bpf
        while not stop.is_set():
            bpf.ring_buffer_poll(POLL_MS)
            if batch:
                out = batch[:]
                batch.clear()
                deliver(out)
