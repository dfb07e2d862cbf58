"""mesh/ratelimit/h2grpc.py, the rate limit service's HTTP/2 gRPC server, as a peer sees it:
the `h2` library's client state machine over a plain socket (it checks what the server
sends: framing, flow control, HPACK, stream states), and hand-made frames where a client
is to misbehave. Flow control windows both ways, SETTINGS, CONTINUATION, stream resets,
GOAWAY both ways, graceful stop, garbage, stalled and non-reading clients, and the header
cache's validation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from hpack import Decoder, Encoder

from mesh.ratelimit import h2grpc
from meshxds.address import ListenAddress
from tests.testbed import wait_until

ErrorCodes = h2.errors.ErrorCodes
SettingCodes = h2.settings.SettingCodes
GRPC_HEADERS = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"rls"),
                (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                (b"grpc-timeout", b"50m")]


def grpc_message(message: bytes, compressed: bool = False) -> bytes:
    return bytes((compressed,)) + struct.pack(">I", len(message)) + message


def frame(type_: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((type_, flags)) + \
        struct.pack(">I", stream) + payload


def read_frames(sock: socket.socket, until: Callable[[list[tuple[int, int, int, bytes]]], bool]
                ) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of what arrives until `until(frames)` or the end."""
    buf, frames = b"", list[tuple[int, int, int, bytes]]()
    while not until(frames):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            n = int.from_bytes(buf[:3], "big")
            frames.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big"), buf[9:9 + n]))
            buf = buf[9 + n:]
    return frames


class Server:
    """h2grpc.UnaryServer on an event loop in a thread, serving methods for the tests."""

    def __init__(self, listen: str = "127.0.0.1:0", **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.release = asyncio.Event()  # lets /t.T/Wait calls answer
        self.handled = 0  # handler calls
        self.cancelled = 0  # /t.T/Wait calls cancelled

        def count(handler: h2grpc.Handler) -> h2grpc.Handler:
            def counted(body: bytes) -> Any:
                self.handled += 1
                return handler(body)
            return counted

        async def wait(body: bytes) -> bytes:
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            return b"released " + body

        def fail(body: bytes) -> bytes:
            raise h2grpc.GrpcError(h2grpc.RESOURCE_EXHAUSTED, "100% used: réessayez\nlater")

        def crash(body: bytes) -> bytes:
            raise ValueError("a bug")

        async def unavailable(body: bytes) -> bytes:
            raise h2grpc.GrpcError(h2grpc.UNAVAILABLE, "redis down")

        methods: dict[str, h2grpc.Handler] = {
            "/t.T/Echo": lambda body: body,
            "/t.T/Triple": lambda body: body * 3,
            "/t.T/Sized": lambda body: b"x" * int(body),  # an answer of that many bytes
            "/t.T/Length": lambda body: str(len(body)).encode(),
            "/t.T/Wait": wait, "/t.T/Fail": fail, "/t.T/Crash": crash,
            "/t.T/Unavailable": unavailable}
        self.server = h2grpc.UnaryServer({k: count(v) for k, v in methods.items()}, **kwargs)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.address = self.run(self.server.start(ListenAddress.parse(listen)))
        self.stopped = False

    def run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, fn: Callable[[], Any]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def stop(self, grace: float) -> None:
        self.stopped = True
        self.run(self.server.stop(grace))

    def close(self) -> None:
        if not self.stopped:
            self.stop(0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


class Peer:
    """An HTTP/2 client: the h2 library's state machine over a blocking socket. Whatever the
    server sends goes through it, so a framing, flow control or HPACK mistake of the server
    fails the test there."""

    def __init__(self, server: Server, settings: dict[int, int] | None = None,
                 preface: bool = True) -> None:
        path = server.address.unix_path
        if path is not None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(str(path))
        else:
            self.sock = socket.create_connection(("127.0.0.1", server.address.port))
        self.sock.settimeout(3)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None))
        self.events: list[h2.events.Event] = []
        self.eof = False
        if preface:
            self.h2.initiate_connection()
            if settings:
                self.h2.update_settings(settings)
            self.flush()

    def close(self) -> None:
        self.sock.close()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, until: Callable[[list[h2.events.Event]], bool], timeout: float = 3
             ) -> list[h2.events.Event]:
        """Read and feed h2 until `until(events so far)`; answers what h2 answers by itself
        (SETTINGS and PING acknowledgements)."""
        deadline = time.monotonic() + timeout
        while not until(self.events):
            if self.eof:
                raise AssertionError(f"the server closed the connection: {self.events}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; events: {self.events}")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                self.eof = True
                continue
            self.events += self.h2.receive_data(data)
            self.flush()
        return self.events

    def quiet(self, seconds: float = 0.2) -> None:
        """Nothing arrives for a while."""
        self.sock.settimeout(seconds)
        with contextlib.suppress(TimeoutError):
            data = self.sock.recv(65536)
            raise AssertionError(f"expected nothing, got {data!r}")

    def start(self, path: str, message: bytes | None = b"", end: bool = True,
              headers: list[tuple[bytes, bytes]] | None = None) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [*GRPC_HEADERS[:2], (b":path", path.encode()),
                                   *(headers if headers is not None else GRPC_HEADERS[2:])],
                             end_stream=message is None and end)
        if message is not None:
            self.h2.send_data(sid, grpc_message(message), end_stream=end)
        self.flush()
        return sid

    def ended(self, sid: int) -> Callable[[list[h2.events.Event]], bool]:
        return lambda events: any(
            isinstance(e, h2.events.StreamEnded | h2.events.StreamReset) and
            e.stream_id == sid for e in events)

    def data(self, sid: int) -> bytes:
        return b"".join(e.data or b"" for e in self.events
                        if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)

    def answer(self, sid: int, timeout: float = 3) -> tuple[int, bytes | None, str]:
        """(grpc-status, the message if any, grpc-message) once the stream has ended."""
        self.read(self.ended(sid), timeout)
        fields: dict[bytes, bytes] = {}
        for e in self.events:
            if getattr(e, "stream_id", None) != sid:
                continue
            if isinstance(e, h2.events.StreamReset):
                raise AssertionError(f"stream {sid} reset: {e.error_code!r}")
            if isinstance(e, h2.events.ResponseReceived | h2.events.TrailersReceived):
                fields.update((bytes(k), bytes(v)) for k, v in e.headers or ())
        assert fields[b":status"] == b"200"
        assert fields[b"content-type"] == b"application/grpc"
        body = self.data(sid)
        message = None
        if body:
            assert body[0] == 0 and struct.unpack(">I", body[1:5])[0] == len(body) - 5
            message = body[5:]
        return (int(fields[b"grpc-status"]), message,
                fields.get(b"grpc-message", b"").decode())

    def call(self, path: str, message: bytes = b"") -> tuple[int, bytes | None, str]:
        return self.answer(self.start(path, message))

    def terminated(self, timeout: float = 3) -> h2.events.ConnectionTerminated:
        """The server's GOAWAY, after which the connection closes."""
        self.read(lambda es: any(isinstance(e, h2.events.ConnectionTerminated) for e in es),
                  timeout)
        self.closed(timeout)
        return next(e for e in self.events if isinstance(e, h2.events.ConnectionTerminated))

    def closed(self, timeout: float = 3) -> None:
        """The server closes the connection (reading what comes first)."""
        self.sock.settimeout(timeout)
        while self.sock.recv(65536):
            pass
        self.eof = True

    def reset(self, sid: int) -> h2.events.StreamReset:
        self.read(self.ended(sid))
        e = next(e for e in self.events
                 if isinstance(e, h2.events.StreamReset) and e.stream_id == sid)
        return e


