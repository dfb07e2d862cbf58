"""The relay: one Observer API for the whole cluster, joining the nodes' (as Hubble Relay
does), so that `mesh observe` and `hubble observe` see every node's flows in one stream.

GetFlows asks every node with the same request: without `follow`, the flows of all are
sorted by time (`number` is per node, as with Hubble Relay); with it, each node's flows go
on as they come. A node that cannot be reached is reported in the stream (a NodeStatusEvent,
NODE_UNAVAILABLE, with the error) and the others keep going. ServerStatus adds the nodes'
counts and names the unavailable ones; GetNodes lists every node with its state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from mesh.hubble.observer import VERSION, serve

log = logging.getLogger(__name__)
CALL_TIMEOUT = 5.0  # seconds a unary call to a node may take


class Relay:
    def __init__(self, peers: Mapping[str, str]) -> None:
        """`peers`: node name -> its Observer API (unix:///path or host:port)."""
        import grpc

        from mesh.hubble.api.observer import observer_pb2_grpc

        self.peers = dict(peers)
        self._channels = {name: grpc.aio.insecure_channel(target)
                          for name, target in self.peers.items()}
        self._stubs = {name: observer_pb2_grpc.ObserverStub(ch)  # type: ignore[no-untyped-call]
                       for name, ch in self._channels.items()}

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close(None)

    def _unavailable(self, names: list[str], error: str) -> Any:
        from mesh.hubble.api.observer import observer_pb2
        from mesh.hubble.api.relay import relay_pb2

        out = observer_pb2.GetFlowsResponse(node_status=relay_pb2.NodeStatusEvent(
            state_change=relay_pb2.NODE_UNAVAILABLE, node_names=names, message=error))
        out.time.GetCurrentTime()
        return out

    async def flows(self, request: Any) -> AsyncIterator[Any]:
        import grpc

        if not request.follow:
            async def collect(name: str) -> list[Any]:
                try:
                    return [r async for r in self._stubs[name].GetFlows(
                        request, timeout=CALL_TIMEOUT)]
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        raise  # the request's fault, the same on every node
                    return [self._unavailable([name], e.details() or str(e.code()))]
            batches = await asyncio.gather(*(collect(n) for n in self.peers))
            merged = [r for batch in batches for r in batch]
            merged.sort(key=lambda r: (r.flow.time.ToNanoseconds()
                                       if r.WhichOneof("response_types") == "flow"
                                       else r.time.ToNanoseconds()))
            for r in merged:
                yield r
            return
        queue: asyncio.Queue[Any] = asyncio.Queue(1024)
        errors: list[BaseException] = []

        async def pump(name: str) -> None:
            try:
                async for r in self._stubs[name].GetFlows(request):
                    await queue.put(r)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    errors.append(e)
                    await queue.put(None)
                    return
                await queue.put(self._unavailable([name], e.details() or str(e.code())))

        tasks = [asyncio.create_task(pump(n)) for n in self.peers]
        try:
            while True:
                item = await queue.get()
                if item is None and errors:
                    raise errors[0]
                if item is not None:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _each(self, call: str, request: Any) -> dict[str, Any]:
        """Each node's answer to a unary call, or the error (a str) it got."""
        import grpc

        async def one(name: str) -> Any:
            try:
                return await getattr(self._stubs[name], call)(request, timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as e:
                return e.details() or str(e.code())
        answers = await asyncio.gather(*(one(n) for n in self.peers))
        return dict(zip(self.peers, answers, strict=True))

    async def status(self) -> Any:
        from google.protobuf.wrappers_pb2 import UInt32Value

        from mesh.hubble.api.observer import observer_pb2

        answers = await self._each("ServerStatus", observer_pb2.ServerStatusRequest())
        ok = {n: a for n, a in answers.items() if not isinstance(a, str)}
        down = sorted(n for n, a in answers.items() if isinstance(a, str))
        return observer_pb2.ServerStatusResponse(
            num_flows=sum(a.num_flows for a in ok.values()),
            max_flows=sum(a.max_flows for a in ok.values()),
            seen_flows=sum(a.seen_flows for a in ok.values()),
            uptime_ns=max((a.uptime_ns for a in ok.values()), default=0),
            flows_rate=sum(a.flows_rate for a in ok.values()),
            num_connected_nodes=UInt32Value(value=len(ok)),
            num_unavailable_nodes=UInt32Value(value=len(down)),
            unavailable_nodes=down, version=VERSION)

    async def nodes(self) -> Any:
        from mesh.hubble.api.observer import observer_pb2
        from mesh.hubble.api.relay import relay_pb2

        answers = await self._each("GetNodes", observer_pb2.GetNodesRequest())
        out = observer_pb2.GetNodesResponse()
        for name, a in answers.items():
            if isinstance(a, str):
                out.nodes.append(observer_pb2.Node(name=name, address=self.peers[name],
                                                   state=relay_pb2.NODE_UNAVAILABLE))
            else:
                for node in a.nodes:
                    node.address = self.peers[name]
                    out.nodes.append(node)
        return out

    async def namespaces(self) -> Any:
        from mesh.hubble.api.observer import observer_pb2

        answers = await self._each("GetNamespaces", observer_pb2.GetNamespacesRequest())
        names = {n.namespace for a in answers.values() if not isinstance(a, str)
                 for n in a.namespaces}
        return observer_pb2.GetNamespacesResponse(
            namespaces=[observer_pb2.Namespace(namespace=n) for n in sorted(names)])


class RelayServer:
    """The relay's Observer API on `listen`: a unix socket (0600), or HOST:PORT."""

    def __init__(self, listen: str, relay: Relay) -> None:
        self.listen = listen
        self.relay = relay
        self.ready = asyncio.Event()

    async def run(self) -> None:
        import grpc

        from mesh.hubble.api.observer import observer_pb2_grpc

        relay = self.relay

        class Servicer(observer_pb2_grpc.ObserverServicer):
            async def GetFlows(self, request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    async for r in relay.flows(request):
                        yield r
                except grpc.aio.AioRpcError as e:
                    await context.abort(e.code(), e.details() or "")

            async def ServerStatus(self, request: Any, context: Any) -> Any:
                return await relay.status()

            async def GetNodes(self, request: Any, context: Any) -> Any:
                return await relay.nodes()

            async def GetNamespaces(self, request: Any, context: Any) -> Any:
                return await relay.namespaces()

        log.info("hubble relay", extra={"listen": self.listen, "nodes": sorted(relay.peers)})
        try:
            await serve(Servicer(), self.listen, self.ready)
        finally:
            await relay.close()
