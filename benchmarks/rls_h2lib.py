"""The rate limit service's unary gRPC method on the `h2` library's HTTP/2 (its state
machine, flow control and HPACK), for benchmarks/rls_load.py to measure beside the
service's own HTTP/2 (mesh/ratelimit/h2grpc.py) and grpcio's asyncio server.

The same contract as h2grpc.UnaryServer: handlers take the request message and return the
response message (or an awaitable of it), raising h2grpc.GrpcError for a gRPC status; the
server listens on a unix socket (mode 0600) or loopback and stops gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Mapping

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from mesh.ratelimit.h2grpc import (
    INTERNAL,
    UNIMPLEMENTED,
    GrpcError,
    Handler,
)
from meshxds.address import ListenAddress

log = logging.getLogger(__name__)

_CONFIG = h2.config.H2Configuration(
    client_side=False, header_encoding=None, validate_outbound_headers=False,
    normalize_outbound_headers=False, validate_inbound_headers=False,
    normalize_inbound_headers=False)
_RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
_TRAILERS_OK = [(b"grpc-status", b"0")]


class _Stream:
    __slots__ = ("body", "error", "handler", "pending", "task")

    def __init__(self) -> None:
        self.body = bytearray()
        self.handler: Handler | None = None
        self.error: GrpcError | None = None
        self.task: asyncio.Task[None] | None = None
        self.pending = b""  # response DATA waiting for flow control window


class _Connection(asyncio.Protocol):
    def __init__(self, server: H2LibServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._conn = h2.connection.H2Connection(_CONFIG)
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, _Stream] = {}
        self._flush_scheduled = False
        self._closing = False
        self.idle = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server.connections.add(self)
        self._conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self._server.max_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self._server.max_message + 5,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16384})
        self._conn.initiate_connection()
        self._conn.increment_flow_control_window(2**24)
        self.idle.set()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        for s in self._streams.values():
            if s.task is not None:
                s.task.cancel()
        self._streams.clear()
        self._transport = None
        self.idle.set()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            if self._transport is not None:
                self._transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                s = self._streams.get(event.stream_id)
                self._conn.acknowledge_received_data(event.flow_controlled_length,
                                                     event.stream_id)
                if s is not None and s.error is None:
                    if len(s.body) + len(event.data) > self._server.max_message + 5:
                        s.error = GrpcError(8, "request message too large")
                        s.body.clear()
                    else:
                        s.body += event.data
                if event.stream_ended is not None and s is not None:
                    self._dispatch(event.stream_id, s)
            elif isinstance(event, h2.events.RequestReceived):
                self._request(event)
            elif isinstance(event, h2.events.StreamEnded):
                s = self._streams.get(event.stream_id)
                if s is not None and s.task is None:
                    self._dispatch(event.stream_id, s)
            elif isinstance(event, h2.events.WindowUpdated):
                self._unblock()
            elif isinstance(event, h2.events.StreamReset):
                s = self._streams.pop(event.stream_id, None)
                if s is not None and s.task is not None:
                    s.task.cancel()
                self._check_idle()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._shutdown()
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self._unblock()
        self._schedule_flush()

    def _request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        if self._closing:
            self._conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        s = _Stream()
        self._streams[sid] = s
        self.idle.clear()
        fields = dict(event.headers or ())
        path = bytes(fields.get(b":path", b"")).decode("latin-1")
        if fields.get(b":method") != b"POST" or not bytes(fields.get(
                b"content-type", b"")).startswith(b"application/grpc"):
            s.error = GrpcError(INTERNAL, "not a gRPC request")
        elif (handler := self._server.methods.get(path)) is None:
            s.error = GrpcError(UNIMPLEMENTED, f"unknown method {path[:100]}")
        else:
            s.handler = handler
        if event.stream_ended is not None:
            self._dispatch(sid, s)

    def _dispatch(self, sid: int, s: _Stream) -> None:
        if s.error is not None or s.handler is None:
            self._respond_error(sid, s.error or GrpcError(INTERNAL, "no handler"))
            return
        body = bytes(s.body)
        s.body.clear()
        if len(body) < 5 or int.from_bytes(body[1:5], "big") != len(body) - 5:
            self._respond_error(sid, GrpcError(INTERNAL, "expected one gRPC message"))
            return
        if body[0]:
            self._respond_error(sid, GrpcError(UNIMPLEMENTED, "compressed messages"))
            return
        try:
            out = s.handler(body[5:])
        except GrpcError as e:
            self._respond_error(sid, e)
            return
        except Exception:
            log.exception("grpc handler failed")
            self._respond_error(sid, GrpcError(INTERNAL, "internal error"))
            return
        if isinstance(out, bytes):
            self._respond(sid, out)
        else:
            s.task = self._loop.create_task(self._await(sid, s, out))

    async def _await(self, sid: int, s: _Stream, out: Awaitable[bytes]) -> None:
        try:
            message = await out
        except GrpcError as e:
            self._respond_error(sid, e)
        except Exception:
            log.exception("grpc handler failed")
            self._respond_error(sid, GrpcError(INTERNAL, "internal error"))
        else:
            self._respond(sid, message)
        self._schedule_flush()

    def _respond(self, sid: int, message: bytes) -> None:
        s = self._streams.get(sid)
        if s is None:
            return
        try:
            self._conn.send_headers(sid, _RESPONSE_HEADERS)
        except h2.exceptions.StreamClosedError:
            self._streams.pop(sid, None)
            self._check_idle()
            return
        s.pending = b"\x00" + len(message).to_bytes(4, "big") + message
        self._push(sid, s)

    def _push(self, sid: int, s: _Stream) -> None:
        while s.pending:
            n = min(len(s.pending), self._conn.local_flow_control_window(sid),
                    self._conn.max_outbound_frame_size)
            if n <= 0:
                return
            self._conn.send_data(sid, s.pending[:n])
            s.pending = s.pending[n:]
        self._conn.send_headers(sid, _TRAILERS_OK, end_stream=True)
        self._streams.pop(sid, None)
        self._check_idle()

    def _unblock(self) -> None:
        for sid, s in list(self._streams.items()):
            if s.pending:
                self._push(sid, s)

    def _respond_error(self, sid: int, e: GrpcError) -> None:
        if self._streams.pop(sid, None) is None:
            return
        trailers = [*_RESPONSE_HEADERS, (b"grpc-status", str(e.code).encode())]
        if e.message:
            trailers.append((b"grpc-message", e.message[:512].encode("ascii", "replace")))
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._conn.send_headers(sid, trailers, end_stream=True)
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._streams:
            self.idle.set()
            if self._closing and self._transport is not None:
                self._flush()
                if self._transport is not None:
                    self._transport.close()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._conn.data_to_send()
        if out and self._transport is not None:
            self._transport.write(out)

    def _shutdown(self) -> None:
        if not self._closing:
            self._closing = True
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._conn.close_connection()
        self._check_idle()
        self._schedule_flush()

    def shutdown(self) -> None:
        self._shutdown()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class H2LibServer:
    def __init__(self, methods: Mapping[str, Handler], max_message: int = 65536,
                 max_streams: int = 1024) -> None:
        self.methods = dict(methods)
        self.max_message = max_message
        self.max_streams = max_streams
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, address: ListenAddress) -> ListenAddress:
        loop = asyncio.get_running_loop()
        path = address.unix_path
        if path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            old = os.umask(0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            self._server = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
            return address
        self._server = await loop.create_server(lambda: _Connection(self), address.host,
                                                address.port)
        return ListenAddress(host=address.host, port=self._server.sockets[0].getsockname()[1])

    async def stop(self, grace: float) -> None:
        if self._server is None:
            return
        self._server.close()
        conns = list(self.connections)
        for c in conns:
            c.shutdown()
        if conns:
            waits = [asyncio.ensure_future(c.idle.wait()) for c in conns]
            _, pending = await asyncio.wait(waits, timeout=grace)
            for w in pending:
                w.cancel()
        for c in list(self.connections):
            if not c.idle.is_set():
                c.abort()
        self._server = None
        await asyncio.sleep(0)