@pytest.fixture
def peer(server: Server) -> Iterator[Peer]:
    p = Peer(server)
    yield p
    p.close()


# -- calls


def test_calls_and_their_answers(server: Server, peer: Peer) -> None:
    # The server's SETTINGS, then its connection window beyond the default.
    events = peer.read(lambda es: any(isinstance(e, h2.events.SettingsAcknowledged)
                                      for e in es))
    (changed,) = [e for e in events if isinstance(e, h2.events.RemoteSettingsChanged)]
    assert {k: v.new_value for k, v in changed.changed_settings.items()} == {
        SettingCodes.MAX_CONCURRENT_STREAMS: 1024,
        SettingCodes.INITIAL_WINDOW_SIZE: 65536 + 5,
        SettingCodes.MAX_HEADER_LIST_SIZE: 16384}
    assert peer.h2.outbound_flow_control_window == 1 << 24
    assert peer.call("/t.T/Echo", b"hello") == (0, b"hello", "")
    # Header blocks as Envoy's repeat them (indexed): decoded, or found in the cache.
    assert [peer.call("/t.T/Triple", b"%d" % i) for i in range(5)] == [
        (0, b"%d" % i * 3, "") for i in range(5)]
    # Many at once.
    sids = [peer.start("/t.T/Echo", b"%d" % i) for i in range(100)]
    assert [peer.answer(s)[1] for s in sids] == [b"%d" % i for i in range(100)]
    # An empty message, and a PING answered.
    assert peer.call("/t.T/Echo", b"") == (0, b"", "")
    peer.h2.ping(b"12345678")
    peer.flush()
    peer.read(lambda es: any(isinstance(e, h2.events.PingAckReceived) and
                             e.ping_data == b"12345678" for e in es))


