"""The rate limit service (mesh/ratelimit) under load, through real gRPC and a real Redis,
on three gRPC servers side by side.

The service runs as `python -m mesh.ratelimit` pinned to one core; the load comes from
another process pinned to the other core (with redis-server beside it, so the service's
core does nothing else). Three copies of the service run at once, on one core, with one
Redis, differing only in their gRPC server:
- `h2grpc`: the service's own HTTP/2 (mesh/ratelimit/h2grpc.py, `--transport h2`, shipped);
- `h2lib`: the `h2` library's HTTP/2 state machine (benchmarks/rls_h2lib.py), same handler;
- `grpcio`: grpcio's asyncio server (`--transport grpcio`).
The machine is noisy (other work shares it), so they are measured in rounds, one after
another within each round (the order rotating), and each figure is the median over the
rounds; each ratio is the median of the rounds' ratios. Per server and round:
- throughput: closed loop, 32 calls in flight on 2 connections, limits high enough never
  to deny, a counter per client address over 1,000 addresses: `rls_<server>_decisions_per_s`,
  the service's CPU per decision (`rls_<server>_cpu_us_per_decision`) and the calls' own
  latency in that loop (`rls_<server>_loop_p50_ms`, `_loop_p99_ms`: at the same 32 calls in
  flight, a server with more decisions/s also has them sooner);
- latency: open loop at `rls_compare_rate` decisions/s, which all three sustain, each call
  timed from when it was sent: `rls_<server>_p50_ms`, `rls_<server>_p99_ms`;
- `rls_<server>_errors`: calls not answered OK in both (grpcio's server honours the 50 ms
  grpc-timeout Envoy sends, and answers DEADLINE_EXCEEDED beyond it).
Ratios: `rls_h2grpc_speedup_vs_<h2lib|grpcio|best_alternative>` (decisions/s over the
other's), `rls_<h2lib|grpcio>_p99_over_h2grpc` (the other's open-loop p99 over h2grpc's).

Then the shipped service (h2grpc) alone:
- `rls_decisions_per_s`, `rls_cpu_us_per_decision`: its medians above;
- latency: open loop at a fixed 5,000 decisions/s (as Envoy calls: requests arrive when
  they arrive): `rls_p50_ms`, `rls_p99_ms`;
- `rls_decisions_per_s_grpcio_client`: the closed loop with grpcio's client;
- exactness: 64 calls in flight on 4 connections against one limit of 100:
  `rls_overadmitted` = admitted - 100 (expected 0).

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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from procstat import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
LATENCY_RATE = 5000
COMPARE_RATE = 1000  # grpcio's server makes ~2,500/s on one core here: well within
SERVERS = ("h2grpc", "h2lib", "grpcio")
ALTERNATIVES = ("h2lib", "grpcio")
METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"


def _pin(core: int) -> Callable[[], None]:
    return lambda: os.sched_setaffinity(0, {core})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def _service_command(server: str, sock: Path, redis_url: str) -> list[str]:
    args = ["--listen", f"unix://{sock}", "--redis", redis_url]
    if server == "h2lib":
        return [sys.executable, __file__, "--serve-h2lib", *args]
    transport = "grpcio" if server == "grpcio" else "h2"
    return [sys.executable, "-m", "mesh.ratelimit", *args, "--transport", transport,
            "--log-level", "warning"]


def _median(values: list[float], digits: int = 3) -> float:
    return round(statistics.median(values), digits)


def _summary(rounds: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """Medians over the rounds, and the medians of the rounds' ratios."""
    out: dict[str, float] = {}
    for name in SERVERS:
        def of(key: str, name: str = name) -> list[float]:
            return [r[name][key] for r in rounds]

        out[f"rls_{name}_decisions_per_s"] = round(statistics.median(of("decisions_per_s")))
        for key in ("cpu_us_per_decision", "loop_p50_ms", "loop_p99_ms", "p50_ms", "p99_ms"):
            out[f"rls_{name}_{key}"] = _median(of(key), 1 if key.startswith("cpu") else 3)
        out[f"rls_{name}_errors"] = sum(of("errors"))
    for alt in ALTERNATIVES:
        out[f"rls_h2grpc_speedup_vs_{alt}"] = _median(
            [r["h2grpc"]["decisions_per_s"] / r[alt]["decisions_per_s"] for r in rounds], 2)
        out[f"rls_{alt}_p99_over_h2grpc"] = _median(
            [r[alt]["p99_ms"] / r["h2grpc"]["p99_ms"] for r in rounds], 2)
    out["rls_h2grpc_speedup_vs_best_alternative"] = _median(
        [r["h2grpc"]["decisions_per_s"] / max(r[a]["decisions_per_s"] for a in ALTERNATIVES)
         for r in rounds], 2)
    return out


