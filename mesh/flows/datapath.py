"""L3/L4 flows: the datapath's connection events (bpf/lib/flow.h), read from its ring buffer
on a thread of their own, named, into the node's flow store; a new connection the socket
load balancer translated from a Service also gives a SOCK flow (TRANSLATED).

The events a full ring could not take are counted by the programs; each second their
count is compared with the last, and what was lost is told to the store's followers (as
Hubble's LostEvent with the source PERF_EVENT_RING_BUFFER).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

from mesh.datapath.flowevents import FlowEvent, FlowEvents, decode
from mesh.datapath.layout import FLOW_CHANGED, FLOW_CLOSED, FLOW_NEW, FLOW_POLICY_INGRESS
from mesh.flows.accesslog import Names
from mesh.flows.connections import Connections
from mesh.flows.model import (
    EGRESS,
    INGRESS,
    L3_L4,
    SOCK,
    TRANSLATED,
    Connection,
    Endpoint,
    Flow,
)
from mesh.flows.store import RING_LOST, FlowStore

log = logging.getLogger(__name__)
LOST_CHECK = 1.0  # seconds between looks at the datapath's lost-event counter

# flow.proto's numbers, as the programs send them, by name.
VERDICTS = {1: "FORWARDED", 2: "DROPPED", 5: "REDIRECTED"}
POINTS = {1: "TO_PROXY", 3: "TO_STACK", 13: "TO_CRYPTO", 101: "TO_ENDPOINT"}
DROP_REASONS = {133: "POLICY_DENIED", 141: "ERROR_WRITING_TO_PACKET",
                158: "SERVICE_BACKEND_NOT_FOUND", 167: "NO_MAPPING_FOR_NAT_MASQUERADE",
                171: "INVALID_IDENTITY", 178: "SOCKET_LOOKUP_FAILED",
                179: "SOCKET_ASSIGN_FAILED", 195: "UNENCRYPTED_TRAFFIC"}
EVENTS = {FLOW_NEW: "NEW", FLOW_CHANGED: "CHANGED", FLOW_CLOSED: "CLOSED"}
PROTOCOLS = {6: "TCP", 17: "UDP"}
_TCP_FLAGS = ((0x01, "FIN"), (0x02, "SYN"), (0x04, "RST"), (0x08, "PSH"), (0x10, "ACK"))


def tcp_flags(bits: int) -> tuple[str, ...]:
    return tuple(name for bit, name in _TCP_FLAGS if bits & bit)


def direction(ev: FlowEvent, local: Callable[[str], bool]) -> str:
    """A policy drop's is its policy's (the receiver's ingress, the sender's egress).
    Otherwise the connection's, seen from this node's pod: EGRESS when it opened the
    connection (also when both ends are pods of the node: Hubble's egress event of the
    source), INGRESS when it was opened to it."""
    if ev.policy:
        return INGRESS if ev.policy == FLOW_POLICY_INGRESS else EGRESS
    return EGRESS if local(ev.saddr) else INGRESS


def connection_flow(ev: FlowEvent, node: str, names: Names | None,
                    local: Callable[[str], bool], epoch_offset: float) -> Flow:
    """An event as a flow. As in Hubble, the source is the packet's sender (the responder for
    a reply)."""
    initiator, responder = (ev.saddr, ev.sport), (ev.daddr, ev.dport)
    sender, receiver = (responder, initiator) if ev.is_reply else (initiator, responder)
    if names is not None:
        source, destination = names.endpoint(*sender), names.endpoint(*receiver)
    else:
        source, destination = Endpoint(*sender), Endpoint(*receiver)
    return Flow(
        id=str(uuid.uuid4()),
        time=ev.time_ns / 1e9 + epoch_offset, node=node, kind=L3_L4,
        verdict=VERDICTS.get(ev.verdict, "VERDICT_UNKNOWN"),
        drop_reason=DROP_REASONS.get(ev.reason, str(ev.reason)) if ev.reason else "",
        source=source, destination=destination,
        protocol=PROTOCOLS.get(ev.proto, str(ev.proto)),
        direction=direction(ev, local),
        connection=Connection(event=EVENTS.get(ev.type, str(ev.type)),
                              point=POINTS.get(ev.point, ""), is_reply=ev.is_reply,
                              tcp_flags=tcp_flags(ev.tcp_flags), packets=ev.packets,
                              bytes=ev.bytes))


def event_flows(ev: FlowEvent, node: str, names: Names | None, local: Callable[[str], bool],
                epoch_offset: float, connections: Connections | None = None) -> list[Flow]:
    """An event's flows: its connection's, and before it, for a new connection the socket
    load balancer translated, the translation (as Hubble's SOCK flow after the translation:
    the client to the backend, the Service named); the connection's flow names the Service
    too. With `connections`, they carry their connection's id."""
    flow = connection_flow(ev, node, names, local, epoch_offset)
    if connections is not None:
        key = (ev.saddr, ev.sport, ev.daddr, ev.dport, flow.protocol)
        cid = connections.open(key) if ev.type == FLOW_NEW else connections.get(key)
        flow = replace(flow, connection_id=cid)
    if not ev.xlate_address:
        return [flow]
    service = names.service(ev.xlate_address) if names is not None else ""
    destination = replace(flow.destination, service=service)
    flow = replace(flow, destination=destination)
    translation = replace(flow, kind=SOCK, verdict=TRANSLATED, drop_reason="",
                          id=str(uuid.uuid4()),
                          connection=Connection(event="TRANSLATED", point="", is_reply=False))
    return [translation, flow]


