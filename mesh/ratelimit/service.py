"""The rate limit service: `ShouldRateLimit` decided against the store, and `serve()`.

`Limiter` is the decision, independent of the transport: descriptors in (the contract of
descriptors.py), a RateLimitResponse out, or `Unavailable` when Redis cannot decide, which
the transport answers with gRPC UNAVAILABLE so that Envoy applies the limit's failure mode
(fail open or closed) at once instead of waiting out its 50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from mesh.ratelimit import h2grpc
from mesh.ratelimit.descriptors import Limit, Problem, ProblemLog, parse_request
from mesh.ratelimit.store import RedisAddress, Store, StoreConfig, Unavailable, Verdict
from meshxds.address import ListenAddress

log = logging.getLogger(__name__)

METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
SHADOW_HEADER = "x-ratelimit-shadow"
Transport = Literal["h2", "grpcio"]


class UnaryServer(Protocol):
    """What the "h2" transport runs: h2grpc.UnaryServer, or another server of the same
    contract (benchmarks/rls_load.py measures one on the `h2` library this way)."""

    async def start(self, address: ListenAddress) -> ListenAddress: ...

    async def stop(self, grace: float) -> None: ...


UnaryServerFactory = Callable[[Mapping[str, h2grpc.Handler]], UnaryServer]


@dataclass
class Stats:
    decisions: int = 0  # requests answered OK or OVER_LIMIT
    over_limit: int = 0  # requests denied
    shadow_would_limit: int = 0  # shadow descriptors that would have denied
    problems: int = 0  # descriptors answered OK for breaking the contract
    unavailable: int = 0  # requests answered UNAVAILABLE


class _ShadowLog:
    """A line per shadow limit that would deny, at most one a minute per limit (with how many
    since the last): the metric counts them all."""

    def __init__(self, every: float = 60.0, remember: int = 1024) -> None:
        self._every = every
        self._remember = remember
        self._last: dict[str, tuple[float, int]] = {}

    def report(self, policy: str) -> None:
        now = time.monotonic()
        last, count = self._last.get(policy, (-math.inf, 0))
        if now - last < self._every:
            self._last[policy] = (last, count + 1)
            return
        if len(self._last) >= self._remember:
            self._last.clear()
        self._last[policy] = (now, 0)
        log.info("shadow limit would deny", extra={"policy": policy,
                                                   "since_last_line": count + 1})


class Limiter:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.stats = Stats()
        self.problems = ProblemLog()
        self._shadow_log = _ShadowLog()

    def decide(self, request: Any) -> rls_pb2.RateLimitResponse | Awaitable[
            rls_pb2.RateLimitResponse]:
        """The answer, at once when no Redis is needed (no limits, or Redis down: then
        Unavailable), else an awaitable of it."""
        parsed = parse_request(request)
        limits = [x for x in parsed if isinstance(x, Limit)]
        for x in parsed:
            if isinstance(x, Problem):
                self.stats.problems += 1
                self.problems.report(x)
        if not limits:
            self.stats.decisions += 1
            return rls_pb2.RateLimitResponse(
                overall_code=OK, statuses=[rls_pb2.RateLimitResponse.DescriptorStatus(
                    code=OK) for _ in parsed])
        try:
            pending = self.store.decide(limits)
        except Unavailable:
            self.stats.unavailable += 1
            raise
        return self._finish(parsed, pending)

    async def _finish(self, parsed: list[Limit | Problem],
                      pending: Awaitable[tuple[bool, list[Verdict]]]
                      ) -> rls_pb2.RateLimitResponse:
        try:
            admitted, verdicts = await pending
        except Unavailable:
            self.stats.unavailable += 1
            raise
        return self._response(parsed, admitted, iter(verdicts))

    def _response(self, parsed: list[Limit | Problem], admitted: bool,
                  verdicts: Iterator[Verdict]) -> rls_pb2.RateLimitResponse:
        Status = rls_pb2.RateLimitResponse.DescriptorStatus
        resp = rls_pb2.RateLimitResponse(overall_code=OK if admitted else OVER_LIMIT)
        retry_ms = 0
        would_limit: list[str] = []
        for x in parsed:
            if isinstance(x, Problem):
                resp.statuses.append(Status(code=OK))
                continue
            v: Verdict = next(verdicts)
            denies = v.over and not x.shadow
            st = resp.statuses.add(code=OVER_LIMIT if denies else OK,
                                   limit_remaining=v.remaining)
            st.current_limit.requests_per_unit = x.requests
            st.current_limit.unit = x.unit
            st.current_limit.name = x.policy
            st.duration_until_reset.FromMilliseconds(v.reset_ms)
            if denies:
                retry_ms = max(retry_ms, v.reset_ms)
            elif v.over:
                would_limit.append(x.policy)
        self.stats.decisions += 1
        if not admitted:
            self.stats.over_limit += 1
            # Seconds, rounded up: a client retrying after it finds room.
            resp.response_headers_to_add.add(key="retry-after",
                                             value=str(max(1, math.ceil(retry_ms / 1000))))
        if would_limit:
            self.stats.shadow_would_limit += len(would_limit)
            resp.response_headers_to_add.add(key=SHADOW_HEADER, value="would-limit")
            for policy in would_limit:
                self._shadow_log.report(policy)
        return resp


class _Servicer(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    """The same decisions on grpcio's asyncio server (`--transport grpcio`)."""

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter

    async def ShouldRateLimit(self, request: Any, context: Any) -> Any:
        try:
            out = self._limiter.decide(request)
            return out if isinstance(out, rls_pb2.RateLimitResponse) else await out
        except Unavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))


