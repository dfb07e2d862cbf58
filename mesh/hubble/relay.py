"""The relay: one Observer API for the whole cluster, joining the nodes' (as Hubble Relay
does), so that `mesh observe` and `hubble observe` see every node's flows in one stream.

GetFlows asks every node with the same request: without `follow`, the flows of all are
sorted by time (`number` is per node, as with Hubble Relay); with it, each node's flows go
on as they come, and a node that joins meanwhile is followed too. The nodes are given
(`--peer`), or found in the API server: every Node, at its InternalIP and the agents' port,
over mutual TLS (mesh/hubble/tls.py), followed as nodes join and leave (`NodePeers`). A
node that cannot be reached is reported in the stream (a NodeStatusEvent,
NODE_UNAVAILABLE, with the error) and the others keep going. ServerStatus adds the nodes'
counts and names the unavailable ones; GetNodes lists every node with its state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from typing import Any

from mesh.hubble.observer import VERSION, serve
from mesh.hubble.tls import TLSFiles, channel_credentials, peer_name
from mesh.kube.resources import NODES
from mesh.kube.watch import KindWatch
from mesh.store.objects import KubeObject
from mesh.translate.addressing import node_address_entries

log = logging.getLogger(__name__)
CALL_TIMEOUT = 5.0  # seconds a unary call to a node may take
FOLLOW_RETRY = 2.0  # seconds between tries of a node a following stream lost


class Relay:
    """The nodes' Observer APIs as one. Its peers may change while it serves (nodes found in
    the API server join and leave): a following stream takes in a node that joins."""

    def __init__(self, peers: Mapping[str, str] | None = None, tls: TLSFiles | None = None
                 ) -> None:
        """`peers`: node name -> its Observer API (unix:///path or host:port); `tls`: the
        relay's certificate and the agents' CA, for peers on the network (host:port)."""
        self.tls = tls
        self._credentials = channel_credentials(tls) if tls is not None else None
        self.peers: dict[str, str] = {}
        self._channels: dict[str, Any] = {}
        self._stubs: dict[str, Any] = {}
        self._changed = asyncio.Event()
        self._closing: set[asyncio.Task[None]] = set()
        self.set_peers(peers or {})

    def _channel(self, name: str, target: str) -> Any:
        import grpc

        if self._credentials is None or target.startswith("unix:"):
            return grpc.aio.insecure_channel(target)
        return grpc.aio.secure_channel(target, self._credentials, options=[
            ("grpc.ssl_target_name_override", peer_name(name))])

    def set_peers(self, peers: Mapping[str, str]) -> None:
        """Make `peers` the relay's nodes: new ones connected, gone or moved ones closed."""
        from mesh.hubble.api.observer import observer_pb2_grpc

        if dict(peers) == self.peers:
            return
        for name in [n for n, t in self.peers.items() if peers.get(n) != t]:
            channel = self._channels.pop(name)
            del self._stubs[name], self.peers[name]
            task = asyncio.get_running_loop().create_task(channel.close(None))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        for name, target in peers.items():
            if name not in self.peers:
                self.peers[name] = target
                self._channels[name] = self._channel(name, target)
                self._stubs[name] = observer_pb2_grpc.ObserverStub(  # type: ignore[no-untyped-call]
                    self._channels[name])
        log.info("relay peers", extra={"nodes": sorted(self.peers)})
        self._changed.set()
        self._changed = asyncio.Event()

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close(None)
        await asyncio.gather(*self._closing, return_exceptions=True)

    def _unavailable(self, names: list[str], error: str) -> Any:
        return self._node_state(names, "NODE_UNAVAILABLE", error)

    def _node_state(self, names: list[str], state: str, message: str) -> Any:
        from mesh.hubble.api.observer import observer_pb2
        from mesh.hubble.api.relay import relay_pb2

        out = observer_pb2.GetFlowsResponse(node_status=relay_pb2.NodeStatusEvent(
            state_change=state, node_names=names, message=message))
        out.time.GetCurrentTime()
        return out

    async def flows(self, request: Any) -> AsyncGenerator[Any, None]:
        import grpc

        if not request.follow:
            stubs = dict(self._stubs)

            async def collect(name: str) -> list[Any]:
                try:
                    return [r async for r in stubs[name].GetFlows(
                        request, timeout=CALL_TIMEOUT)]
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        raise  # the request's fault, the same on every node
                    return [self._unavailable([name], e.details() or str(e.code()))]
            batches = await asyncio.gather(*(collect(n) for n in stubs))
            merged = [r for batch in batches for r in batch]
            merged.sort(key=lambda r: (r.flow.time.ToNanoseconds()
                                       if r.WhichOneof("response_types") == "flow"
                                       else r.time.ToNanoseconds()))
            for r in merged:
                yield r
            return
        queue: asyncio.Queue[Any] = asyncio.Queue(1024)
        errors: list[BaseException] = []

        async def pump(name: str, stub: Any) -> None:
            """A node's flows into the queue. A node that cannot be reached (or goes away:
            its agent restarts) is reported once and asked again every FOLLOW_RETRY seconds,
            then for its new flows only (its old ones were sent, or are not wanted)."""
            asked, down = request, False
            while True:
                try:
                    call = stub.GetFlows(asked)
                    await call.initial_metadata()  # the node's agents send it at once
                    if down and not call.done():
                        await queue.put(self._node_state([name], "NODE_CONNECTED", ""))
                        down = False
                    async for r in call:
                        await queue.put(r)
                    error = "the node ended the stream"
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        errors.append(e)
                        await queue.put(None)
                        return
                    if e.code() == grpc.StatusCode.CANCELLED:
                        return
                    error = e.details() or str(e.code())
                if not down:
                    await queue.put(self._unavailable([name], error))
                    down = True
                await asyncio.sleep(FOLLOW_RETRY)
                asked = type(request)()
                asked.CopyFrom(request)
                asked.number, asked.first = 0, False
                asked.ClearField("since")

        pumps: dict[str, tuple[Any, asyncio.Task[None]]] = {}

        def follow_peers() -> None:
            """A pump per node: started for a node that joined, stopped for one that left."""
            for name in list(pumps):
                if self._stubs.get(name) is not pumps[name][0]:
                    pumps.pop(name)[1].cancel()
            for name, stub in self._stubs.items():
                if name not in pumps:
                    pumps[name] = (stub, asyncio.create_task(pump(name, stub)))

        follow_peers()
        changed = asyncio.ensure_future(self._changed.wait())
        item_task: asyncio.Future[Any] = asyncio.ensure_future(queue.get())
        try:
            while True:
                await asyncio.wait({item_task, changed}, return_when=asyncio.FIRST_COMPLETED)
                if changed.done():
                    follow_peers()
                    changed = asyncio.ensure_future(self._changed.wait())
                if not item_task.done():
                    continue
                item = item_task.result()
                if item is None and errors:
                    raise errors[0]
                if item is not None:
                    yield item
                item_task = asyncio.ensure_future(queue.get())
        finally:
            item_task.cancel()
            changed.cancel()
            for _, t in pumps.values():
                t.cancel()
            await asyncio.gather(*(t for _, t in pumps.values()), return_exceptions=True)

    async def _each(self, call: str, request: Any) -> dict[str, Any]:
        """Each node's answer to a unary call, or the error (a str) it got."""
        import grpc

        stubs = dict(self._stubs)  # the peers may change meanwhile

        async def one(name: str) -> Any:
            try:
                return await getattr(stubs[name], call)(request, timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as e:
                return e.details() or str(e.code())
        answers = await asyncio.gather(*(one(n) for n in stubs))
        return dict(zip(stubs, answers, strict=True))

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
                out.nodes.append(observer_pb2.Node(name=name, address=self.peers.get(name, ""),
                                                   state=relay_pb2.NODE_UNAVAILABLE))
            else:
                for node in a.nodes:
                    node.address = self.peers.get(name, "")
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
    """The relay's Observer API on `listen`: a unix socket (0600), or HOST:PORT (off the
    loopback with mutual TLS only, `tls`)."""

    def __init__(self, listen: str, relay: Relay, tls: TLSFiles | None = None) -> None:
        self.listen = listen
        self.relay = relay
        self.tls = tls
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
            await serve(Servicer(), self.listen, self.ready, self.tls)
        finally:
            await relay.close()


def node_address(node: KubeObject, port: int) -> str | None:
    """A Node's agent's Observer API: its InternalIP (else ExternalIP) and `port`."""
    entries = node_address_entries(node)
    for kind in ("InternalIP", "ExternalIP"):
        found = next((a for t, a in entries if t == kind), None)
        if found is not None:
            return f"[{found}]:{port}" if ":" in found else f"{found}:{port}"
    return None


class NodePeers:
    """The relay's peers from the API server: every Node (list+watch), its agent at the
    Node's address and `port`. Needs only to list and watch Nodes."""

    def __init__(self, http: Any, relay: Relay, port: int) -> None:
        self.http = http
        self.relay = relay
        self.port = port

    def replace(self, source: str, objects: Iterable[KubeObject]) -> bool:
        peers = {}
        for obj in objects:
            address = node_address(obj, self.port)
            if address is not None:
                peers[obj.name] = address
        self.relay.set_peers(peers)
        return True

    async def run(self) -> None:
        await KindWatch(NODES, self.http, self, follow_status=True).run()
