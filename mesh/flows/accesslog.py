"""The node's Envoy's access log service (`envoy.service.accesslog.v3`, gRPC on a unix
socket in the state directory): each request Envoy logs becomes an L7 flow.

Envoy streams its entries (batched, flushed every BUFFER_FLUSH) on the bootstrap's
`mesh_accesslog` cluster; every HTTP connection manager the agent configures logs there
(mesh/sinks/envoy/listeners.py). The source is the downstream's address (the pod's own: the
datapath hands connections to Envoy with their addresses); the destination is the upstream
Envoy reached, or, with none, the address the client asked for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from mesh.flows.connections import Connections
from mesh.flows.model import DROPPED, ERROR, FORWARDED, L7, Endpoint, Flow, Http
from mesh.flows.store import FlowStore
from mesh.unixsocket import add_private_port

log = logging.getLogger(__name__)
LOG_NAME = "mesh-flows"
BUFFER_FLUSH = 0.1  # seconds: how stale a flow may be when it reaches the agent
_PROTOCOLS = {1: "HTTP/1.0", 2: "HTTP/1.1", 3: "HTTP/2", 4: "HTTP/3"}


class Names(Protocol):
    """Who is behind an address (mesh/flows/directory.py)."""

    def endpoint(self, address: str, port: int = 0) -> Endpoint: ...

    def service(self, address: str) -> str: ...


def _address(addr: Any) -> tuple[str, int]:
    sa = addr.socket_address
    return str(sa.address), int(sa.port_value)


def http_flow(entry: Any, node: str, names: Names | None = None,
              connections: Connections | None = None) -> Flow:
    """An `HTTPAccessLogEntry` as a flow; the destination names the Service the client
    asked for when the address it connected to is one's ClusterIP; with `connections`, it
    carries the id of the connection the datapath saw (the client's tuple to that
    address)."""
    from envoy.config.core.v3 import base_pb2

    common, request, response = entry.common_properties, entry.request, entry.response
    src = _address(common.downstream_remote_address)
    asked = _address(common.downstream_local_address)
    dst = _address(common.upstream_remote_address) \
        if common.HasField("upstream_remote_address") and \
        common.upstream_remote_address.socket_address.address else \
        asked
    status = response.response_code.value if response.HasField("response_code") else 0
    details = response.response_code_details
    latency = common.time_to_last_downstream_tx_byte.ToNanoseconds() / 1e6 \
        if common.HasField("time_to_last_downstream_tx_byte") else 0.0
    verdict, reason = FORWARDED, ""
    if details.startswith("rbac_access_denied"):
        verdict, reason = DROPPED, "POLICY_DENIED"
    elif status == 0 or (status >= 500 and details != "via_upstream"):
        verdict = ERROR  # Envoy answered for an upstream that did not
    method = base_pb2.RequestMethod.Name(request.request_method) \
        if request.request_method else ""
    source, destination = (names.endpoint(*src), names.endpoint(*dst)) \
        if names is not None else (Endpoint(*src), Endpoint(*dst))
    service = names.service(asked[0]) if names is not None else ""
    if service:
        destination = dataclasses.replace(destination, service=service)
    cid = connections.get((*src, *asked, "TCP")) if connections is not None else ""
    return Flow(
        id=str(uuid.uuid4()), connection_id=cid,
        time=common.start_time.ToNanoseconds() / 1e9 if common.HasField("start_time") else 0.0,
        node=node, kind=L7, verdict=verdict, drop_reason=reason,
        source=source, destination=destination, protocol="TCP",
        http=Http(method=method, path=request.original_path or request.path,
                  host=request.authority, status=status, latency_ms=round(latency, 3),
                  protocol=_PROTOCOLS.get(entry.protocol_version, ""),
                  route=common.route_name, upstream_cluster=common.upstream_cluster,
                  details=details))


class AccessLogServer:
    """The service on `socket` (0600), its flows into `store`."""

    def __init__(self, socket: Path, store: FlowStore, node: str,
                 names: Names | None = None, connections: Connections | None = None) -> None:
        self.socket = socket
        self.connections = connections
        self.store = store
        self.node = node
        self.names = names
        self.entries = 0
        self.ready = asyncio.Event()

    async def run(self) -> None:
        import grpc
        from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

        outer = self

        class Servicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
            async def StreamAccessLogs(self, requests: AsyncIterator[Any],
                                       context: Any) -> Any:
                async for message in requests:
                    for entry in message.http_logs.log_entry:
                        outer.entries += 1
                        try:
                            outer.store.add(http_flow(entry, outer.node, outer.names,
                                                      outer.connections))
                        except (ValueError, TypeError) as e:  # an entry we cannot read
                            log.warning("access log entry skipped", extra={"error": str(e)})
                return als_pb2.StreamAccessLogsResponse()

        server = grpc.aio.server()
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(Servicer(), server)
        add_private_port(server, self.socket)
        await server.start()
        self.ready.set()
        try:
            await server.wait_for_termination()
        finally:
            await asyncio.shield(server.stop(0.5))