def run(quick: bool) -> dict[str, float]:
    cores = sorted(os.sched_getaffinity(0))
    rls_core, load_core = cores[0], cores[-1]  # one core: both share it (said in the figures)
    rounds = 3 if quick else 5
    loop_s, open_s = (1.2, 1.2) if quick else (3.0, 3.0)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mesh-rls-bench-") as work:
        redis = start_redis(port, work, _pin(load_core))
        procs: dict[str, subprocess.Popen[bytes]] = {}
        socks = {name: Path(work) / f"{name}.sock" for name in SERVERS}
        try:
            for name in SERVERS:
                procs[name] = subprocess.Popen(
                    _service_command(name, socks[name], f"redis://127.0.0.1:{port}"),
                    cwd=ROOT, preexec_fn=_pin(rls_core))
            for name in SERVERS:
                wait(socks[name].exists, f"the {name} service's socket")

            def generate(mode: str, spec: dict[str, Any]) -> dict[str, Any]:
                out = subprocess.run(
                    [sys.executable, __file__, "--generate", mode, "--spec", json.dumps(spec)],
                    cwd=ROOT, capture_output=True, text=True, check=False,
                    preexec_fn=_pin(load_core))
                if out.returncode:
                    raise RuntimeError(f"the load generator ({mode}) failed:\n{out.stderr}")
                return dict(json.loads(out.stdout.strip().splitlines()[-1]))

            def servers(order: tuple[str, ...]) -> list[dict[str, Any]]:
                return [{"name": n, "target": str(socks[n]), "pid": procs[n].pid}
                        for n in order]

            generate("compare", {"servers": servers(SERVERS), "loop_s": 0.5, "open_s": 0.3,
                                 "rate": COMPARE_RATE})  # warm up
            results = []
            for i in range(rounds):
                order = SERVERS[i % 3:] + SERVERS[:i % 3]
                results.append(generate("compare", {
                    "servers": servers(order), "loop_s": loop_s, "open_s": open_s,
                    "rate": COMPARE_RATE}))
            figures = _summary(results)
            figures["rls_compare_rounds"] = rounds
            figures["rls_compare_rate"] = COMPARE_RATE
            figures["rls_decisions_per_s"] = figures["rls_h2grpc_decisions_per_s"]
            figures["rls_cpu_us_per_decision"] = figures["rls_h2grpc_cpu_us_per_decision"]
            shipped = {"target": str(socks["h2grpc"])}
            figures.update(generate("latency", {**shipped, "seconds": 3.0 if quick else 7.5}))
            figures.update(generate("grpcio", {**shipped, "seconds": 2.0 if quick else 5.0}))
            figures.update(generate("exactness", shipped))
            figures["rls_cores"] = float(len({rls_core, load_core}))
            return figures
        finally:
            for p in (*procs.values(), redis):
                p.terminate()
            for p in (*procs.values(), redis):
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def serve_h2lib(listen: str, redis_url: str) -> None:
    """The service on the h2 library's HTTP/2, set up as `python -m mesh.ratelimit` is."""
    import logging

    from rls_h2lib import H2LibServer

    from mesh import logs
    from mesh.ratelimit.service import run as run_service

    logs.setup("warning", "text")
    logging.getLogger("hpack").setLevel(logging.INFO)
    gc.collect()
    gc.freeze()
    run_service(listen, redis_url, unary_server=H2LibServer)


# -- the load generator (run in its own process by `run`)


