"""Hubble's Observer gRPC API served from the node's flow store, on a unix socket of the
agent's state directory (0600 from birth, as every agent endpoint: local only), so that
Hubble's own clients (`hubble observe --server unix://...`) and `mesh observe` read the
node's flows. For the cluster's relay, the agent may serve it on the network too, with
mutual TLS only (mesh/hubble/tls.py).

GetFlows: the last `number` flows the filters take (or the first, with `first`), within
`since`/`until`, then, with `follow`, each new one as it comes; a follower that falls
behind is told what it lost (a LostEvent), as are events the datapath's ring lost.
ServerStatus, GetNodes and GetNamespaces answer for this node. Agent and debug events are
not produced here (UNIMPLEMENTED).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from mesh.flows.model import Flow
from mesh.flows.store import FlowStore, Lost
from mesh.hubble.convert import lost_event, to_proto
from mesh.hubble.filters import FilterError, compile_filters
from mesh.hubble.tls import TLSFiles, server_credentials
from mesh.unixsocket import add_private_port

log = logging.getLogger(__name__)
VERSION = "0.1.0"  # what ServerStatus and the flows' emitter say


def _timestamp_seconds(ts: Any) -> float | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return float(ts.seconds + ts.nanos / 1e9)


class Observer:
    """The servicer's logic, apart from gRPC's plumbing (tested on its own)."""

    def __init__(self, store: FlowStore, node: str,
                 namespaces: Callable[[], set[str]] | None = None) -> None:
        self.store = store
        self.node = node
        self.namespaces = namespaces or (lambda: set())
        self.started = time.monotonic()

    def status(self) -> Any:
        from mesh.hubble.api.observer import observer_pb2

        uptime = time.monotonic() - self.started
        return observer_pb2.ServerStatusResponse(
            num_flows=len(self.store), max_flows=self.store.capacity,
            seen_flows=self.store.seen, uptime_ns=int(uptime * 1e9), version=VERSION,
            flows_rate=self.store.seen / uptime if uptime > 0 else 0.0)

    def node_info(self, address: str) -> Any:
        from mesh.hubble.api.observer import observer_pb2
        from mesh.hubble.api.relay import relay_pb2

        return observer_pb2.Node(
            name=self.node, version=VERSION, address=address,
            state=relay_pb2.NODE_CONNECTED,
            uptime_ns=int((time.monotonic() - self.started) * 1e9),
            num_flows=len(self.store), max_flows=self.store.capacity,
            seen_flows=self.store.seen)

    async def flows(self, request: Any) -> AsyncIterator[Any]:
        """GetFlowsResponse messages for a GetFlowsRequest. Raises FilterError for filters
        it cannot use."""
        from google.protobuf import timestamp_pb2

        from mesh.hubble.api.observer import observer_pb2

        match = compile_filters(request.whitelist, request.blacklist)
        since = _timestamp_seconds(request.since) if request.HasField("since") else None
        until = _timestamp_seconds(request.until) if request.HasField("until") else None
        mask = request.field_mask if request.HasField("field_mask") and \
            request.field_mask.paths else None

        # the message a flow was last filtered as: a flow taken is answered with it rather
        # than converted again (the store asks `taken` just before it hands the flow over)
        last: list[tuple[Flow, Any]] = []

        def response(item: Flow | Lost) -> Any:
            out = observer_pb2.GetFlowsResponse(node_name=self.node)
            if isinstance(item, Lost):
                out.lost_events.CopyFrom(lost_event(item))
                out.time.GetCurrentTime()
                return out
            flow = last[0][1] if last and last[0][0] is item else to_proto(item, VERSION)
            if mask is not None:
                masked = type(flow)()
                mask.MergeMessage(flow, masked)
                flow = masked
            out.flow.CopyFrom(flow)
            out.time.CopyFrom(timestamp_pb2.Timestamp(
                seconds=int(item.time), nanos=int((item.time % 1) * 1e9)))
            return out

        def in_time(f: Flow) -> bool:
            return (since is None or f.time >= since) and (until is None or f.time <= until)

        def taken(f: Flow) -> bool:
            if not in_time(f):
                return False
            message = to_proto(f, VERSION)
            last[:] = [(f, message)]
            return match(message)

        number = request.number
        if request.follow:
            # the ring's last `number` first (none unless asked), then what comes
            async for item in self.store.follow(number, taken):
                if isinstance(item, Flow) and until is not None and item.time > until:
                    return
                yield response(item)
            return
        found = self.store.last(None, taken)
        if number:
            found = found[:number] if request.first else found[-number:]
        for f in found:
            yield response(f)


class ObserverServer:
    """The agent's component: Observer on `socket`, or on HOST:PORT (`listen`) for the
    cluster's relay, with mutual TLS off the loopback."""

    def __init__(self, socket: Path, observer: Observer, listen: str | None = None,
                 tls: TLSFiles | None = None) -> None:
        self.socket = socket
        self.observer = observer
        self.listen = listen or f"unix://{socket}"
        self.tls = tls
        self.ready = asyncio.Event()

    async def run(self) -> None:
        import grpc

        from mesh.hubble.api.observer import observer_pb2, observer_pb2_grpc

        outer = self.observer
        address = self.listen

        class Servicer(observer_pb2_grpc.ObserverServicer):
            async def GetFlows(self, request: Any, context: Any) -> AsyncIterator[Any]:
                # At once, not with the first flow: a relay following this node knows
                # it is connected although no flow comes for a while.
                await context.send_initial_metadata(())
                try:
                    async for r in outer.flows(request):
                        yield r
                except FilterError as e:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

            async def ServerStatus(self, request: Any, context: Any) -> Any:
                return outer.status()

            async def GetNodes(self, request: Any, context: Any) -> Any:
                return observer_pb2.GetNodesResponse(nodes=[outer.node_info(address)])

            async def GetNamespaces(self, request: Any, context: Any) -> Any:
                return observer_pb2.GetNamespacesResponse(namespaces=[
                    observer_pb2.Namespace(namespace=n) for n in sorted(outer.namespaces())])

        log.info("hubble observer API", extra={"listen": address, "tls": self.tls is not None})
        await serve(Servicer(), address, self.ready, self.tls)


def check_listen(listen: str, tls: TLSFiles | None) -> None:
    """Flows name every workload and its traffic: off the node's loopback they are served
    with mutual TLS only."""
    if listen.startswith("unix://") or tls is not None:
        return
    host = listen.rpartition(":")[0].strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"{listen}: an address off the loopback needs TLS (a directory "
                         "with ca.crt, tls.crt, tls.key)")


async def serve(servicer: Any, listen: str, ready: asyncio.Event,
                tls: TLSFiles | None = None) -> None:
    """An Observer servicer on `listen` (unix:///PATH, made 0600, or HOST:PORT: loopback,
    or any address with mutual TLS) with the standard health service (`hubble status` asks
    it first, of the name Hubble gives its server), until cancelled; `ready` set once it
    listens."""
    check_listen(listen, tls)
    import grpc
    from grpc_health.v1 import _async as aio_health
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from mesh.hubble.api.observer import observer_pb2_grpc

    server = grpc.aio.server()
    observer_pb2_grpc.add_ObserverServicer_to_server(  # type: ignore[no-untyped-call]
        servicer, server)
    checks = aio_health.HealthServicer()
    await checks.set("hubble.server.Observer", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    if listen.startswith("unix://"):
        add_private_port(server, Path(listen[len("unix://"):]))
    elif tls is not None:
        server.add_secure_port(listen, server_credentials(tls))
    else:
        server.add_insecure_port(listen)
    await server.start()
    ready.set()
    try:
        await server.wait_for_termination()
    finally:
        await asyncio.shield(server.stop(0.5))
