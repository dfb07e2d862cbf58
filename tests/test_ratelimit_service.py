"""The rate limit service (mesh/ratelimit) against a real redis-server, through real gRPC:
limits, the sliding window, shadow mode, exactness under concurrency, bad descriptors,
Redis failing and coming back, and Envoy's own rate limit filter calling it. (The HTTP/2
server, frame by frame: tests/test_h2grpc.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import random
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from redis.crc import key_slot

from mesh.echo import EchoServer
from mesh.envoy.supervisor import envoy_binary
from mesh.ratelimit import descriptors, service
from mesh.ratelimit.store import RedisAddress
from meshxds.address import ListenAddress
from tests.testbed import free_port, http_get, wait_until

pytestmark = pytest.mark.e2e

REDIS_SERVER = "/usr/bin/redis-server"
Code = rls_pb2.RateLimitResponse
Entry = ratelimit_pb2.RateLimitDescriptor.Entry


class RedisProcess:
    """A throwaway redis-server (no persistence) on a loopback port or a unix socket; it
    can be stopped, paused (SIGSTOP: it hangs without closing anything) and started again
    at the same address."""

    def __init__(self, workdir: Path, unix: bool = False, port: int | None = None,
                 extra: tuple[str, ...] = (), config: str | None = None) -> None:
        self.workdir = workdir
        self.port = 0 if unix else port or free_port()
        self.socket = workdir / "redis.sock" if unix else None
        self.extra = extra
        self.config = config  # a config file's text (sentinels need one they can write)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}" if self.socket else f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [REDIS_SERVER]
        if self.config is not None:
            (self.workdir / "redis.conf").write_text(self.config)
            args.append(str(self.workdir / "redis.conf"))
        args += ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir), *self.extra]
        if self.socket is not None:
            args += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(self.ping, timeout=5, what="redis-server")
        return self

    def ping(self) -> bool:
        family = socket.AF_UNIX if self.socket else socket.AF_INET
        with socket.socket(family) as s:
            s.settimeout(0.5)
            s.connect(str(self.socket) if self.socket else ("127.0.0.1", self.port))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def command(self, *args: str) -> bytes:
        family = socket.AF_UNIX if self.socket else socket.AF_INET
        with socket.socket(family) as s:
            s.settimeout(2)
            s.connect(str(self.socket) if self.socket else ("127.0.0.1", self.port))
            s.sendall(b"".join([b"*%d\r\n" % len(args),
                                *(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args)]))
            return s.recv(4096)

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)  # if paused
                self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProcess]:
    with tempfile.TemporaryDirectory(prefix="mesh-rls-") as d:
        r = RedisProcess(Path(d)).start()
        try:
            yield r
        finally:
            r.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    r = RedisProcess(tmp_path).start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    r = RedisProcess(tmp_path, unix=True).start()
    try:
        yield r
    finally:
        r.stop()


class Service:
    """`serve()` on an event loop in a thread, until closed."""

    def __init__(self, listen: str, redis_url: str, transport: service.Transport = "h2"
                 ) -> None:
        self._started = threading.Event()
        self.address: ListenAddress | None = None
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[Any] | None = None
        self.error: BaseException | None = None

        def started(address: ListenAddress) -> None:
            self.address = address
            self._started.set()

        async def main() -> None:
            self._task = asyncio.current_task()
            await service.serve(listen, redis_url, transport=transport, started=started,
                                grace=1.0)

        def thread() -> None:
            try:
                self._loop.run_until_complete(main())
            except asyncio.CancelledError:
                pass
            except BaseException as e:  # surfaced by start()
                self.error = e
                self._started.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=thread, name="rls", daemon=True)

    def start(self) -> Service:
        self._thread.start()
        assert self._started.wait(10), "the service did not start"
        if self.error is not None:
            raise self.error
        return self

    def close(self) -> None:
        if self._task is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)

    @property
    def target(self) -> str:
        assert self.address is not None
        return self.address.grpc_target()


@pytest.fixture(params=["h2", "grpcio"])
def rls(request: pytest.FixtureRequest, redis: RedisProcess) -> Iterator[Service]:
    s = Service("127.0.0.1:0", redis.url, transport=request.param).start()
    yield s
    s.close()


@pytest.fixture
def stub(rls: Service) -> Iterator[Any]:
    with grpc.insecure_channel(rls.target) as channel:
        wait_until(lambda: _ready(channel), timeout=5, what="the service answering")
        yield rls_pb2_grpc.RateLimitServiceStub(channel)


def _ready(channel: grpc.Channel) -> bool:
    stub = rls_pb2_grpc.RateLimitServiceStub(channel)
    try:
        stub.ShouldRateLimit(request(descriptor("probe/x", "1000000/Second")), timeout=1)
    except grpc.RpcError:
        return False
    return True


def descriptor(policy: str, limit: str | None, *selectors: tuple[str, str],
               shadow: bool = False) -> ratelimit_pb2.RateLimitDescriptor:
    entries = [Entry(key="mesh.dev/policy", value=policy)]
    entries += [Entry(key=k, value=v) for k, v in selectors]
    if limit is not None:
        entries.append(Entry(key="mesh.dev/limit", value=limit))
    if shadow:
        entries.append(Entry(key="mesh.dev/shadow", value="true"))
    return ratelimit_pb2.RateLimitDescriptor(entries=entries)


def request(*descs: ratelimit_pb2.RateLimitDescriptor, hits: int = 0,
            domain: str = "mesh") -> rls_pb2.RateLimitRequest:
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=descs, hits_addend=hits)


def policy() -> str:
    """A fresh limit id: tests share one Redis."""
    return f"test/{uuid.uuid4().hex[:8]}/global/0"


def headers(resp: Any) -> dict[str, str]:
    return {h.key: h.value for h in resp.response_headers_to_add}


# -- limits


def test_admits_the_limit_then_denies_with_retry_after(stub: Any) -> None:
    d = descriptor(policy(), "5/Minute", ("remote_address", "10.0.0.1"))
    for left in range(4, -1, -1):
        resp = stub.ShouldRateLimit(request(d))
        assert resp.overall_code == Code.OK
        (st,) = resp.statuses
        assert st.code == Code.OK and st.limit_remaining == left
        assert (st.current_limit.requests_per_unit, st.current_limit.unit) == \
            (5, Code.RateLimit.MINUTE)
    resp = stub.ShouldRateLimit(request(d))
    assert resp.overall_code == Code.OVER_LIMIT
    (st,) = resp.statuses
    assert st.code == Code.OVER_LIMIT and st.limit_remaining == 0
    # The oldest of the five frees its slot a minute after it was counted.
    assert 55_000 < st.duration_until_reset.ToMilliseconds() <= 60_000
    assert headers(resp)["retry-after"] == "60"


def test_the_window_slides(stub: Any) -> None:
    d = descriptor(policy(), "3/Second")

    def admitted(n: int) -> int:
        return sum(stub.ShouldRateLimit(request(d)).overall_code == Code.OK for _ in range(n))

    assert admitted(2) == 2
    time.sleep(0.5)
    assert admitted(2) == 1  # the third slot, then full
    resp = stub.ShouldRateLimit(request(d))
    assert headers(resp)["retry-after"] == "1"
    assert 0 < resp.statuses[0].duration_until_reset.ToMilliseconds() <= 500
    time.sleep(0.65)
    # 1.15 s in: the first two have left the window, the third has not. A fixed window
    # would have started afresh and admitted three.
    assert admitted(4) == 2


def test_counters_are_per_selector_value(stub: Any) -> None:
    p = policy()
    one = descriptor(p, "2/Minute", ("remote_address", "10.0.0.1"), ("header:x-user", "a"))
    for _ in range(2):
        assert stub.ShouldRateLimit(request(one)).overall_code == Code.OK
    assert stub.ShouldRateLimit(request(one)).overall_code == Code.OVER_LIMIT
    for other in (descriptor(p, "2/Minute", ("remote_address", "10.0.0.2"),
                             ("header:x-user", "a")),
                  descriptor(p, "2/Minute", ("remote_address", "10.0.0.1"),
                             ("header:x-user", "b")),
                  descriptor(p, "2/Minute", ("remote_address", "10.0.0.1")),
                  descriptor(p, "2/Minute", ("remote_address", "10.0.0.1"),
                             ("header:x-user", "a"), ("header:x-user", "a")),
                  descriptor(p, "2/Hour", ("remote_address", "10.0.0.1"),
                             ("header:x-user", "a")),
                  ):
        assert stub.ShouldRateLimit(request(other)).overall_code == Code.OK
    # The same counter under a new limit (a changed policy keeps counting).
    same = descriptor(p, "3/Minute", ("remote_address", "10.0.0.1"), ("header:x-user", "a"))
    assert stub.ShouldRateLimit(request(same)).overall_code == Code.OK
    assert stub.ShouldRateLimit(request(same)).overall_code == Code.OVER_LIMIT
    # ... and the domain is part of the key.
    assert stub.ShouldRateLimit(request(one, domain="other")).overall_code == Code.OK


def test_a_denied_request_consumes_nothing(stub: Any) -> None:
    wide = descriptor(policy(), "10/Minute")
    narrow = descriptor(policy(), "1/Minute")
    assert stub.ShouldRateLimit(request(wide, narrow)).overall_code == Code.OK
    for _ in range(3):
        resp = stub.ShouldRateLimit(request(wide, narrow))
        assert resp.overall_code == Code.OVER_LIMIT
        assert [s.code for s in resp.statuses] == [Code.OK, Code.OVER_LIMIT]
        assert resp.statuses[0].limit_remaining == 9  # what it would have left: nothing taken
    resp = stub.ShouldRateLimit(request(wide))
    assert resp.overall_code == Code.OK and resp.statuses[0].limit_remaining == 8


def test_one_counter_twice_in_a_request_counts_twice(stub: Any) -> None:
    d = descriptor(policy(), "1/Minute")
    resp = stub.ShouldRateLimit(request(d, d))
    assert resp.overall_code == Code.OVER_LIMIT
    assert [s.code for s in resp.statuses] == [Code.OK, Code.OVER_LIMIT]
    assert stub.ShouldRateLimit(request(d)).overall_code == Code.OK  # nothing was taken


def test_hits_addend(stub: Any) -> None:
    d = descriptor(policy(), "5/Minute")
    resp = stub.ShouldRateLimit(request(d, hits=3))
    assert resp.overall_code == Code.OK and resp.statuses[0].limit_remaining == 2
    assert stub.ShouldRateLimit(request(d, hits=3)).overall_code == Code.OVER_LIMIT
    assert stub.ShouldRateLimit(request(d, hits=2)).overall_code == Code.OK
    assert stub.ShouldRateLimit(request(d, hits=2**32 - 1)).overall_code == Code.OVER_LIMIT


def test_shadow_never_denies_but_reports(stub: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mesh.ratelimit.service")
    p = policy()
    shadow = descriptor(p, "2/Minute", shadow=True)
    enforced = descriptor(policy(), "100/Minute")
    for i in range(5):
        resp = stub.ShouldRateLimit(request(shadow, enforced))
        assert resp.overall_code == Code.OK
        assert [s.code for s in resp.statuses] == [Code.OK, Code.OK]
        would = headers(resp).get("x-ratelimit-shadow")
        assert would == ("would-limit" if i >= 2 else None)
        assert "retry-after" not in headers(resp)
    # Counted as if enforced alone: the would-be denials took no slot.
    assert resp.statuses[0].limit_remaining == 0
    assert resp.statuses[1].limit_remaining == 95
    lines = [r for r in caplog.records if r.getMessage() == "shadow limit would deny"]
    assert len(lines) == 1 and getattr(lines[0], "policy", None) == p


def test_bad_descriptors_are_answered_ok(stub: Any, caplog: pytest.LogCaptureFixture
                                         ) -> None:
    caplog.set_level(logging.WARNING, logger="mesh.ratelimit.descriptors")
    p = policy()
    good = descriptor(policy(), "1/Minute")
    bad = [
        ratelimit_pb2.RateLimitDescriptor(entries=[Entry(key="remote_address", value="x")]),
        descriptor(p, None),
        descriptor(p, "ten/Minute"),
        descriptor(p, "0/Minute"),
        descriptor(p, "1000001/Minute"),
        descriptor(p, "5/Week"),
        descriptor(p, "5/Minute", ("header:x", "v" * 300)),
        descriptor(p, "5/Minute", *[(f"k{i}", "v") for i in range(20)]),
        ratelimit_pb2.RateLimitDescriptor(),
    ]
    for _ in range(2):
        resp = stub.ShouldRateLimit(request(*bad))
        assert resp.overall_code == Code.OK
        assert [s.code for s in resp.statuses] == [Code.OK] * len(bad)
    assert stub.ShouldRateLimit(request(*bad[:3], good)).overall_code == Code.OK
    resp = stub.ShouldRateLimit(request(*bad[:3], good))
    assert resp.overall_code == Code.OVER_LIMIT  # the good one still limits
    assert [s.code for s in resp.statuses] == [Code.OK] * 3 + [Code.OVER_LIMIT]
    # More than 16 descriptors: those beyond are answered OK, the first 16 decided.
    many = stub.ShouldRateLimit(request(*[descriptor(policy(), "1/Minute")] * 17))
    assert [s.code for s in many.statuses] == [Code.OK] + [Code.OVER_LIMIT] * 15 + [Code.OK]
    # Each distinct problem logged once.
    problems = [getattr(r, "problem", "") for r in caplog.records
                if r.name == "mesh.ratelimit.descriptors"]
    assert len(problems) == len(set(problems)) == 9


def test_unknown_method_and_garbage(rls: Service) -> None:
    with grpc.insecure_channel(rls.target) as channel:
        def raw_method(name: str) -> Any:
            return channel.unary_unary(name, request_serializer=bytes,
                                       response_deserializer=bytes)

        other = raw_method("/envoy.service.ratelimit.v3.RateLimitService/Other")
        with pytest.raises(grpc.RpcError) as e:
            other(b"", timeout=2)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        raw = raw_method(service.METHOD)
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff\xff", timeout=2)
        # grpcio's server answers UNKNOWN when its deserializer fails.
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNKNOWN)


# -- concurrency


async def _hammer(target: str, d: ratelimit_pb2.RateLimitDescriptor, calls: int,
                  concurrency: int) -> int:
    admitted = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)

        async def worker() -> None:
            nonlocal admitted
            for _ in range(calls // concurrency):
                resp = await stub.ShouldRateLimit(request(d), timeout=5)
                admitted += resp.overall_code == Code.OK

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return admitted


def test_concurrent_clients_on_two_services_admit_exactly_the_limit(
        redis: RedisProcess) -> None:
    services = [Service("127.0.0.1:0", redis.url, transport=t).start()
                for t in ("h2", "grpcio")]
    try:
        for s in services:
            with grpc.insecure_channel(s.target) as channel:
                wait_until(partial(_ready, channel), timeout=5, what="the service answering")
        d = descriptor(policy(), "50/Minute", ("remote_address", "10.9.9.9"))
        results: list[int] = []
        # Two clients, each with its own channel and thread, against two services: every
        # decision races others in Redis.
        def client(s: Service) -> None:
            results.append(asyncio.run(_hammer(s.target, d, 200, 10)))

        threads = [threading.Thread(target=client, args=(s,)) for s in services * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 4
        assert sum(results) == 50
    finally:
        for s in services:
            s.close()


# -- Redis failing


def _decide(stub: Any, d: ratelimit_pb2.RateLimitDescriptor) -> tuple[Any, float]:
    start = time.monotonic()
    try:
        result: Any = stub.ShouldRateLimit(request(d), timeout=2).overall_code
    except grpc.RpcError as e:
        result = e.code()
    return result, time.monotonic() - start


@pytest.mark.parametrize("transport", ["h2", "grpcio"])
def test_redis_down_fails_fast_and_limiting_resumes(
        own_redis: RedisProcess, transport: service.Transport) -> None:
    s = Service("127.0.0.1:0", own_redis.url, transport=transport).start()
    try:
        with grpc.insecure_channel(s.target) as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            wait_until(lambda: _ready(channel), timeout=5, what="the service answering")
            d = descriptor(policy(), "3/Minute")
            assert _decide(stub, d)[0] == Code.OK
            # Hung (not closed): the first decision waits out the 20 ms timeout, the
            # next fail at once.
            own_redis.pause()
            for _ in range(5):
                code, elapsed = _decide(stub, d)
                assert code == grpc.StatusCode.UNAVAILABLE
                assert elapsed < 0.05
            own_redis.resume()
            wait_until(lambda: _decide(stub, d)[0] == Code.OK, timeout=5,
                       what="decisions after Redis resumed")
            # Gone (the process stopped), then back on the same port, empty.
            own_redis.stop()
            for _ in range(5):
                code, elapsed = _decide(stub, d)
                assert code == grpc.StatusCode.UNAVAILABLE
                assert elapsed < 0.05
            own_redis.start()
            wait_until(lambda: _decide(stub, d)[0] == Code.OK, timeout=5,
                       what="decisions after Redis restarted")
            for _ in range(2):
                assert _decide(stub, d)[0] == Code.OK
            assert _decide(stub, d)[0] == Code.OVER_LIMIT
    finally:
        s.close()


def test_unix_sockets_both_ways(unix_redis: RedisProcess, tmp_path: Path) -> None:
    sock = tmp_path / "run" / "rls.sock"
    s = Service(f"unix://{sock}", unix_redis.url).start()
    try:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        with grpc.insecure_channel(s.target) as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            wait_until(lambda: _ready(channel), timeout=5, what="the service answering")
            d = descriptor(policy(), "1/Minute")
            assert _decide(stub, d)[0] == Code.OK
            # The script forgotten (SCRIPT FLUSH, as after a restart): loaded again.
            assert unix_redis.command("SCRIPT", "FLUSH").startswith(b"+OK")
            assert _decide(stub, d)[0] == Code.OVER_LIMIT
            unix_redis.stop()
            code, elapsed = _decide(stub, d)
            assert code == grpc.StatusCode.UNAVAILABLE and elapsed < 0.05
            unix_redis.start()
            wait_until(lambda: _decide(stub, d)[0] == Code.OK, timeout=5,
                       what="decisions after Redis restarted")
    finally:
        s.close()
    assert not sock.exists()


def test_the_command_stops_on_sigterm(redis: RedisProcess, tmp_path: Path) -> None:
    sock = tmp_path / "rls.sock"
    proc = subprocess.Popen([sys.executable, "-m", "mesh.ratelimit", "--listen",
                             f"unix://{sock}", "--redis", redis.url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            wait_until(lambda: _ready(channel), timeout=10, what="the service answering")
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        proc.kill()
        out = proc.communicate()[0].decode()
    assert "rate limit service stopped" in out, out
    assert not sock.exists()
    bad = subprocess.run([sys.executable, "-m", "mesh.ratelimit", "--listen", "10.1.2.3:80",
                          "--redis", redis.url], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "non-loopback" in bad.stderr


# -- Sentinel and Cluster


def _cluster_port() -> int:
    # A cluster node also listens on its port + 10000 (the cluster bus).
    while True:
        port = random.randint(20000, 45000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


def test_redis_sentinel(tmp_path: Path) -> None:
    master = RedisProcess(tmp_path / "master").start()
    sentinel = RedisProcess(tmp_path / "sentinel", extra=("--sentinel",), config=(
        f"sentinel monitor shared 127.0.0.1 {master.port} 1\n"))
    try:
        sentinel.start()
        s = Service("127.0.0.1:0", f"redis-sentinel://127.0.0.1:{sentinel.port}/shared").start()
        try:
            with grpc.insecure_channel(s.target) as channel:
                stub = rls_pb2_grpc.RateLimitServiceStub(channel)
                wait_until(lambda: _ready(channel), timeout=5, what="the service answering")
                d = descriptor(policy(), "2/Minute")
                assert [_decide(stub, d)[0] for _ in range(3)] == [Code.OK, Code.OK,
                                                                   Code.OVER_LIMIT]
        finally:
            s.close()
        assert b"mesh:rl:" in master.command("KEYS", "mesh:rl:*")
    finally:
        sentinel.stop()
        master.stop()


def test_redis_cluster(tmp_path: Path) -> None:
    nodes = [RedisProcess(tmp_path / f"node{i}", port=_cluster_port(), extra=(
        "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")) for i in range(3)]
    try:
        for node, (first, last) in zip(nodes, ((0, 5460), (5461, 10922), (10923, 16383)),
                                       strict=True):
            node.start()
            assert node.command("CLUSTER", "ADDSLOTSRANGE", str(first), str(last)) == b"+OK\r\n"
        for node in nodes[1:]:
            nodes[0].command("CLUSTER", "MEET", "127.0.0.1", str(node.port))
        wait_until(lambda: all(b"cluster_state:ok" in n.command("CLUSTER", "INFO")
                               for n in nodes), timeout=10, what="the cluster")
        s = Service("127.0.0.1:0", f"redis-cluster://127.0.0.1:{nodes[0].port}").start()
        try:
            with grpc.insecure_channel(s.target) as channel:
                stub = rls_pb2_grpc.RateLimitServiceStub(channel)
                wait_until(lambda: _ready(channel), timeout=5, what="the service answering")
                # Counters spread over slots (and nodes): one call per slot.
                ds = [descriptor(policy(), "2/Minute") for _ in range(6)]
                slots = {key_slot(descriptors.parse("mesh", d, 1).key.encode())  # type: ignore[union-attr]
                         for d in ds}
                assert len(slots) > 1
                codes = [stub.ShouldRateLimit(request(*ds)).overall_code for _ in range(3)]
                assert codes == [Code.OK, Code.OK, Code.OVER_LIMIT]
                one = descriptor(policy(), "50/Minute")
                assert asyncio.run(_hammer(s.target, one, 200, 10)) == 50
                # Hung node: fast failures, then limiting resumes.
                nodes[1].pause()
                spread = _one_per_node([(0, 5460), (5461, 10922), (10923, 16383)])
                for _ in range(3):
                    code, elapsed = _decide_all(stub, spread)
                    assert code == grpc.StatusCode.UNAVAILABLE and elapsed < 0.05
                nodes[1].resume()
                wait_until(lambda: _decide_all(stub, spread)[0] == Code.OK, timeout=5,
                           what="decisions after the node resumed")
        finally:
            s.close()
    finally:
        for node in nodes:
            node.stop()


def _one_per_node(ranges: list[tuple[int, int]]) -> list[ratelimit_pb2.RateLimitDescriptor]:
    found: dict[int, ratelimit_pb2.RateLimitDescriptor] = {}
    while len(found) < len(ranges):
        d = descriptor(policy(), "100/Minute")
        limit = descriptors.parse("mesh", d, 1)
        assert isinstance(limit, descriptors.Limit)
        slot = key_slot(limit.key.encode())
        found.setdefault(next(i for i, (a, b) in enumerate(ranges) if a <= slot <= b), d)
    return list(found.values())


def _decide_all(stub: Any, ds: list[ratelimit_pb2.RateLimitDescriptor]) -> tuple[Any, float]:
    start = time.monotonic()
    try:
        result: Any = stub.ShouldRateLimit(request(*ds), timeout=2).overall_code
    except grpc.RpcError as e:
        result = e.code()
    return result, time.monotonic() - start


# -- Envoy's own rate limit filter as the client


def _envoy_config(port: int, admin: int, backend: int, rls: Path) -> dict[str, Any]:
    def cluster(name: str, address: dict[str, Any], h2: bool) -> dict[str, Any]:
        c: dict[str, Any] = {
            "name": name, "type": "STATIC", "connect_timeout": "0.25s",
            "load_assignment": {"cluster_name": name, "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": address}}]}]}}
        if h2:
            c["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/"
                             "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}}
        return c

    def key(k: str, v: str) -> dict[str, Any]:
        return {"generic_key": {"descriptor_key": k, "descriptor_value": v}}

    limits = [{"actions": [key("mesh.dev/policy", "test/envoy/global/0"),
                           {"request_headers": {"header_name": "x-user",
                                                "descriptor_key": "header:x-user"}},
                           key("mesh.dev/limit", "2/Minute")]}]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "test",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "backend",
                                                 "rate_limits": limits}}]}]},
        "http_filters": [
            {"name": "envoy.filters.http.ratelimit", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3."
                         "RateLimit",
                "domain": "mesh", "timeout": "0.05s", "failure_mode_deny": False,
                "rate_limit_service": {"transport_api_version": "V3", "grpc_service": {
                    "envoy_grpc": {"cluster_name": "rls"}}}}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3."
                         "Router"}}]}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "http", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm}]}]}],
            "clusters": [
                cluster("backend", {"socket_address": {"address": "127.0.0.1",
                                                       "port_value": backend}}, False),
                cluster("rls", {"pipe": {"path": str(rls)}}, True)]}}


def test_envoy_limits_through_the_service(redis: RedisProcess, echo_v1: EchoServer,
                                          tmp_path: Path) -> None:
    sock = tmp_path / "rls.sock"
    s = Service(f"unix://{sock}", redis.url).start()
    port, admin = free_port(), free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(_envoy_config(port, admin, echo_v1.port, sock)))
    envoy = subprocess.Popen([str(envoy_binary()), "-c", str(config), "--log-level", "warn",
                              "--disable-hot-restart"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: http_get(port, "/").status, timeout=10, what="envoy listening")
        user = uuid.uuid4().hex

        def get() -> Any:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/", headers={"x-user": user})
                r = conn.getresponse()
                r.read()
                return r.status, {k.lower(): v for k, v in r.getheaders()}
            finally:
                conn.close()

        assert [get()[0] for _ in range(2)] == [200, 200]
        status, hdrs = get()
        assert status == 429 and hdrs["retry-after"] == "60"
    finally:
        envoy.terminate()
        envoy.wait(10)
        s.close()


# -- parsing (no processes)


def test_redis_addresses() -> None:
    P = RedisAddress.parse
    assert P("redis://127.0.0.1:6379/2") == RedisAddress("direct", url="redis://127.0.0.1:6379/2")
    assert P("rediss://u:p@h:6380").kind == "direct"
    assert P("unix:///run/redis.sock").kind == "direct"
    s = P("redis-sentinel://u:s%40cret@10.0.0.1:26379,[fd00::1]:26380/mymaster/3")
    assert (s.kind, s.nodes, s.master, s.db, s.username, s.password) == (
        "sentinel", (("10.0.0.1", 26379), ("fd00::1", 26380)), "mymaster", 3, "u", "s@cret")
    assert P("redis-sentinel://h:1/m").db == 0
    c = P("redis-cluster://:pw@a:7000,b:7001")
    assert (c.kind, c.nodes, c.password, c.username) == (
        "cluster", (("a", 7000), ("b", 7001)), "pw", None)
    assert "pw" not in str(c) and "pw" not in repr(c)
    assert "secret" not in str(P("redis://u:secret@h:1"))
    for bad in ("localhost:6379", "http://h:1", "redis://", "unix://", "redis-sentinel://h:1",
                "redis-sentinel://h:1/m/x", "redis-sentinel://h/m", "redis-cluster://h:1/0",
                "redis-cluster://h:99999", "redis-cluster://"):
        with pytest.raises(ValueError):
            P(bad)


def test_descriptor_contract() -> None:
    def parse(d: Any, hits: int = 1) -> Any:
        return descriptors.parse("mesh", d, hits)

    a = parse(descriptor("ns/p/global/0", "100/Minute", ("remote_address", "1.2.3.4")))
    assert isinstance(a, descriptors.Limit)
    assert (a.requests, a.unit, a.window_us, a.shadow, a.hits) == (
        100, Code.RateLimit.MINUTE, 60_000_000, False, 1)
    assert a.key.startswith("mesh:rl:") and "1.2.3.4" not in a.key
    same = parse(descriptor("ns/p/global/0", "5/Minute", ("remote_address", "1.2.3.4"),
                            shadow=True))
    assert isinstance(same, descriptors.Limit) and same.key == a.key and same.shadow
    # Keys and values cannot run into each other.
    x = parse(descriptor("p", "1/Second", ("ab", "c")))
    y = parse(descriptor("p", "1/Second", ("a", "bc")))
    assert isinstance(x, descriptors.Limit) and isinstance(y, descriptors.Limit)
    assert x.key != y.key
    d = descriptor("p", "5/Second")
    d.hits_addend.value = 0
    z = parse(d, hits=3)
    assert isinstance(z, descriptors.Limit) and z.hits == 0
    capped = parse(descriptor("p", "5/Second"), hits=10**9)
    assert isinstance(capped, descriptors.Limit) and capped.hits == 6
    assert isinstance(parse(descriptor("p", "1/minute")), descriptors.Problem)
    assert isinstance(parse(descriptor("p", "+1/Minute")), descriptors.Problem)
    assert isinstance(parse(descriptor("p", "\u0661/Minute")), descriptors.Problem)


def test_the_service_ends_with_the_agent_that_started_it_even_when_killed(
        tmp_path: Path) -> None:
    """The agent starts the service with --parent-pid: an agent SIGKILLed (no chance to stop
    its child) must not leave the service running."""
    parent = subprocess.Popen([sys.executable, "-c", f"""
import os, subprocess, sys, time
p = subprocess.Popen([sys.executable, "-m", "mesh.ratelimit", "--listen",
                      "unix://{tmp_path}/rl.sock", "--redis", "redis://127.0.0.1:1",
                      "--parent-pid", str(os.getpid())])
print(p.pid, flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())

        def state() -> str:
            try:
                return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                return "gone"

        assert state() not in ("Z", "gone")
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        deadline = time.monotonic() + 10
        while state() not in ("Z", "gone") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state() in ("Z", "gone"), "the service outlived its agent"
    finally:
        parent.kill()
        parent.wait(5)
