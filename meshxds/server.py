"""The ADS server (state-of-the-world and delta) and a CSDS endpoint for ACK status.

It listens on a unix socket (mode 0600, in a directory of mode 0700) by default, or on a
loopback TCP address on request; it refuses any other address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from envoy.admin.v3 import config_dump_shared_pb2 as dump_pb
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2 as pb
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from google.protobuf import timestamp_pb2

from meshxds.acks import AckState
from meshxds.address import ListenAddress
from meshxds.cache import SnapshotCache
from meshxds.stream import Stream

log = logging.getLogger(__name__)

_GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # Notice a vanished Envoy (killed, host gone) instead of keeping its stream forever.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache
        self._streams: set[Stream] = set()
        self._closing = False

    def close_streams(self) -> None:
        """End every stream: each handler returns (the RPC ends OK, Envoy reconnects to the
        next server), rather than be cancelled by grpc at the end of the stop's grace."""
        self._closing = True
        for stream in self._streams:
            stream.wake.set()

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[pb.DiscoveryRequest], context: Any
    ) -> None:
        await self._serve(request_iterator, context, delta=False)

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[pb.DeltaDiscoveryRequest], context: Any
    ) -> None:
        await self._serve(request_iterator, context, delta=True)

    async def _serve(self, requests: AsyncIterator[Any], context: Any, delta: bool) -> None:
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return
        node_id = first.node.id
        if not node_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first request names no node")
        node = self._cache.node(node_id)
        stream = Stream(node, delta=delta, peer=context.peer())
        closed = asyncio.Event()
        handle = stream.handle_delta_request if delta else stream.handle_sotw_request
        node.streams.add(stream)
        self._streams.add(stream)
        handle(first)
        protocol = "delta" if delta else "sotw"
        log.info("envoy connected", extra={"node": node_id, "protocol": protocol})

        async def read() -> None:
            try:
                async for req in requests:
                    handle(req)
                    stream.wake.set()
            finally:
                closed.set()
                stream.wake.set()

        reader = asyncio.create_task(read(), name=f"ads-read-{node_id}")
        try:
            while not closed.is_set() and not self._closing:
                stream.wake.clear()
                out = stream.delta_responses() if delta else stream.sotw_responses()
                for response in out:
                    await context.write(response)
                    node.bytes_sent += response.ByteSize()
                    node.responses_sent[response.type_url] = (
                        node.responses_sent.get(response.type_url, 0) + 1)
                if not out:
                    await stream.wake.wait()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            node.streams.discard(stream)
            self._streams.discard(stream)
            node.progressed()
            log.info("envoy disconnected", extra={"node": node_id, "protocol": protocol})


_CLIENT_STATUS = {
    AckState.ACKED: dump_pb.ClientResourceStatus.ACKED,
    AckState.NACKED: dump_pb.ClientResourceStatus.NACKED,
    AckState.PENDING: dump_pb.ClientResourceStatus.REQUESTED,
}
_CONFIG_STATUS = {
    AckState.ACKED: csds_pb2.ConfigStatus.SYNCED,
    AckState.NACKED: csds_pb2.ConfigStatus.ERROR,
    AckState.PENDING: csds_pb2.ConfigStatus.STALE,
}


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class CsdsServicer(csds_pb2_grpc.ClientStatusDiscoveryServiceServicer):  # type: ignore[misc]
    """Client Status Discovery: per node and resource, what its Envoy ACKed or NACKed."""

    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache

    async def FetchClientStatus(
        self, request: csds_pb2.ClientStatusRequest, context: Any
    ) -> csds_pb2.ClientStatusResponse:
        wanted = request.node.id
        response = csds_pb2.ClientStatusResponse()
        for node_id in self._cache.node_ids():
            if wanted and wanted != node_id:
                continue
            config = response.config.add(node=base_pb2.Node(id=node_id))
            for s in self._cache.status(node_id):
                entry = config.generic_xds_configs.add(
                    type_url=s.type_url,
                    name=s.name,
                    version_info=s.ack.acked_version or "",
                    config_status=_CONFIG_STATUS[s.state],
                    client_status=_CLIENT_STATUS[s.state],
                )
                if s.ack.acked_at:
                    entry.last_updated.CopyFrom(_timestamp(s.ack.acked_at))
                if s.ack.nack_message:
                    entry.error_state.CopyFrom(dump_pb.UpdateFailureState(
                        details=s.ack.nack_message,
                        version_info=s.ack.nack_version,
                        last_update_attempt=_timestamp(s.ack.nacked_at),
                    ))
        return response


class XdsServer:
    """Owns the grpc.aio server. `start` binds; `stop` closes every stream."""

    def __init__(self, cache: SnapshotCache, address: ListenAddress) -> None:
        self.cache = cache
        self.address = address
        self._server: grpc.aio.Server | None = None
        self._ads: AdsServicer | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=_GRPC_OPTIONS)
        self._ads = AdsServicer(self.cache)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self._ads, server)
        csds_pb2_grpc.add_ClientStatusDiscoveryServiceServicer_to_server(
            CsdsServicer(self.cache), server
        )
        path = self.address.unix_path
        if path is not None:
            _private_dir(path.parent)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # left by a crashed predecessor
            server.add_insecure_port(self.address.grpc_target())
        else:
            port = server.add_insecure_port(self.address.grpc_target())
            self.address = ListenAddress(host=self.address.host, port=port)
        await server.start()
        if path is not None:
            os.chmod(path, 0o600)
        self._server = server
        log.info("xds server listening", extra={"address": str(self.address)})

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            if self._ads is not None:
                self._ads.close_streams()
            await self._server.stop(grace)
            self._server = None
            log.info("xds server stopped", extra={"address": str(self.address)})


def _private_dir(path: Path) -> None:
    """A directory of our own for the socket: made 0700 when we create it; one that exists
    (the state directory, or a shared one like /tmp) keeps its mode; the socket is 0600."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask
