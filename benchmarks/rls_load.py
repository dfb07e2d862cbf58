"""The rate limit service (mesh/ratelimit) under load, through real gRPC and a real Redis.

The service runs as `python -m mesh.ratelimit` pinned to one core; the load comes from
another process pinned to the other core (with redis-server beside it, so the service's
core does nothing else). Three runs:
- throughput: closed loop, 32 calls in flight on 2 channels, limits high enough never to
  deny, a counter per client address over 1,000 addresses: `rls_decisions_per_s`, and the
  service's CPU per decision (`rls_cpu_us_per_decision`: what one core could do at most is
  1e6 / that);
- latency: open loop at a fixed 5,000 decisions/s (as Envoy calls: requests arrive when
  they arrive), each call timed from when it was due: `rls_p50_ms`, `rls_p99_ms`;
- exactness: 64 calls in flight on 4 channels against one limit of 100: `rls_overadmitted`
  = admitted - 100 (expected 0).

    python benchmarks/rls_load.py [--quick]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LATENCY_RATE = 5000


def _pin(core: int) -> Callable[[], None]:
    return lambda: os.sched_setaffinity(0, {core})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def _redis_up(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")


def start_redis(port: int, work: str, preexec: Callable[[], None] | None = None
                ) -> subprocess.Popen[bytes]:
    """A throwaway redis-server on a loopback port (no persistence), once it answers."""
    redis = subprocess.Popen(
        ["/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", work], stdout=subprocess.DEVNULL, preexec_fn=preexec)
    try:
        wait(lambda: _redis_up(port), "redis-server")
    except BaseException:
        redis.kill()
        redis.wait()
        raise
    return redis


def run(quick: bool) -> dict[str, float]:
    cores = sorted(os.sched_getaffinity(0))
    rls_core, load_core = cores[0], cores[-1]  # one core: both share it (said in the figures)
    seconds = 4.0 if quick else 10.0
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mesh-rls-bench-") as work:
        sock = Path(work) / "rls.sock"
        redis = start_redis(port, work, _pin(load_core))
        rls: subprocess.Popen[bytes] | None = None
        try:
            rls = subprocess.Popen(
                [sys.executable, "-m", "mesh.ratelimit", "--listen", f"unix://{sock}",
                 "--redis", f"redis://127.0.0.1:{port}", "--log-level", "warning"],
                cwd=ROOT, preexec_fn=_pin(rls_core))
            wait(sock.exists, "the rate limit service's socket")

            def generate(mode: str, duration: float) -> dict[str, float]:
                out = subprocess.run(
                    [sys.executable, __file__, "--generate", mode, "--target", f"unix://{sock}",
                     "--seconds", str(duration)], cwd=ROOT, capture_output=True, text=True,
                    check=True, preexec_fn=_pin(load_core))
                return dict(json.loads(out.stdout.strip().splitlines()[-1]))

            generate("warmup", 1.0)
            cpu = _cpu_seconds(rls.pid)
            figures = generate("throughput", seconds)
            figures["rls_cpu_us_per_decision"] = round(
                (_cpu_seconds(rls.pid) - cpu) * 1e6 / figures.pop("_calls"), 1)
            figures.update(generate("latency", seconds * 0.75))
            figures.update(generate("grpcio", seconds * 0.5))
            figures.update(generate("exactness", 0))
            figures["rls_cores"] = float(len({rls_core, load_core}))
            return figures
        finally:
            for p in (rls, redis):
                if p is not None:
                    p.terminate()
                    try:
                        p.wait(5)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()


# -- the load generator (run in its own process by `run`)


class _Client(asyncio.Protocol):
    """A minimal HTTP/2 gRPC client for unary calls: grpcio's asyncio client costs about
    100 us of CPU a call, more than the service's decision, and its collector pauses add
    milliseconds; this one lets one core drive the service to its limit and time it.
    Speaks what h2grpc serves: HPACK both ways, flow control (windows large enough never to
    bind, checked)."""

    def __init__(self, path: str) -> None:
        from hpack import Decoder

        self._decoder = Decoder()
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._next = 1
        self._calls: dict[int, tuple[asyncio.Future[tuple[int, bytes]], bytearray]] = {}
        self._status: dict[int, int] = {}
        self._send_window = 65535
        self._received = 0
        self.ready = asyncio.get_running_loop().create_future()

        from hpack import Encoder

        # What Envoy's gRPC client sends, HPACK-indexed as it does: the first block adds the
        # fields to the dynamic table, every later one refers to them (the same bytes).
        fields = [(":method", "POST"), (":scheme", "http"), (":path", path),
                  (":authority", "mesh_ratelimit"), ("content-type", "application/grpc"),
                  ("te", "trailers"), ("grpc-timeout", "50m"),
                  ("x-envoy-expected-rq-timeout-ms", "50"), ("x-envoy-internal", "true")]
        encoder = Encoder()
        self._first_headers = encoder.encode(fields)
        self._headers = encoder.encode(fields)

    @staticmethod
    def _frame(type_: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
        return len(payload).to_bytes(3, "big") + bytes((type_, flags)) + \
            stream.to_bytes(4, "big") + payload

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" +
                        self._frame(4, 0, 0, (4).to_bytes(2, "big") +
                                    (2**31 - 1).to_bytes(4, "big")) +
                        self._frame(8, 0, 0, (2**30).to_bytes(4, "big")))

    def call(self, message: bytes) -> asyncio.Future[tuple[int, bytes]]:
        """(grpc-status, response message)."""
        assert self._transport is not None
        sid, self._next = self._next, self._next + 2
        data = b"\x00" + len(message).to_bytes(4, "big") + message
        self._send_window -= len(data)
        assert self._send_window > 0, "the service's connection window ran out"
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._calls[sid] = (fut, bytearray())
        block = self._first_headers if sid == 1 else self._headers
        self._transport.write(self._frame(1, 4, sid, block) +
                              self._frame(0, 1, sid, data))
        return fut

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        buf = self._buf + data
        pos, out = 0, []
        while len(buf) - pos >= 9:
            n = int.from_bytes(buf[pos:pos + 3], "big")
            if len(buf) - pos - 9 < n:
                break
            type_, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            payload = buf[pos + 9:pos + 9 + n]
            pos += 9 + n
            if type_ == 0:  # DATA
                self._received += n
                self._calls[sid][1].extend(payload)
            elif type_ == 1:  # HEADERS (both END_HEADERS: h2grpc never sends CONTINUATION)
                fields = dict(self._decoder.decode(payload, raw=True))
                if b"grpc-status" in fields:
                    self._status[sid] = int(fields[b"grpc-status"])
                if flags & 1:
                    fut, body = self._calls.pop(sid)
                    fut.set_result((self._status.pop(sid, 2), bytes(body[5:])))
            elif type_ == 4 and not flags & 1:  # SETTINGS
                out.append(self._frame(4, 1, 0))
                if not self.ready.done():
                    self.ready.set_result(None)
            elif type_ == 8 and sid == 0:  # WINDOW_UPDATE
                self._send_window += int.from_bytes(payload, "big") & 0x7FFFFFFF
            elif type_ == 6 and not flags & 1:  # PING
                out.append(self._frame(6, 1, 0, payload))
            elif type_ in (3, 7):  # RST_STREAM, GOAWAY
                raise RuntimeError(f"the service sent frame type {type_}: {payload!r}")
        self._buf = buf[pos:]
        if self._received > 2**29:
            out.append(self._frame(8, 0, 0, self._received.to_bytes(4, "big")))
            self._received = 0
        if out:
            self._transport.write(b"".join(out))


async def _generate(mode: str, target: str, seconds: float) -> dict[str, float]:
    import grpc
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

    Entry = ratelimit_pb2.RateLimitDescriptor.Entry
    Response = rls_pb2.RateLimitResponse
    OK = Response.OK
    gc.disable()  # a collection pause would be counted as the service's latency

    def request(client: str, limit: str, policy: str = "bench/rls/global/0") -> Any:
        return rls_pb2.RateLimitRequest(domain="mesh", descriptors=[
            ratelimit_pb2.RateLimitDescriptor(entries=[
                Entry(key="mesh.dev/policy", value=policy),
                Entry(key="remote_address", value=client),
                Entry(key="mesh.dev/limit", value=limit)])])

    # Prebuilt: the generator's own CPU goes to calls, not to building messages.
    requests = [request(f"10.1.{i // 250}.{i % 250}", "1000000/Minute") for i in range(1000)]
    raw = [r.SerializeToString() for r in requests]
    path = target.removeprefix("unix://")
    loop = asyncio.get_running_loop()
    clients: list[_Client] = []
    for _ in range(4 if mode == "exactness" else 2):
        _, client = await loop.create_unix_connection(
            lambda: _Client("/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"),
            path)
        await client.ready
        clients.append(client)

    async def decide(n: int, message: bytes) -> int:
        status, body = await clients[n % len(clients)].call(message)
        assert status == 0, f"grpc-status {status}"
        return int(Response.FromString(body).overall_code)

    if mode in ("warmup", "throughput"):
        calls = 0
        end = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            nonlocal calls
            n = i
            while time.perf_counter() < end:
                assert await decide(n, raw[n % len(raw)]) == OK
                calls += 1
                n += 32

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(32)))
        return {"rls_decisions_per_s": round(calls / (time.perf_counter() - t0)),
                "_calls": calls}
    if mode == "grpcio":
        # The same closed loop with grpcio's client, for comparison (it, not the service,
        # is then the limit).
        channels = [grpc.aio.insecure_channel(target) for _ in range(2)]
        stubs = [rls_pb2_grpc.RateLimitServiceStub(c) for c in channels]
        calls = 0
        end = time.perf_counter() + seconds

        async def grpcio_worker(i: int) -> None:
            nonlocal calls
            n = i
            while time.perf_counter() < end:
                resp = await stubs[n % 2].ShouldRateLimit(requests[n % len(requests)])
                assert resp.overall_code == OK
                calls += 1
                n += 32

        t0 = time.perf_counter()
        await asyncio.gather(*(grpcio_worker(i) for i in range(32)))
        elapsed = time.perf_counter() - t0
        for c in channels:
            await c.close(None)
        return {"rls_decisions_per_s_grpcio_client": round(calls / elapsed)}
    if mode == "latency":
        latencies: list[float] = []
        tasks: set[asyncio.Task[None]] = set()

        async def timed(n: int) -> None:
            start = time.perf_counter()
            assert await decide(n, raw[n % len(raw)]) == OK
            latencies.append(time.perf_counter() - start)

        t0 = time.perf_counter()
        sent = 0
        total = int(seconds * LATENCY_RATE)
        while sent < total:
            # epoll sleeps in whole milliseconds: the calls due meanwhile go together, as
            # an Envoy's do under load.
            due = min(int((time.perf_counter() - t0) * LATENCY_RATE), total)
            for n in range(sent, due):
                t = asyncio.create_task(timed(n))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            sent = due
            await asyncio.sleep(0.0005)
        while tasks:
            await asyncio.gather(*list(tasks))
        latencies.sort()
        return {"rls_p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
                "rls_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
                "rls_latency_rate": LATENCY_RATE}
    # exactness: one limit of 100, 2,048 calls 64 at a time on 4 connections.
    limit = 100
    one = request("10.9.9.9", f"{limit}/Minute", policy=f"bench/exact/{time.time_ns()}")
    message = one.SerializeToString()
    codes = await asyncio.gather(*(decide(i, message) for i in range(64)))
    for _ in range(31):
        codes += await asyncio.gather(*(decide(i, message) for i in range(64)))
    return {"rls_overadmitted": sum(c == OK for c in codes) - limit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 20 s)")
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        print(json.dumps(asyncio.run(_generate(args.generate, args.target, args.seconds))))
        return
    figures: dict[str, Any] = {"benchmark": "rls_load", "quick": args.quick}
    figures.update(run(args.quick))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