def test_grpc_errors(peer: Peer) -> None:
    # Trailers-only answers, the message percent-encoded as gRPC wants it.
    assert peer.call("/t.T/Fail") == (h2grpc.RESOURCE_EXHAUSTED, None,
                                      "100%25 used: r%C3%A9essayez%0Alater")
    assert peer.call("/t.T/Crash") == (h2grpc.INTERNAL, None, "internal error")
    assert peer.call("/t.T/Unavailable") == (h2grpc.UNAVAILABLE, None, "redis down")
    assert peer.call("/t.T/Nothing")[:2] == (h2grpc.UNIMPLEMENTED, None)
    # What is not one uncompressed gRPC message.
    sid = peer.start("/t.T/Echo", None)
    assert peer.answer(sid) == (h2grpc.INTERNAL, None, "expected one gRPC message")
    for body in (b"\x00\x00\x00\x00\x05abc", b"\x00\x00\x00\x00\x01ab",
                 grpc_message(b"a") + grpc_message(b"b"), b"\x00\x00"):
        sid = peer.start("/t.T/Echo", None, end=False)
        peer.h2.send_data(sid, body, end_stream=True)
        peer.flush()
        assert peer.answer(sid) == (h2grpc.INTERNAL, None, "expected one gRPC message")
    sid = peer.start("/t.T/Echo", None, end=False)
    peer.h2.send_data(sid, grpc_message(b"x", compressed=True), end_stream=True)
    peer.flush()
    assert peer.answer(sid)[0] == h2grpc.UNIMPLEMENTED
    # Not gRPC: another method, another content type.
    for headers in ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/t.T/Echo"),
                     (b":authority", b"x")],
                    [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/t.T/Echo"),
                     (b":authority", b"x"), (b"content-type", b"application/json")]):
        sid = peer.h2.get_next_available_stream_id()
        peer.h2.send_headers(sid, headers, end_stream=True)
        peer.flush()
        assert peer.answer(sid) == (h2grpc.INTERNAL, None, "not a gRPC request")
    # A message in several DATA frames, some padded, and request trailers.
    sid = peer.start("/t.T/Echo", None, end=False)
    body = grpc_message(b"abcdefgh")
    peer.h2.send_data(sid, body[:3], pad_length=10)
    peer.h2.send_data(sid, body[3:7])
    peer.h2.send_data(sid, body[7:], pad_length=0)
    peer.h2.send_headers(sid, [(b"x-trailer", b"1")], end_stream=True)
    peer.flush()
    assert peer.answer(sid) == (0, b"abcdefgh", "")
    assert peer.call("/t.T/Echo", b"still fine") == (0, b"still fine", "")


# -- flow control


def test_the_clients_stream_windows(server: Server) -> None:
    peer = Peer(server, {SettingCodes.INITIAL_WINDOW_SIZE: 10})
    try:
        sid = peer.start("/t.T/Triple", b"0123456789")  # answer: 5 + 30 bytes
        peer.read(lambda es: len(peer.data(sid)) >= 10)
        peer.quiet()
        assert len(peer.data(sid)) == 10
        # A smaller initial window applies to open streams too: now -5 ...
        peer.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 5})
        peer.flush()
        peer.read(lambda es: any(isinstance(e, h2.events.SettingsAcknowledged) for e in es[1:]))
        peer.h2.increment_flow_control_window(10, sid)  # ... then 5
        peer.flush()
        peer.read(lambda es: len(peer.data(sid)) >= 15)
        peer.quiet()
        assert len(peer.data(sid)) == 15
        # A larger one lets the rest go, and the trailers after it.
        peer.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1000})
        peer.flush()
        assert peer.answer(sid) == (0, b"0123456789" * 3, "")
        chunks = [len(e.data or b"") for e in peer.events
                  if isinstance(e, h2.events.DataReceived)]
        assert chunks == [10, 5, 20]
    finally:
        peer.close()