class _Client(asyncio.Protocol):
    """A minimal HTTP/2 gRPC client for unary calls: grpcio's asyncio client costs about
    100 us of CPU a call, more than the service's decision, and its collector pauses add
    milliseconds; this one lets one core drive the service to its limit and time it.
    HPACK both ways, CONTINUATION and padding as received, flow control (windows large
    enough never to bind, checked); a stream reset fails its call, a GOAWAY the run."""

    def __init__(self, path: str) -> None:
        from hpack import Decoder, Encoder

        self._decoder = Decoder()
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._next = 1
        self._calls: dict[int, tuple[asyncio.Future[tuple[int, bytes]], bytearray]] = {}
        self._status: dict[int, int] = {}
        self._block: tuple[int, int, bytearray] | None = None  # a header block in pieces
        self._send_window = 65535
        self._received = 0
        self.ready = asyncio.get_running_loop().create_future()

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

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def call(self, message: bytes) -> asyncio.Future[tuple[int, bytes]]:
        """(grpc-status, response message); -1 for a stream reset."""
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

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        fields = dict(self._decoder.decode(block, raw=True))
        if b"grpc-status" in fields:
            self._status[sid] = int(fields[b"grpc-status"])
        if flags & 1:  # END_STREAM
            fut, body = self._calls.pop(sid)
            fut.set_result((self._status.pop(sid, 2), bytes(body[5:])))

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
            if type_ in (0, 1) and flags & 0x8:  # PADDED
                payload = payload[1:len(payload) - payload[0]]
            if type_ == 0:  # DATA
                self._received += n
                self._calls[sid][1].extend(payload)
                if flags & 1:
                    fut, body = self._calls.pop(sid)
                    fut.set_result((self._status.pop(sid, 2), bytes(body[5:])))
            elif type_ == 1:  # HEADERS
                if flags & 0x20:  # PRIORITY
                    payload = payload[5:]
                if flags & 4:  # END_HEADERS
                    self._header_block(sid, flags, payload)
                else:
                    self._block = (sid, flags, bytearray(payload))
            elif type_ == 9 and self._block is not None:  # CONTINUATION
                self._block[2].extend(payload)
                if flags & 4:
                    first, self._block = self._block, None
                    self._header_block(first[0], first[1], bytes(first[2]))
            elif type_ == 4 and not flags & 1:  # SETTINGS
                out.append(self._frame(4, 1, 0))
                if not self.ready.done():
                    self.ready.set_result(None)
            elif type_ == 8 and sid == 0:  # WINDOW_UPDATE
                self._send_window += int.from_bytes(payload, "big") & 0x7FFFFFFF
            elif type_ == 6 and not flags & 1:  # PING
                out.append(self._frame(6, 1, 0, payload))
            elif type_ == 3:  # RST_STREAM: after the answer (NO_ERROR), or instead of it
                call = self._calls.pop(sid, None)
                if call is not None:
                    self._status.pop(sid, None)
                    call[0].set_result((-1, b""))
            elif type_ == 7:  # GOAWAY
                raise RuntimeError(f"the service sent GOAWAY: {payload!r}")
        self._buf = buf[pos:]
        if self._received > 2**29:
            out.append(self._frame(8, 0, 0, self._received.to_bytes(4, "big")))
            self._received = 0
        if out:
            self._transport.write(b"".join(out))


Decide = Callable[[int, bytes], Awaitable[int]]


async def _closed_loop(decide: Decide, raw: list[bytes], seconds: float
                       ) -> tuple[int, int, list[float]]:
    """32 calls in flight: (decided OK, failed, the calls' latencies)."""
    from envoy.service.ratelimit.v3 import rls_pb2

    OK = rls_pb2.RateLimitResponse.OK
    calls = errors = 0
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal calls, errors
        n = i
        while time.perf_counter() < end:
            start = time.perf_counter()
            code = await decide(n, raw[n % len(raw)])
            latencies.append(time.perf_counter() - start)
            if code == OK:
                calls += 1
            else:
                errors += 1
            n += 32

    await asyncio.gather(*(worker(i) for i in range(32)))
    return calls, errors, latencies


async def _open_loop(decide: Decide, raw: list[bytes], seconds: float, rate: int
                     ) -> tuple[int, list[float]]:
    """Calls at `rate` a second, each timed from when it was sent: (failed, latencies)."""
    from envoy.service.ratelimit.v3 import rls_pb2

    OK = rls_pb2.RateLimitResponse.OK
    latencies: list[float] = []
    errors = 0
    tasks: set[asyncio.Task[None]] = set()

    async def timed(n: int) -> None:
        nonlocal errors
        start = time.perf_counter()
        code = await decide(n, raw[n % len(raw)])
        latencies.append(time.perf_counter() - start)
        errors += code != OK

    t0 = time.perf_counter()
    sent = 0
    total = int(seconds * rate)
    while sent < total:
        # epoll sleeps in whole milliseconds: the calls due meanwhile go together, as
        # an Envoy's do under load.
        due = min(int((time.perf_counter() - t0) * rate), total)
        for n in range(sent, due):
            t = asyncio.create_task(timed(n))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        sent = due
        await asyncio.sleep(0.0005)
    while tasks:
        await asyncio.gather(*list(tasks))
    return errors, latencies