def _h2_handler(limiter: Limiter) -> h2grpc.Handler:
    def handle(body: bytes) -> bytes | Awaitable[bytes]:
        try:
            request = rls_pb2.RateLimitRequest.FromString(body)
        except Exception as e:  # protobuf's DecodeError
            raise h2grpc.GrpcError(h2grpc.INVALID_ARGUMENT, "not a RateLimitRequest") from e
        try:
            out = limiter.decide(request)
        except Unavailable as e:
            raise h2grpc.GrpcError(h2grpc.UNAVAILABLE, str(e)) from None
        if isinstance(out, rls_pb2.RateLimitResponse):
            return bytes(out.SerializeToString())
        return _serialize(out)

    async def _serialize(out: Awaitable[rls_pb2.RateLimitResponse]) -> bytes:
        try:
            return (await out).SerializeToString()  # type: ignore[no-any-return]
        except Unavailable as e:
            raise h2grpc.GrpcError(h2grpc.UNAVAILABLE, str(e)) from None

    return handle


class _Listener:
    """The gRPC server of either transport, on a unix socket (mode 0600) or loopback."""

    def __init__(self, limiter: Limiter, address: ListenAddress, transport: Transport,
                 unary_server: UnaryServerFactory = h2grpc.UnaryServer) -> None:
        self.address = address
        self._transport = transport
        self._h2 = unary_server({METHOD: _h2_handler(limiter)})
        self._grpc: grpc.aio.Server | None = None
        self._limiter = limiter

    async def start(self) -> None:
        path = self.address.unix_path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._transport == "h2":
            self.address = await self._h2.start(self.address)
        else:
            server = grpc.aio.server()
            rls_pb2_grpc.add_RateLimitServiceServicer_to_server(_Servicer(self._limiter),
                                                                server)
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # left by a crashed predecessor
            port = server.add_insecure_port(self.address.grpc_target())
            await server.start()
            if path is not None:
                os.chmod(path, 0o600)
            else:
                self.address = ListenAddress(host=self.address.host, port=port)
            self._grpc = server
        log.info("rate limit service listening",
                 extra={"address": str(self.address), "transport": self._transport})

    async def stop(self, grace: float) -> None:
        if self._grpc is not None:
            await self._grpc.stop(grace)
        else:
            await self._h2.stop(grace)
        path = self.address.unix_path
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


async def _report(limiter: Limiter, every: float) -> None:
    last: dict[str, int] = {}
    while True:
        await asyncio.sleep(every)
        now = {**asdict(limiter.stats), **asdict(limiter.store.stats)}
        if now != last:
            log.debug("rate limit stats", extra=now)
            last = now


async def serve(listen: str, redis_url: str, redis_timeout: float = 0.020,
                redis_connect_timeout: float = 0.25, transport: Transport = "h2",
                grace: float = 2.0, stats_every: float = 60.0,
                started: Callable[[ListenAddress], None] | None = None,
                unary_server: UnaryServerFactory = h2grpc.UnaryServer) -> None:
    """Serve until cancelled or SIGTERM/SIGINT, then stop gracefully: refuse new calls,
    answer those in flight (within `grace` seconds), remove the socket."""
    address = ListenAddress.parse(listen)
    store = Store(RedisAddress.parse(redis_url),
                  StoreConfig(timeout=redis_timeout, connect_timeout=redis_connect_timeout))
    limiter = Limiter(store)
    listener = _Listener(limiter, address, transport, unary_server)
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    signals: list[signal.Signals] = []
    if me is not None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, me.cancel)
                signals.append(sig)
    store_task = asyncio.create_task(store.run(), name="ratelimit-store")
    report_task = asyncio.create_task(_report(limiter, stats_every), name="ratelimit-stats")
    try:
        await listener.start()
        if started is not None:
            started(listener.address)
        # Ends only if the store fails (a bug): then stop rather than answer UNAVAILABLE
        # forever. Shielded: a cancellation stops the listener first (below).
        await asyncio.shield(store_task)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        # Answer what is in flight before the store goes: the listener first.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(listener.stop(grace))
        for task in (report_task, store_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        log.info("rate limit service stopped",
                 extra={**asdict(limiter.stats), **asdict(store.stats)})


def run(listen: str, redis_url: str, **kwargs: Any) -> None:
    """`serve` in a new event loop, until a signal."""
    with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
        asyncio.run(serve(listen, redis_url, **kwargs))

