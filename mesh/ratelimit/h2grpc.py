"""A small gRPC server for unary calls, on HTTP/2 written for it: the rate limit service's
transport.

Why: benchmarks/rls_load.py runs the service on three servers side by side (2 cores, the
service pinned to one, the load on the other, medians of rounds). On this one a decision
costs ~40 us of the core (~17,500 decisions/s, 32 calls in flight, p99 ~2.5 ms); on the
`h2` library's HTTP/2 with the same handler ~140 us (~7,000/s, p99 ~6 ms: its state
machine and HPACK, ~100 us a call); on grpcio's asyncio server (`--transport grpcio`)
~370 us (~2,700/s, p99 ~14 ms: its per-call tasks and thread hand-offs). At a load all
three sustain (1,000/s) the latencies are alike. Hence this, tested as a peer would by
tests/test_h2grpc.py.

Scope: what a gRPC client (Envoy's, grpcio's) does with a unary method. HTTP/2 as RFC 9113
has it for a server that never pushes: the preface and SETTINGS, HPACK header blocks (the
`hpack` package decodes; our own headers are literals that never touch the dynamic table),
CONTINUATION, padding, PING, GOAWAY (both ways), RST_STREAM, and flow control both ways
(ours: a large connection window topped up as data arrives, streams bounded by the message
size; the peer's: responses wait for its WINDOW_UPDATEs). One request message per call,
uncompressed; the answer is headers, one message, trailers, or a trailers-only error.
Limits: message size, concurrent streams, header list size, frame size. A connection error
is answered with GOAWAY, then our side is closed while the peer's bytes are still read for
a moment (closing with them unread would reset the connection, GOAWAY and all); a graceful
stop closes the same way once the calls open are answered.

All of a connection's output produced within one event loop iteration goes out in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

from hpack import Decoder, HPACKError
from hpack.table import HeaderTable

from meshxds.address import ListenAddress

log = logging.getLogger(__name__)

# gRPC status codes
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT = 0, 1, 2, 3
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 8, 12, 13, 14

Handler = Callable[[bytes], bytes | Awaitable[bytes]]


class GrpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types and flags
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# Error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9
# Settings
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE = 1, 2, 3, 4
S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 5, 6

MAX_FRAME = 16384  # ours (the default): we never advertise more
MAX_WINDOW = 2**31 - 1
CONN_WINDOW = 1 << 24  # what we let the peer send before our WINDOW_UPDATE
MAX_HEADER_LIST = 16384
LINGER = 1.0  # seconds a connection closed for an error still reads what comes

_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")


def _frame(type_: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return bytes((n >> 16, (n >> 8) & 0xFF, n & 0xFF, type_, flags)) + _U32.pack(stream) + \
        payload


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    # Literal without indexing, new name, no Huffman: no state in the peer's decoder.
    return b"\x00" + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0) + value


_STATUS_200 = b"\x88"  # static table index 8
_RESPONSE_HEADERS = _STATUS_200 + _literal(b"content-type", b"application/grpc")
_TRAILERS_OK = _literal(b"grpc-status", b"0")


def _trailers(code: int, message: str) -> bytes:
    block = _literal(b"grpc-status", str(code).encode())
    if message:
        # Percent-encoded as gRPC wants (space and printable ASCII but '%' stay as they are).
        text = quote(message[:512], safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
        block += _literal(b"grpc-message", text.encode())
    return block


def _table_state(table: HeaderTable) -> tuple[tuple[tuple[bytes, bytes], ...], int]:
    """What the dynamic table holds, and its size limit: all a header block's meaning
    depends on besides its bytes."""
    return tuple(table.dynamic_entries), table.maxsize


class _ConnectionError(Exception):
    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


@dataclass(eq=False)
class _Stream:
    id: int
    send_window: int
    handler: Handler | None = None
    error: GrpcError | None = None  # answer this once the request has ended
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False  # the client's side
    task: asyncio.Task[None] | None = None
    awaiting: Awaitable[bytes] | None = None  # the handler's, which `task` awaits
    blocked: bytes = b""  # response DATA waiting for flow control window
    trailers: bytes = b""  # sent after `blocked`

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            # Cancelled before it began, the task never awaits the handler's coroutine:
            # closed, it says nothing of never being awaited.
            if isinstance(coro := self.awaiting, Coroutine):
                self.task.add_done_callback(lambda _: coro.close())


class _Connection(asyncio.Protocol):
    def __init__(self, server: UnaryServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._preface = False
        self._decoder = Decoder(max_header_list_size=MAX_HEADER_LIST)
        self._header_cache: dict[bytes, dict[bytes, bytes]] = {}
        self._streams: dict[int, _Stream] = {}
        self._last_stream = 0
        self._reset_streams: dict[int, None] = {}  # the last we reset, oldest first
        self._headers: tuple[int, int, bytearray] | None = None  # stream, flags, block
        self._peer_window = 65535  # connection-level, for what we send
        self._peer_initial = 65535  # each new stream's send window
        self._peer_max_frame = MAX_FRAME
        self._received = 0  # since our last connection WINDOW_UPDATE
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._goaway_sent = False
        self._closed = False
        self.idle = asyncio.Event()  # no stream open

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server.connections.add(self)
        settings = b"".join(_SETTING.pack(k, v) for k, v in (
            (S_MAX_CONCURRENT_STREAMS, self._server.max_streams),
            (S_INITIAL_WINDOW_SIZE, self._server.max_message + 5),
            (S_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST)))
        self._send(_frame(SETTINGS, 0, 0, settings),
                   _frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONN_WINDOW - 65535)))
        self.idle.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._abandon()

    def _abandon(self) -> None:
        """Nothing more to send: the calls open are cancelled."""
        self._closed = True
        for s in self._streams.values():
            s.cancel()
        self._streams.clear()
        self.idle.set()

    def pause_writing(self) -> None:
        # The peer does not read: stop reading its requests too.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return  # a connection error's linger: what the peer still sends is dropped
        buf = self._buf + data if self._buf else data
        try:
            pos = self._frames(buf)
        except _ConnectionError as e:
            log.debug("http/2 connection error", extra={"code": e.code, "error": str(e)})
            self._fail(e)
            return
        self._buf = buf[pos:]
        if self._received >= CONN_WINDOW // 2:
            self._send(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._received)))
            self._received = 0

    # -- reading

    def _frames(self, buf: bytes) -> int:
        pos = 0
        if not self._preface:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(buf):
                    raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                return 0
            if not buf.startswith(PREFACE):
                raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 client preface")
            pos = len(PREFACE)
            self._preface = True
        n = len(buf)
        while n - pos >= 9:
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            if length > MAX_FRAME:
                raise _ConnectionError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            if n - pos - 9 < length:
                break
            type_, flags = buf[pos + 3], buf[pos + 4]
            stream = _U32.unpack_from(buf, pos + 5)[0] & 0x7FFFFFFF
            payload = buf[pos + 9:pos + 9 + length]
            pos += 9 + length
            if self._headers is not None and (type_ != CONTINUATION or
                                              stream != self._headers[0]):
                raise _ConnectionError(PROTOCOL_ERROR, "expected CONTINUATION")
            self._frame(type_, flags, stream, payload)
        return pos

    def _frame(self, type_: int, flags: int, stream: int, payload: bytes) -> None:
        if type_ == DATA:
            self._data(flags, stream, payload)
        elif type_ == HEADERS:
            self._header_frame(flags, stream, payload)
        elif type_ == CONTINUATION:
            if self._headers is None:
                raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            sid, first_flags, block = self._headers
            block += payload
            if len(block) > MAX_HEADER_LIST * 2:
                raise _ConnectionError(PROTOCOL_ERROR, "header block too large")
            if flags & END_HEADERS:
                self._headers = None
                self._header_block(sid, first_flags, bytes(block))
        elif type_ == SETTINGS:
            self._settings(flags, stream, payload)
        elif type_ == WINDOW_UPDATE:
            self._window_update(stream, payload)
        elif type_ == PING:
            if stream:
                raise _ConnectionError(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise _ConnectionError(FRAME_SIZE_ERROR, "PING length")
            if not flags & ACK:
                self._send(_frame(PING, ACK, 0, payload))
        elif type_ == RST_STREAM:
            if len(payload) != 4:
                raise _ConnectionError(FRAME_SIZE_ERROR, "RST_STREAM length")
            if not stream or stream > self._last_stream:
                raise _ConnectionError(PROTOCOL_ERROR, f"RST_STREAM of idle stream {stream}")
            s = self._streams.pop(stream, None)
            if s is not None:
                s.cancel()
            self._check_idle()
        elif type_ == GOAWAY:
            # The peer starts no more streams; finish those open, then close.
            self._goaway(NO_ERROR, "")
            self._close_when_idle()
        elif type_ == PRIORITY:  # advice we need not take
            if not stream:
                raise _ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                raise _ConnectionError(FRAME_SIZE_ERROR, "PRIORITY length")
        elif type_ == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # Unknown frame types are ignored (RFC 9113 section 4.1).

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise _ConnectionError(PROTOCOL_ERROR, "bad padding")
        return payload[1:len(payload) - payload[0]]

    def _data(self, flags: int, stream: int, payload: bytes) -> None:
        if not stream:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        self._received += len(payload)
        data = self._unpad(flags, payload)
        s = self._streams.get(stream)
        if s is None or s.ended:
            if stream > self._last_stream:
                raise _ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
            if s is not None:
                self._reset(s, STREAM_CLOSED)
            return  # a stream we reset or answered: ignore what was in flight
        if s.error is None:
            if len(s.body) + len(data) > self._server.max_message + 5:
                s.error = GrpcError(RESOURCE_EXHAUSTED, "request message too large")
                s.body.clear()
            else:
                s.body += data
        if flags & END_STREAM:
            s.ended = True
            self._dispatch(s)

    def _header_frame(self, flags: int, stream: int, payload: bytes) -> None:
        if not stream or not stream % 2:
            raise _ConnectionError(PROTOCOL_ERROR, f"HEADERS on stream {stream}")
        block = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            block = block[5:]
        if flags & END_HEADERS:
            self._header_block(stream, flags, block)
        else:
            self._headers = (stream, flags, bytearray(block))

    def _decode(self, block: bytes) -> dict[bytes, bytes]:
        """A header block's fields. A client sends the same block for every call once its
        fields are in the dynamic table (Envoy does): while the table holds what it held,
        the same bytes mean the same fields, so they are decoded once (hpack costs ~10 us
        a field). A block that left the table as it found it is cached; one that changed
        it (an insertion, an eviction, a size update) empties the cache: its indexes may
        now mean other fields. The table is compared by its entries (a few dozen tuples,
        on a miss only), so any change is seen."""
        fields = self._header_cache.get(block)
        if fields is not None:
            return fields
        table = self._decoder.header_table
        before = _table_state(table)
        try:
            fields = dict(self._decoder.decode(block, raw=True))
        except HPACKError as e:
            raise _ConnectionError(COMPRESSION_ERROR, f"hpack: {e}") from None
        if _table_state(table) != before:
            self._header_cache.clear()
        else:
            if len(self._header_cache) >= 64:
                self._header_cache.clear()
            self._header_cache[block] = fields
        return fields

    def _header_block(self, stream: int, flags: int, block: bytes) -> None:
        fields = self._decode(block)
        s = self._streams.get(stream)
        if s is not None:  # trailers of a request
            if not flags & END_STREAM or s.ended:
                raise _ConnectionError(PROTOCOL_ERROR, "HEADERS in the middle of a stream")
            s.ended = True
            self._dispatch(s)
            return
        if stream <= self._last_stream:
            if stream in self._reset_streams:
                return  # sent before the client knew (decoded all the same, for HPACK)
            raise _ConnectionError(STREAM_CLOSED, f"HEADERS on closed stream {stream}")
        self._last_stream = stream
        s = _Stream(stream, self._peer_initial)
        if self._goaway_sent or len(self._streams) >= self._server.max_streams:
            self._rst(stream, REFUSED_STREAM)
            return
        self._streams[stream] = s
        self.idle.clear()
        path = fields.get(b":path", b"").decode("latin-1")
        if fields.get(b":method") != b"POST" or not fields.get(
                b"content-type", b"").startswith(b"application/grpc"):
            s.error = GrpcError(INTERNAL, "not a gRPC request")
        elif (handler := self._server.methods.get(path)) is None:
            s.error = GrpcError(UNIMPLEMENTED, f"unknown method {path[:100]}")
        else:
            s.handler = handler
        if flags & END_STREAM:
            s.ended = True
            self._dispatch(s)

    def _settings(self, flags: int, stream: int, payload: bytes) -> None:
        if stream:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with settings")
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS length")
        for i in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, i)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "initial window too large")
                delta, self._peer_initial = value - self._peer_initial, value
                for s in self._streams.values():
                    s.send_window += delta
                    if s.send_window > MAX_WINDOW:
                        raise _ConnectionError(FLOW_CONTROL_ERROR, "stream window overflow")
            elif key == S_ENABLE_PUSH:
                if value > 1:
                    raise _ConnectionError(PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1")
            elif key == S_MAX_FRAME_SIZE:
                if not MAX_FRAME <= value <= 16777215:
                    raise _ConnectionError(PROTOCOL_ERROR, "max frame size out of range")
                self._peer_max_frame = value
            # HEADER_TABLE_SIZE needs nothing: our headers never use the dynamic table.
        self._send(_frame(SETTINGS, ACK, 0))
        self._unblock()

    def _window_update(self, stream: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not stream:
            if not increment:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._peer_window += increment
            if self._peer_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window overflow")
        else:
            if stream > self._last_stream:
                raise _ConnectionError(PROTOCOL_ERROR, f"WINDOW_UPDATE of idle stream {stream}")
            s = self._streams.get(stream)
            if s is None:
                return  # a stream already answered
            if not increment or s.send_window + increment > MAX_WINDOW:
                self._reset(s, PROTOCOL_ERROR if not increment else FLOW_CONTROL_ERROR)
                return
            s.send_window += increment
        self._unblock()

    # -- calls

    def _dispatch(self, s: _Stream) -> None:
        """The request has ended: answer it (at once, or when its handler is done)."""
        if s.error is not None or s.handler is None:
            self._respond_error(s, s.error or GrpcError(INTERNAL, "no handler"))
            return
        body = bytes(s.body)
        s.body.clear()
        if len(body) < 5 or _U32.unpack_from(body, 1)[0] != len(body) - 5:
            self._respond_error(s, GrpcError(INTERNAL, "expected one gRPC message"))
            return
        if body[0]:
            self._respond_error(s, GrpcError(UNIMPLEMENTED, "compressed messages"))
            return
        try:
            out = s.handler(body[5:])
        except GrpcError as e:
            self._respond_error(s, e)
            return
        except Exception:
            log.exception("grpc handler failed")
            self._respond_error(s, GrpcError(INTERNAL, "internal error"))
            return
        if isinstance(out, bytes):
            self._respond(s, out)
        else:
            s.awaiting = out
            s.task = self._loop.create_task(self._await(s, out))

    async def _await(self, s: _Stream, out: Awaitable[bytes]) -> None:
        try:
            message = await out
        except GrpcError as e:
            self._respond_error(s, e)
        except asyncio.CancelledError:
            raise  # the stream was reset, or the connection lost
        except Exception:
            log.exception("grpc handler failed")
            self._respond_error(s, GrpcError(INTERNAL, "internal error"))
        else:
            self._respond(s, message)

    def _respond(self, s: _Stream, message: bytes) -> None:
        if self._streams.get(s.id) is not s:
            return  # reset meanwhile
        data = b"\x00" + _U32.pack(len(message)) + message
        self._send(_frame(HEADERS, END_HEADERS, s.id, _RESPONSE_HEADERS))
        s.blocked, s.trailers = data, _frame(HEADERS, END_HEADERS | END_STREAM, s.id,
                                             _TRAILERS_OK)
        self._push(s)

    def _respond_error(self, s: _Stream, e: GrpcError) -> None:
        if self._streams.get(s.id) is not s:
            return
        # Trailers-only: one HEADERS frame with the status.
        self._send(_frame(HEADERS, END_HEADERS | END_STREAM, s.id,
                          _RESPONSE_HEADERS + _trailers(e.code, e.message)))
        self._close_stream(s)

    def _push(self, s: _Stream) -> None:
        """Send what flow control allows of the stream's response; the rest waits."""
        while s.blocked:
            n = min(len(s.blocked), s.send_window, self._peer_window, self._peer_max_frame)
            if n <= 0:
                return
            chunk, s.blocked = s.blocked[:n], s.blocked[n:]
            s.send_window -= n
            self._peer_window -= n
            self._send(_frame(DATA, 0, s.id, chunk))
        self._send(s.trailers)
        self._close_stream(s)

    def _unblock(self) -> None:
        for s in [s for s in self._streams.values() if s.blocked]:
            self._push(s)

    def _close_stream(self, s: _Stream) -> None:
        self._streams.pop(s.id, None)
        if not s.ended:
            # We answered before the client finished sending: tell it to stop.
            self._rst(s.id, NO_ERROR)
        self._check_idle()

    def _reset(self, s: _Stream, code: int) -> None:
        self._streams.pop(s.id, None)
        s.cancel()
        self._rst(s.id, code)
        self._check_idle()

    def _rst(self, stream: int, code: int) -> None:
        """RST_STREAM; the stream's frames still on their way are to be ignored (RFC 9113
        section 5.1: DATA on any closed stream is; HEADERS only on those we reset)."""
        self._send(_frame(RST_STREAM, 0, stream, _U32.pack(code)))
        if len(self._reset_streams) >= 1024:
            del self._reset_streams[next(iter(self._reset_streams))]
        self._reset_streams[stream] = None

    def _check_idle(self) -> None:
        if not self._streams:
            self.idle.set()
            if self._goaway_sent:
                self._close_when_idle()

    # -- writing

    def _send(self, *frames: bytes) -> None:
        if self._closed:
            return
        self._out.extend(frames)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self._transport is not None and not self._closed:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def _goaway(self, code: int, why: str) -> None:
        if not self._goaway_sent or code != NO_ERROR:  # an error may follow a graceful one
            self._goaway_sent = True
            self._send(_frame(GOAWAY, 0, 0, _U32.pack(self._last_stream) + _U32.pack(code) +
                              why.encode()[:200]))

    def _fail(self, e: _ConnectionError) -> None:
        """A connection error: GOAWAY with its code, the calls open abandoned, and our side
        closed. Closing the socket with the peer's bytes unread would reset the connection
        and could lose the GOAWAY on the way: what the peer still sends is read (and
        dropped) until it closes too, or for LINGER seconds."""
        self._goaway(e.code, str(e))
        self._flush()
        self._buf = b""
        self._abandon()
        self._linger()

    def _linger(self) -> None:
        """Close our side only; read (and drop) until the peer closes too, or LINGER."""
        transport = self._transport
        if transport is None:
            return
        if transport.can_write_eof():
            transport.write_eof()
            self._loop.call_later(LINGER, transport.close)
        else:
            transport.close()

    def _close_when_idle(self) -> None:
        """After GOAWAY, once every stream is answered. Like a connection error's close: a
        frame the peer sent before it saw our GOAWAY (a stream we refuse, a WINDOW_UPDATE)
        left unread would reset the connection and could take our last answers with it."""
        if not self._streams and self._transport is not None and not self._closed:
            self._flush()
            self._abandon()
            self._linger()

    def shutdown(self) -> None:
        """Refuse new streams; close once those open are answered."""
        self._goaway(NO_ERROR, "")
        self._close_when_idle()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class UnaryServer:
    def __init__(self, methods: Mapping[str, Handler], max_message: int = 65536,
                 max_streams: int = 1024) -> None:
        self.methods = dict(methods)
        self.max_message = max_message
        self.max_streams = max_streams
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, address: ListenAddress) -> ListenAddress:
        """Listen; returns the address (with the port chosen, for port 0)."""
        loop = asyncio.get_running_loop()
        path = address.unix_path
        if path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # left by a crashed predecessor
            # Never connectable by others, not even between bind and chmod.
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
        port = self._server.sockets[0].getsockname()[1]
        return ListenAddress(host=address.host, port=port)

    async def stop(self, grace: float) -> None:
        """Stop listening, let open calls finish (within `grace` seconds), close."""
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
                c.abort()  # calls still open after the grace
        self._server = None
        await asyncio.sleep(0)  # let the closing transports write what they hold