def _ms(latencies: list[float], q: float) -> float:
    latencies.sort()
    return round(latencies[min(int(len(latencies) * q), len(latencies) - 1)] * 1000, 3)


async def _generate(mode: str, spec: dict[str, Any]) -> dict[str, Any]:
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

    # Prebuilt: the generator's own CPU goes to calls, not to building messages. A window
    # of a second keeps every counter small: Redis's work stays the same round after round.
    requests = [request(f"10.1.{i // 250}.{i % 250}", "1000000/Second") for i in range(1000)]
    raw = [r.SerializeToString() for r in requests]
    loop = asyncio.get_running_loop()

    async def connect(path: str, n: int) -> list[_Client]:
        clients = []
        for _ in range(n):
            _, client = await loop.create_unix_connection(lambda: _Client(METHOD), path)
            await client.ready
            clients.append(client)
        return clients

    def decider(clients: list[_Client]) -> Decide:
        async def decide(n: int, message: bytes) -> int:
            status, body = await clients[n % len(clients)].call(message)
            return int(Response.FromString(body).overall_code) if status == 0 else -1

        return decide

    if mode == "compare":
        out: dict[str, Any] = {}
        for server in spec["servers"]:
            clients = await connect(server["target"], 2)
            decide = decider(clients)
            cpu = cpu_seconds(server["pid"])
            t0 = time.perf_counter()
            calls, errors, loop_latencies = await _closed_loop(decide, raw, spec["loop_s"])
            elapsed = time.perf_counter() - t0
            cpu = cpu_seconds(server["pid"]) - cpu
            open_errors, latencies = await _open_loop(decide, raw, spec["open_s"],
                                                      spec["rate"])
            for client in clients:
                client.close()
            out[server["name"]] = {
                "decisions_per_s": calls / elapsed,
                "cpu_us_per_decision": cpu * 1e6 / max(calls, 1),
                "loop_p50_ms": _ms(loop_latencies, 0.5),
                "loop_p99_ms": _ms(loop_latencies, 0.99),
                "p50_ms": _ms(latencies, 0.5), "p99_ms": _ms(latencies, 0.99),
                "errors": errors + open_errors}
        return out
    target = spec["target"]
    if mode == "grpcio":
        # The same closed loop with grpcio's client, for comparison (it, not the service,
        # is then the limit).
        channels = [grpc.aio.insecure_channel(f"unix://{target}") for _ in range(2)]
        stubs = [rls_pb2_grpc.RateLimitServiceStub(c) for c in channels]
        calls = 0
        end = time.perf_counter() + spec["seconds"]

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
        errors, latencies = await _open_loop(decider(await connect(target, 2)), raw,
                                             spec["seconds"], LATENCY_RATE)
        assert not errors, f"{errors} calls failed"
        return {"rls_p50_ms": _ms(latencies, 0.5), "rls_p99_ms": _ms(latencies, 0.99),
                "rls_latency_rate": LATENCY_RATE}
    # exactness: one limit of 100, 2,048 calls 64 at a time on 4 connections.
    decide = decider(await connect(target, 4))
    limit = 100
    one = request("10.9.9.9", f"{limit}/Minute", policy=f"bench/exact/{time.time_ns()}")
    message = one.SerializeToString()
    codes = await asyncio.gather(*(decide(i, message) for i in range(64)))
    for _ in range(31):
        codes += await asyncio.gather(*(decide(i, message) for i in range(64)))
    assert -1 not in codes, "calls failed"
    return {"rls_overadmitted": sum(c == OK for c in codes) - limit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 40 s)")
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--serve-h2lib", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--listen", help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_h2lib:
        serve_h2lib(args.listen, args.redis)
        return
    if args.generate:
        print(json.dumps(asyncio.run(_generate(args.generate, json.loads(args.spec)))))
        return
    figures: dict[str, Any] = {"benchmark": "rls_load", "quick": args.quick}
    figures.update(run(args.quick))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