def test_the_clients_connection_window_and_frame_size(server: Server) -> None:
    # Streams may take all they want; the connection's 65,535 bytes bind.
    peer = Peer(server, {SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    try:
        sids = [peer.start("/t.T/Sized", b"40000") for _ in range(2)]
        peer.read(lambda es: sum(len(peer.data(s)) for s in sids) >= 65535)
        peer.quiet()
        assert sum(len(peer.data(s)) for s in sids) == 65535
        assert all(len(e.data or b"") <= 16384 for e in peer.events
                   if isinstance(e, h2.events.DataReceived))
        peer.h2.increment_flow_control_window(2 * 40005 - 65535)
        peer.flush()
        assert [peer.answer(s) for s in sids] == [(0, b"x" * 40000, "")] * 2
        # Frames as large as the client allows.
        acks = sum(isinstance(e, h2.events.SettingsAcknowledged) for e in peer.events)
        peer.h2.update_settings({SettingCodes.MAX_FRAME_SIZE: 65536})
        peer.h2.increment_flow_control_window(100000)
        peer.flush()
        peer.read(lambda es: sum(isinstance(e, h2.events.SettingsAcknowledged)
                                 for e in es) > acks)
        sid = peer.start("/t.T/Sized", b"40000")
        assert peer.answer(sid)[1] == b"x" * 40000
        assert [len(e.data or b"") for e in peer.events
                if isinstance(e, h2.events.DataReceived) and e.stream_id == sid] == [40005]
    finally:
        peer.close()


def window_updated(after: int) -> Callable[[list[h2.events.Event]], bool]:
    return lambda events: any(isinstance(e, h2.events.WindowUpdated) for e in events[after:])


def test_the_servers_windows_grow_as_it_reads() -> None:
    # 20 messages of 1 MiB on one connection: past the server's first connection window
    # (16 MiB); each stream's window is one message.
    server = Server(max_message=1 << 20)
    peer = Peer(server)
    try:
        peer.read(lambda es: any(isinstance(e, h2.events.RemoteSettingsChanged)
                                 for e in es))
        message = grpc_message(b"m" * (1 << 20))
        for _ in range(20):
            sid = peer.start("/t.T/Length", None, end=False)
            assert peer.h2.local_flow_control_window(sid) == len(message)
            sent = 0
            while sent < len(message):
                n = min(peer.h2.local_flow_control_window(sid),
                        peer.h2.max_outbound_frame_size, len(message) - sent)
                if n == 0:
                    peer.read(window_updated(len(peer.events)))
                    continue
                peer.h2.send_data(sid, message[sent:sent + n],
                                  end_stream=sent + n == len(message))
                peer.flush()
                sent += n
            assert peer.answer(sid) == (0, str(1 << 20).encode(), "")
        assert sum(1 for e in peer.events if isinstance(e, h2.events.WindowUpdated) and
                   e.stream_id == 0) >= 2
    finally:
        peer.close()
        server.close()


# -- header blocks


def test_continuation_frames(peer: Peer) -> None:
    # A header block in frames of 100 bytes: HEADERS and many CONTINUATIONs.
    headers = [*GRPC_HEADERS[2:], *[(b"x-h%d" % i, b"v" * 200) for i in range(20)]]
    peer.h2.max_outbound_frame_size = 100
    for _ in range(2):  # first inserted in the table, then indexed
        sid = peer.start("/t.T/Echo", b"continued", headers=headers)
        assert peer.answer(sid) == (0, b"continued", "")
    # With a priority (h2 puts one in frames of the peer's size only).
    peer.h2.max_outbound_frame_size = 16384
    sid = peer.h2.get_next_available_stream_id()
    peer.h2.send_headers(sid, [*GRPC_HEADERS[:2], (b":path", b"/t.T/Echo"), *headers],
                         priority_weight=200, priority_depends_on=0)
    peer.h2.send_data(sid, grpc_message(b"prioritised"), end_stream=True)
    peer.flush()
    assert peer.answer(sid) == (0, b"prioritised", "")


def test_padded_header_blocks(server: Server) -> None:
    # h2 pads no HEADERS: by hand, with a priority, split in three.
    with socket.create_connection(("127.0.0.1", server.address.port), timeout=3) as sock:
        block = Encoder().encode([*GRPC_HEADERS[:2], (b":path", b"/t.T/Echo"),
                                  *GRPC_HEADERS[2:]])
        payload = b"\x04" + b"\x00\x00\x00\x00\x10" + block[:5] + b"\x00" * 4
        sock.sendall(h2grpc.PREFACE + frame(4, 0, 0) +
                     frame(1, 0x8 | 0x20, 1, payload) + frame(9, 0, 1, block[5:7]) +
                     frame(9, 0x4, 1, block[7:]) +
                     frame(0, 0x1 | 0x8, 1, b"\x03" + grpc_message(b"by hand") + b"pad"))
        frames = read_frames(sock, lambda fs: any(f[0] == 1 and f[1] & 0x1 for f in fs))
    decoder = Decoder()
    fields = [dict(decoder.decode(f[3], raw=True)) for f in frames if f[0] == 1]
    assert fields == [{b":status": b"200", b"content-type": b"application/grpc"},
                      {b"grpc-status": b"0"}]
    assert b"".join(f[3] for f in frames if f[0] == 0) == grpc_message(b"by hand")


@pytest.mark.parametrize("frames", [
    # a PING in the middle of a header block
    lambda block: frame(1, 0, 1, block[:3]) + frame(6, 0, 0, b"12345678"),
    # a CONTINUATION of another stream
    lambda block: frame(1, 0, 1, block[:3]) + frame(9, 0x4, 3, block[3:]),
    # a CONTINUATION without HEADERS
    lambda block: frame(9, 0x4, 1, block),
    # a header block that never ends
    lambda block: frame(1, 0, 1, block) + frame(9, 0, 1, b"\x00" * 16384) * 3,
], ids=["interleaved", "other-stream", "no-headers", "endless"])
def test_broken_header_blocks_end_the_connection(peer: Peer,
                                                 frames: Callable[[bytes], bytes]) -> None:
    block = peer.h2.encoder.encode([*GRPC_HEADERS[:2], (b":path", b"/t.T/Echo"),
                                    *GRPC_HEADERS[2:]])
    peer.raw(frames(block))
    assert peer.terminated().error_code == ErrorCodes.PROTOCOL_ERROR


def test_header_list_limits(peer: Peer) -> None:
    # More than the 16 KiB the server announced: the block cannot be decoded in full, so
    # HPACK's state is lost with it.
    big = [*GRPC_HEADERS[2:], *[(b"x-h%d" % i, b"v" * 1000) for i in range(20)]]
    peer.start("/t.T/Echo", b"", headers=big)
    assert peer.terminated().error_code == ErrorCodes.COMPRESSION_ERROR


# -- SETTINGS


def test_settings(peer: Peer) -> None:
    # Acknowledged, unknown ones ignored; an ACK from the client needs nothing.
    peer.raw(frame(4, 0, 0, struct.pack(">HI", 0x99, 7) + struct.pack(">HI", 1, 0)) +
             frame(4, 1, 0))
    peer.read(lambda es: sum(isinstance(e, h2.events.SettingsAcknowledged) for e in es) == 2)
    # HEADER_TABLE_SIZE 0 (above): the server's header blocks use no dynamic table.
    assert peer.call("/t.T/Echo", b"x") == (0, b"x", "")


@pytest.mark.parametrize(("payload", "stream", "code"), [
    (struct.pack(">HI", 4, 2**31), 0, ErrorCodes.FLOW_CONTROL_ERROR),
    (struct.pack(">HI", 5, 16383), 0, ErrorCodes.PROTOCOL_ERROR),
    (struct.pack(">HI", 5, 2**24), 0, ErrorCodes.PROTOCOL_ERROR),
    (struct.pack(">HI", 2, 2), 0, ErrorCodes.PROTOCOL_ERROR),
    (b"\x00\x04\x00\x00\x00", 0, ErrorCodes.FRAME_SIZE_ERROR),
    (b"", 1, ErrorCodes.PROTOCOL_ERROR),
], ids=["window", "frame-small", "frame-large", "enable-push", "length", "stream"])
def test_bad_settings_end_the_connection(peer: Peer, payload: bytes, stream: int,
                                         code: ErrorCodes) -> None:
    peer.raw(frame(4, 0, stream, payload))
    assert peer.terminated().error_code == code


def test_a_window_beyond_two_to_the_31_ends_the_connection(server: Server) -> None:
    peer = Peer(server, {SettingCodes.INITIAL_WINDOW_SIZE: 0})
    try:
        sid = peer.start("/t.T/Wait", b"")
        peer.raw(frame(8, 0, sid, struct.pack(">I", 2**31 - 1)))
        # The stream's window is 2**31 - 1: a larger initial window would overflow it.
        peer.raw(frame(4, 0, 0, struct.pack(">HI", 4, 10)))
        assert peer.terminated().error_code == ErrorCodes.FLOW_CONTROL_ERROR
    finally:
        peer.close()


# -- streams reset, refused


def test_a_reset_stream_cancels_its_call(server: Server, peer: Peer) -> None:
    waiting = peer.start("/t.T/Wait", b"a")
    other = peer.start("/t.T/Wait", b"b")
    time.sleep(0.1)
    peer.h2.reset_stream(waiting, ErrorCodes.CANCEL)
    peer.flush()
    time.sleep(0.1)
    assert server.cancelled == 1
    # What was in flight for it is ignored, not a connection error.
    peer.raw(frame(0, 0, waiting, grpc_message(b"late")) + frame(8, 0, waiting, b"\0\0\0\1"))
    server.call_soon(server.release.set)
    assert peer.answer(other) == (0, b"released b", "")
    assert not any(getattr(e, "stream_id", None) == waiting for e in peer.events)
    assert peer.call("/t.T/Echo", b"on") == (0, b"on", "")


def test_streams_beyond_the_limit_are_refused() -> None:
    server = Server(max_streams=2)
    # Before the server's SETTINGS reach it, a client may open more.
    peer = Peer(server)
    try:
        sids = [peer.start("/t.T/Wait", b"%d" % i, end=i < 2) for i in range(3)]
        assert peer.reset(sids[2]).error_code == ErrorCodes.REFUSED_STREAM
        # The rest of the refused request, sent before the client knew: ignored.
        trailers = peer.h2.encoder.encode([(b"x-trailer", b"1")])
        peer.raw(frame(0, 0, sids[2], grpc_message(b"2")) +
                 frame(1, 0x4 | 0x1, sids[2], trailers))
        server.call_soon(server.release.set)
        assert [peer.answer(s)[1] for s in sids[:2]] == [b"released 0", b"released 1"]
        assert peer.call("/t.T/Echo", b"again") == (0, b"again", "")
    finally:
        peer.close()
        server.close()


@pytest.mark.parametrize(("frames", "code"), [
    (lambda: frame(3, 0, 0, b"\0\0\0\0"), ErrorCodes.PROTOCOL_ERROR),
    (lambda: frame(3, 0, 1, b"\0\0\0"), ErrorCodes.FRAME_SIZE_ERROR),
    (lambda: frame(3, 0, 99, b"\0\0\0\0"), ErrorCodes.PROTOCOL_ERROR),
    (lambda: frame(8, 0, 0, b"\0\0\0\0"), ErrorCodes.PROTOCOL_ERROR),
    (lambda: frame(8, 0, 0, b"\0\0\0"), ErrorCodes.FRAME_SIZE_ERROR),
    (lambda: frame(8, 0, 0, struct.pack(">I", 2**31 - 1)), ErrorCodes.FLOW_CONTROL_ERROR),
    (lambda: frame(6, 0, 0, b"1234567"), ErrorCodes.FRAME_SIZE_ERROR),
    (lambda: frame(6, 0, 1, b"12345678"), ErrorCodes.PROTOCOL_ERROR),
    (lambda: frame(2, 0, 0, b"\0\0\0\0\0"), ErrorCodes.PROTOCOL_ERROR),
    (lambda: frame(0, 0, 0, b"x"), ErrorCodes.PROTOCOL_ERROR),
    (lambda: frame(0, 0, 7, b"x"), ErrorCodes.PROTOCOL_ERROR),
    (lambda: frame(0, 0x8, 1, b"\x05abc"), ErrorCodes.PROTOCOL_ERROR),
    (lambda: frame(1, 0x4, 2, b"\x82"), ErrorCodes.PROTOCOL_ERROR),
    (lambda: frame(5, 0x4, 1, b"\0\0\0\2\x82"), ErrorCodes.PROTOCOL_ERROR),
    (lambda: frame(1, 0x4, 1, b"\xff\xff\xff\xff\x0f"), ErrorCodes.COMPRESSION_ERROR),
    (lambda: frame(0, 0, 1, b"x" * 16385), ErrorCodes.FRAME_SIZE_ERROR),
], ids=["rst-0", "rst-length", "rst-idle", "window-0", "window-length", "window-overflow",
        "ping-length", "ping-stream", "priority-0", "data-0", "data-idle", "bad-padding",
        "even-stream", "push-promise", "hpack", "frame-too-large"])
def test_frames_a_client_must_not_send_end_the_connection(
        peer: Peer, frames: Callable[[], bytes], code: ErrorCodes) -> None:
    peer.read(lambda es: any(isinstance(e, h2.events.SettingsAcknowledged) for e in es))
    peer.raw(frames())
    assert peer.terminated().error_code == code


def test_headers_on_a_closed_stream_end_the_connection(peer: Peer) -> None:
    sid = peer.start("/t.T/Echo", b"1")
    assert peer.answer(sid) == (0, b"1", "")
    peer.raw(frame(1, 0x4 | 0x1, sid, peer.h2.encoder.encode([(b"x-trailer", b"1")])))
    assert peer.terminated().error_code == ErrorCodes.STREAM_CLOSED


def test_frames_to_ignore(peer: Peer) -> None:
    # An unknown type, PRIORITY of a stream not yet open, a PING's ACK, a WINDOW_UPDATE
    # for a stream already answered (the client may not know yet).
    sid = peer.start("/t.T/Echo", b"1")
    assert peer.answer(sid) == (0, b"1", "")
    peer.raw(frame(0xAA, 0xFF, 0, b"whatever") + frame(2, 0, 3, b"\0\0\0\0\x10") +
             frame(6, 1, 0, b"87654321") + frame(8, 0, sid, b"\0\0\0\1"))
    assert peer.call("/t.T/Echo", b"2") == (0, b"2", "")


# -- GOAWAY and stopping


def test_a_graceful_stop(server: Server, peer: Peer) -> None:
    waiting = peer.start("/t.T/Wait", b"in flight")
    time.sleep(0.1)
    stop = threading.Thread(target=server.stop, args=(5,))
    stop.start()
    goaway = peer.read(lambda es: any(isinstance(e, h2.events.ConnectionTerminated)
                                      for e in es))[-1]
    assert isinstance(goaway, h2.events.ConnectionTerminated)
    assert (goaway.error_code, goaway.last_stream_id) == (ErrorCodes.NO_ERROR, waiting)
    # A stream the client started before it saw the GOAWAY is refused (h2 would not
    # start one now).
    block = peer.h2.encoder.encode([*GRPC_HEADERS[:2], (b":path", b"/t.T/Echo"),
                                    *GRPC_HEADERS[2:]])
    peer.raw(frame(1, 0x4 | 0x1, waiting + 2, block))
    refused = (3, 0, waiting + 2, struct.pack(">I", ErrorCodes.REFUSED_STREAM))
    peer.sock.settimeout(3)
    frames = read_frames(peer.sock, lambda fs: refused in fs)
    # No new connections.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.address.port), timeout=1).close()
    # The call in flight is answered, then the connection closes (our side first: the server
    # half-closes, so nothing is reset), then stop() returns.
    server.call_soon(server.release.set)
    frames += read_frames(peer.sock, lambda fs: False)
    stop.join(5)
    assert not stop.is_alive()
    ends = [f for f in frames if f[0] == 1 and f[1] & 0x1 and f[2] == waiting]
    assert len(ends) == 1  # the trailers
    assert b"released in flight" in b"".join(f[3] for f in frames if f[0] == 0)


def test_a_stop_waits_no_longer_than_its_grace(server: Server, peer: Peer) -> None:
    peer.start("/t.T/Wait", b"never answered")
    idle = Peer(server)  # no stream open: closed at once
    time.sleep(0.1)
    started = time.monotonic()
    server.stop(0.5)
    assert 0.4 < time.monotonic() - started < 2
    wait_until(lambda: server.cancelled == 1, timeout=2, what="the call cancelled")
    idle.closed()
    peer.closed()
    idle.close()


def test_the_clients_goaway(server: Server, peer: Peer) -> None:
    waiting = peer.start("/t.T/Wait", b"x")
    time.sleep(0.1)
    peer.h2.close_connection(last_stream_id=0)
    peer.flush()
    # Open calls are still answered (read by hand: h2 takes no more frames after its
    # GOAWAY); the server says GOAWAY too, and closes.
    time.sleep(0.1)
    server.call_soon(server.release.set)
    frames = read_frames(peer.sock, lambda fs: False)
    assert b"released x" in b"".join(f[3] for f in frames if f[0] == 0 and f[2] == waiting)
    assert [f[0] for f in frames if f[2] == waiting] == [1, 0, 1]
    (goaway,) = [f for f in frames if f[0] == 7]
    assert goaway[3][:8] == struct.pack(">II", waiting, ErrorCodes.NO_ERROR)


# -- garbage and stalling


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"GET", b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n"],
    ids=["http1", "short", "wrong-version"])
def test_not_http2(server: Server, data: bytes) -> None:
    peer = Peer(server, preface=False)
    try:
        peer.raw(data)
        assert peer.terminated().error_code == ErrorCodes.PROTOCOL_ERROR
    finally:
        peer.close()


def test_random_frames_leave_the_server_serving(server: Server,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Frames of random types, flags, streams and payloads, after a valid call or not, and
    valid calls with bytes flipped: whatever the server makes of them, it raises nothing,
    closes when the client does, and serves the next client."""
    caplog.set_level(logging.ERROR)
    rng = random.Random(1)
    for i in range(300):
        client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
        client.initiate_connection()
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, [*GRPC_HEADERS[:2], (b":path", b"/t.T/Echo"),
                                  *GRPC_HEADERS[2:]])
        client.send_data(sid, grpc_message(b"x" * rng.randrange(20)), end_stream=True)
        valid = client.data_to_send()
        if i % 3 == 0:  # flipped bytes
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(h2grpc.PREFACE), len(data))] ^= 1 << rng.randrange(8)
            payload = bytes(data)
        else:
            junk = b"".join(frame(rng.choice((*range(10), 0xAA)), rng.randrange(256),
                                  rng.choice((0, 1, 3, rng.randrange(2**31))),
                                  rng.randbytes(rng.randrange(40)))
                            for _ in range(rng.randrange(1, 6)))
            payload = (valid if i % 3 == 1 else valid[:len(h2grpc.PREFACE)]) + junk
        with socket.create_connection(("127.0.0.1", server.address.port), timeout=2) as sock:
            with contextlib.suppress(OSError):  # closed by the server meanwhile
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(65536):
                    pass
    good = Peer(server)
    try:
        assert good.call("/t.T/Echo", b"fine") == (0, b"fine", "")
    finally:
        good.close()
    wait_until(lambda: not server.server.connections, timeout=2, what="every connection closed")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_stalled_client_holds_up_nobody(server: Server) -> None:
    stalled = Peer(server, preface=False)
    stalled.raw(h2grpc.PREFACE + frame(4, 0, 0)[:5])  # half a frame header, then nothing
    half = Peer(server)
    half.start("/t.T/Echo", b"never ends", end=False)  # a request that never ends
    other = Peer(server)
    try:
        assert other.call("/t.T/Echo", b"served") == (0, b"served", "")
        started = time.monotonic()
        server.stop(0.5)
        assert time.monotonic() - started < 2
        for p in (stalled, half):
            p.closed()
    finally:
        for p in (stalled, half, other):
            p.close()


def test_a_client_that_does_not_read_is_not_read_either(tmp_path: Path) -> None:
    """Answers the client does not take pile up only until the transport's buffer is full:
    then the server stops reading that client, whose requests wait in the socket (else it
    would answer as fast as the client asks, buffering every answer); once the client
    reads, so does the server."""
    server = Server(f"unix://{tmp_path}/h2.sock")
    try:
        assert stat.S_IMODE((tmp_path / "h2.sock").stat().st_mode) == 0o600
        # Windows that never bind: only the socket holds the answers back.
        peer = Peer(server, {SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        peer.h2.increment_flow_control_window(2**31 - 1 - 65535)
        peer.flush()
        encoder = Encoder()
        sent = 0
        peer.sock.setblocking(False)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            # 1 kB answers to ~40-byte requests, 20 a write.
            batch = b"".join(
                frame(1, 0x4, sid, encoder.encode([*GRPC_HEADERS[:2], (b":path", b"/t.T/Sized"),
                                                   *GRPC_HEADERS[2:]])) +
                frame(0, 0x1, sid, grpc_message(b"1000"))
                for sid in range(1 + 2 * sent, 1 + 2 * (sent + 20), 2))
            try:
                n = peer.sock.send(batch)
            except BlockingIOError:
                time.sleep(0.2)  # the server may still be reading
                try:
                    n = peer.sock.send(batch)
                except BlockingIOError:
                    break
            assert n == len(batch)  # (a unix socket takes all or nothing)
            sent += 20
        else:
            raise AssertionError(f"the server read {sent} requests without end")
        handled = server.handled
        assert handled < sent
        time.sleep(0.3)
        assert server.handled == handled  # requests wait unread
        other = Peer(server)
        assert other.call("/t.T/Echo", b"meanwhile") == (0, b"meanwhile", "")
        other.close()
        peer.sock.setblocking(True)
        peer.sock.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            while peer.sock.recv(1 << 20):
                pass
        assert server.handled > handled
        peer.close()
    finally:
        server.close()


# -- the header cache


def test_the_header_cache_follows_the_hpack_table() -> None:
    async def main() -> None:
        conn = h2grpc._Connection(h2grpc.UnaryServer({}))
        encoder = Encoder()
        first = encoder.encode([("x-a", "1")])  # inserts x-a: 1 in the dynamic table
        again = encoder.encode([("x-a", "1")])  # refers to it
        assert first != again
        for _ in range(2):
            assert conn._decode(first) == {b"x-a": b"1"}
            assert conn._decode(again) == {b"x-a": b"1"}
        # A new insertion moves every index: the same bytes now mean another field.
        assert conn._decode(encoder.encode([("x-a", "2")])) == {b"x-a": b"2"}
        assert conn._decode(again) == {b"x-a": b"2"}
        # A literal never indexed changes nothing and may be cached as it is.
        literal = b"\x00\x03x-b\x013"
        assert conn._decode(literal) == conn._decode(literal) == {b"x-b": b"3"}
        assert conn._decode(again) == {b"x-a": b"2"}
        # The table emptied (size 0) and filled again to as many entries at the same size
        # limit, in one block: the newest entry may well sit where the old one did in
        # memory (an id() would not tell them apart), but holds another field.
        conn = h2grpc._Connection(h2grpc.UnaryServer({}))
        refill = b"\x20\x3f\xe1\x1f\x40\x03x-a\x01"  # sizes 0 and 4096, insert x-a: ...
        for value in b"123":
            assert conn._decode(refill + bytes((value,))) == {b"x-a": bytes((value,))}
            assert conn._decode(b"\xbe") == conn._decode(b"\xbe") == {b"x-a": bytes((value,))}
        # A block that leaves the table as it was (the same entry evicted and inserted
        # again) changes no index: the cache stays.
        assert conn._decode(refill + b"3") == {b"x-a": b"3"}
        assert b"\xbe" in conn._header_cache

    asyncio.run(main())