class DatapathFlows:
    """The component: the ring read on a thread (`events.read`), batches handed to the loop,
    decoded and named there."""

    def __init__(self, events: FlowEvents, store: FlowStore, node: str,
                 names: Names | None = None, local: Callable[[str], bool] | None = None,
                 enabled: bool = True, connections: Connections | None = None) -> None:
        """`local`: whether an address is a pod of this node (the direction of a flow);
        `connections`: the node's connection ids, shared with the access log's flows."""
        self.events = events
        self.store = store
        self.node = node
        self.names = names
        self.local = local or (lambda _address: False)
        self.enabled = enabled
        self.connections = connections
        self.received = 0  # events read from the ring
        self.lost = 0  # events the ring could not take, told to the store
        self.ready = asyncio.Event()

    def _add(self, batch: list[bytes]) -> None:
        offset = time.time() - time.monotonic()  # the events' clock is CLOCK_MONOTONIC
        self.received += len(batch)
        for raw in batch:
            try:
                for flow in event_flows(decode(raw), self.node, self.names, self.local,
                                        offset, self.connections):
                    self.store.add(flow)
            except (ValueError, TypeError) as e:  # not expected: the layout is ours
                log.warning("flow event skipped", extra={"error": str(e)})

    def _check_lost(self) -> None:
        lost = self.events.counters()["lost"]
        if lost > self.lost:
            self.store.add_lost(lost - self.lost, RING_LOST)
            log.warning("flow events lost: the datapath's ring was full",
                        extra={"lost": lost - self.lost, "total": lost})
            self.lost = lost

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.events.enable(self.enabled)
        if not self.enabled:
            self.ready.set()
            return
        self.lost = self.events.counters()["lost"]  # earlier agents' losses are not ours
        stop = threading.Event()
        failed: list[BaseException] = []

        def deliver(batch: list[bytes]) -> None:
            loop.call_soon_threadsafe(self._add, batch)

        def read() -> None:
            try:
                self.events.read(deliver, stop)
            except BaseException as e:  # told on the loop below
                failed.append(e)
                raise

        reader = threading.Thread(target=read, name="flow-events", daemon=True)
        reader.start()
        self.ready.set()
        try:
            while reader.is_alive():
                await asyncio.sleep(LOST_CHECK)
                self._check_lost()
            raise RuntimeError(f"the flow event reader stopped: {failed[0] if failed else ''}")
        finally:
            stop.set()
            await asyncio.to_thread(reader.join, 1.0)
