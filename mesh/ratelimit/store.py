"""The Redis side: where the counters live, the sliding window script, auto-pipelining and
failing fast.

Every decision is one call of `sliding_window.lua` (atomic in Redis, one round trip). Calls
made while the event loop is busy wait in `pending`; the store's batcher task sends all of
them in one write and reads their replies in order (one batch in flight at a time), so
under load a round trip and a syscall serve many decisions.

Failing fast: Envoy gives a decision 50 ms, then applies the limit's failure mode. A batch
that Redis does not answer within `timeout` fails with every decision waiting behind it,
and the store is *down*: decisions fail at once, without trying Redis, while the batcher
probes it (first after `down_for`, then every `down_for`). Decisions never wait for a
connect: connecting is the probe's business, so its timeout may be longer.

Redis Cluster: the keys of one request may live in different slots, and a script may only
touch keys of one slot; the descriptors are grouped by slot and each group is one call.
Then a denial in one group does not stop counting in another (within a group, as with a
single server, a denied request consumes nothing).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, Protocol
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError, ResponseError

from mesh.ratelimit.descriptors import Limit

log = logging.getLogger(__name__)

SCRIPT = resources.files("mesh.ratelimit").joinpath("sliding_window.lua").read_bytes()
SCRIPT_SHA = hashlib.sha1(SCRIPT).hexdigest()


class Unavailable(Exception):
    """Redis cannot decide now: the caller answers UNAVAILABLE, Envoy's failure mode decides."""


# A timer this late means the event loop was stalled (epoll's resolution is 1 ms).
_STALL = 0.003
# Failures that mean "Redis is not answering", as opposed to one call's error reply.
_DOWN_ERRORS = (RedisError, OSError, TimeoutError, EOFError)


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is: `redis://host:port[/db]`, `rediss://...` (TLS), `unix:///path`,
    `redis-sentinel://host:port[,host:port...]/<master>[/db]` or
    `redis-cluster://host:port[,host:port...]`; user and password as `user:pass@` before
    the host(s). For sentinel they are the master's."""

    kind: Literal["direct", "sentinel", "cluster"]
    url: str = ""  # direct: as redis-py's from_url takes it
    nodes: tuple[tuple[str, int], ...] = ()  # sentinels, or the cluster's startup nodes
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, text: str) -> RedisAddress:
        scheme, sep, rest = text.partition("://")
        if not sep:
            raise ValueError(f"expected a redis:// (or rediss, unix, redis-sentinel, "
                             f"redis-cluster) URL, got {_redact(text)!r}")
        if scheme in ("redis", "rediss", "unix"):
            # redis-py parses these itself; check only what it would accept silently.
            if scheme != "unix" and not rest.split("/", 1)[0].rpartition("@")[2]:
                raise ValueError(f"no host in {_redact(text)!r}")
            if scheme == "unix" and "/" not in rest.rpartition("@")[2]:
                raise ValueError(f"no socket path in {_redact(text)!r}")
            return cls("direct", url=text)
        if scheme not in ("redis-sentinel", "redis-cluster"):
            raise ValueError(f"unknown scheme {scheme!r} in {_redact(text)!r}")
        netloc, _, path = rest.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        username = password = None
        if at:
            user, colon, pw = userinfo.partition(":")
            username, password = (unquote(user) or None), (unquote(pw) if colon else None)
        nodes = tuple(_host_port(h, text) for h in hosts.split(","))
        parts = [p for p in path.split("/") if p]
        if scheme == "redis-cluster":
            if parts:
                raise ValueError(f"a cluster URL has no path (db 0 only): {_redact(text)!r}")
            return cls("cluster", nodes=nodes, username=username, password=password)
        if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise ValueError(f"expected redis-sentinel://host:port[,...]/<master>[/db], got "
                             f"{_redact(text)!r}")
        return cls("sentinel", nodes=nodes, master=unquote(parts[0]),
                   db=int(parts[1]) if len(parts) == 2 else 0, username=username,
                   password=password)

    def __str__(self) -> str:
        if self.kind == "direct":
            return _redact(self.url)
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes)
        if self.kind == "cluster":
            return f"redis-cluster://{hosts}"
        return f"redis-sentinel://{hosts}/{self.master}/{self.db}"


def _host_port(text: str, url: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if host.startswith("[") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r} in {_redact(url)!r}")
    return host, int(port)


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{hosts}{slash}{path}"


@dataclass(frozen=True)
class StoreConfig:
    timeout: float = 0.020  # a batch's round trip; beyond it the batch fails, Redis is down
    connect_timeout: float = 0.25  # the probe's connect (decisions never wait for one)
    down_for: float = 0.25  # after a failure: decisions fail at once, then a probe


@dataclass
class StoreStats:
    batches: int = 0
    calls: int = 0
    max_batch: int = 0
    redis_errors: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    over: bool  # this descriptor has no room for its hits
    remaining: int  # after this request
    reset_ms: int  # until a slot frees (over: until the hits fit)


def _pack(args: Sequence[bytes | str | int]) -> bytes:
    # RESP by hand: redis-py's packer is several times slower, and this is per decision.
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        raw = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


@dataclass(slots=True)
class _Call:
    keys: list[str]
    args: list[int]

    def command(self) -> list[bytes | str | int]:
        return ["EVALSHA", SCRIPT_SHA, len(self.keys), *self.keys, *self.args]


class _Backend(Protocol):
    async def connect(self) -> None:
        """Connect (again) and make sure the script is loaded."""

    async def execute(self, calls: list[_Call], reload: bool = True) -> list[Any]:
        """Each call's reply, or its error reply as an exception; raises if Redis fails."""

    async def close(self) -> None: ...


def _common_kwargs(cfg: StoreConfig) -> dict[str, Any]:
    return {
        # No socket timeout of redis-py's: the batcher bounds each batch as a whole.
        "socket_timeout": None,
        "socket_connect_timeout": cfg.connect_timeout,
        # No retries: a failed batch is failed at once, and the probe reconnects.
        "retry": Retry(NoBackoff(), 0),
        "protocol": 2,
        "client_name": "mesh-ratelimit",
    }


class _Direct:
    """One connection (to one server, or to the master sentinels name), pipelined."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._conn: Any = None

    async def connect(self) -> None:
        await self.close()
        conn = self._client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        self._conn = conn
        await conn.connect()
        await self._load()

    async def _load(self) -> None:
        await self._conn.send_command("SCRIPT", "LOAD", SCRIPT)
        sha = await self._conn.read_response()
        if sha.decode() != SCRIPT_SHA:
            raise RedisError(f"SCRIPT LOAD answered {sha!r}, expected {SCRIPT_SHA}")

    async def execute(self, calls: list[_Call], reload: bool = True) -> list[Any]:
        conn = self._conn
        if conn is None:
            raise RedisError("not connected")
        await conn.send_packed_command(b"".join(_pack(c.command()) for c in calls),
                                       check_health=False)
        replies: list[Any] = []
        for _ in calls:
            try:
                replies.append(await conn.read_response())
            except ResponseError as e:  # one call's error reply; the stream is intact
                replies.append(e)
        again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if again and reload:  # Redis restarted or SCRIPT FLUSH: load it, try those again
            await self._load()
            for i, reply in zip(again, await self.execute([calls[i] for i in again], False),
                                strict=True):
                replies[i] = reply
        return replies

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.disconnect(nowait=True)


class _Cluster:
    """Redis Cluster through redis-py's cluster pipeline (it routes by slot, follows MOVED
    and ASK, and reconnects)."""

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster

    async def connect(self) -> None:
        await self._cluster.initialize()
        await self._cluster.script_load(SCRIPT)  # on every primary

    async def execute(self, calls: list[_Call], reload: bool = True) -> list[Any]:
        pipe = self._cluster.pipeline(transaction=False)
        for c in calls:
            pipe.execute_command(*c.command())
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        for r in replies:
            if isinstance(r, Exception) and not isinstance(r, ResponseError):
                raise r  # a node failed, not one call
        again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if again and reload:  # a new primary (failover, resharding) without the script
            await self._cluster.script_load(SCRIPT)
            for i, reply in zip(again, await self.execute([calls[i] for i in again], False),
                                strict=True):
                replies[i] = reply
        return replies

    async def close(self) -> None:
        await self._cluster.aclose()


def _backend(address: RedisAddress, cfg: StoreConfig) -> _Backend:
    kwargs = _common_kwargs(cfg)
    if address.kind == "direct":
        return _Direct(aioredis.Redis.from_url(address.url, **kwargs))
    auth: dict[str, Any] = {"username": address.username, "password": address.password}
    if address.kind == "sentinel":
        sentinel = Sentinel(list(address.nodes), sentinel_kwargs={
            "socket_timeout": cfg.connect_timeout,
            "socket_connect_timeout": cfg.connect_timeout}, **kwargs)
        return _Direct(sentinel.master_for(address.master, db=address.db, **auth))
    nodes = [ClusterNode(h, p) for h, p in address.nodes]
    return _Cluster(RedisCluster(startup_nodes=nodes, **kwargs, **auth))


class _Deadline:
    """Expires `timeout` at `when`, but not for the event loop's own delay: a timer that
    fires late means the loop was held up (a long callback, the collector), and the replies
    may be in the socket already, their reader scheduled behind the timer; then they get
    one more turn of the loop."""

    def __init__(self, timeout: asyncio.Timeout, when: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._active = True
        self._handle: asyncio.Handle = self._loop.call_at(when, self._fire, when)

    def _fire(self, when: float) -> None:
        if self._loop.time() - when > _STALL:
            self._handle = self._loop.call_soon(self._expire)
        else:
            self._expire()

    def _expire(self) -> None:
        if self._active:
            self._timeout.reschedule(self._loop.time())

    def cancel(self) -> None:
        self._active = False
        self._handle.cancel()


class Store:
    """The counters. `run` is the batcher (and, while Redis is down, the probe): the one
    task that talks to Redis; `decide` may be called by any number of requests at once."""

    def __init__(self, address: RedisAddress, cfg: StoreConfig | None = None) -> None:
        self.address = address
        self.cfg = cfg or StoreConfig()
        self.stats = StoreStats()
        self._backend = _backend(address, self.cfg)
        self._cluster = address.kind == "cluster"
        self._pending: list[tuple[_Call, asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._up = False

    @property
    def up(self) -> bool:
        return self._up

    async def run(self) -> None:
        try:
            await self._probe(first=True)
            while True:
                await self._wake.wait()
                self._wake.clear()
                batch, self._pending = self._pending, []
                if batch and not await self._send(batch):
                    await self._probe()
        finally:
            self._up = False
            self._fail_pending(Unavailable("the rate limit service is stopping"))
            await self._backend.close()

    async def _send(self, batch: list[tuple[_Call, asyncio.Future[Any]]]) -> bool:
        self.stats.batches += 1
        self.stats.calls += len(batch)
        self.stats.max_batch = max(self.stats.max_batch, len(batch))
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as timeout:
                deadline = _Deadline(timeout, loop.time() + self.cfg.timeout)
                try:
                    replies = await self._backend.execute([call for call, _ in batch])
                finally:
                    deadline.cancel()
        except _DOWN_ERRORS as e:
            self._went_down(e)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(Unavailable(f"redis: {e or type(e).__name__}"))
            return False
        for (_, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue  # its request went away
            if isinstance(reply, Exception):
                self.stats.redis_errors += 1
                fut.set_exception(Unavailable(f"redis: {reply}"))
            else:
                fut.set_result(reply)
        return True

    def _went_down(self, error: BaseException) -> None:
        self._up = False
        self.stats.redis_errors += 1
        log.warning("redis not answering: decisions fail until it does",
                    extra={"redis": str(self.address), "error": str(error) or
                           type(error).__name__})
        self._fail_pending(Unavailable("redis is down"))

    def _fail_pending(self, error: Unavailable) -> None:
        pending, self._pending = self._pending, []
        for _, fut in pending:
            if not fut.done():
                fut.set_exception(error)

    async def _probe(self, first: bool = False) -> None:
        """Return once Redis answers (connected, script loaded)."""
        started = time.monotonic()
        attempts = 0
        while True:
            if not first:
                await asyncio.sleep(self.cfg.down_for)
            first = False
            try:
                async with asyncio.timeout(self.cfg.connect_timeout):
                    await self._backend.connect()
            except _DOWN_ERRORS as e:
                # After a failure the warning is said; at the start, say it once here.
                (log.warning if attempts == 0 and not self.stats.batches else log.debug)(
                    "redis not reachable: decisions fail until it is", extra={
                        "redis": str(self.address), "error": str(e) or type(e).__name__})
                attempts += 1
                continue
            self._up = True
            log.info("redis answering", extra={
                "redis": str(self.address),
                "after_s": round(time.monotonic() - started, 3)})
            return

    def decide(self, limits: Sequence[Limit]) -> Awaitable[tuple[bool, list[Verdict]]]:
        """Whether the request is admitted, and each limit's verdict. Raises Unavailable
        (at once when Redis is down, or once its batch failed)."""
        if not self._up:
            raise Unavailable("redis is down")
        if not self._cluster:
            return self._one(limits, self._submit(limits))
        groups: dict[int, list[int]] = {}
        for i, limit in enumerate(limits):
            groups.setdefault(key_slot(limit.key.encode()), []).append(i)
        return self._groups(limits, [(idx, self._submit([limits[i] for i in idx]))
                                     for idx in groups.values()])

    def _submit(self, limits: Sequence[Limit]) -> asyncio.Future[Any]:
        args: list[int] = []
        for x in limits:
            args += (x.requests, x.window_us, 1 if x.shadow else 0, x.hits)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((_Call([x.key for x in limits], args), fut))
        self._wake.set()
        return fut

    @staticmethod
    def _verdicts(reply: list[int]) -> list[Verdict]:
        return [Verdict(reply[i] == 1, reply[i + 1], reply[i + 2])
                for i in range(1, len(reply), 3)]

    async def _one(self, limits: Sequence[Limit],
                   fut: asyncio.Future[Any]) -> tuple[bool, list[Verdict]]:
        reply = await fut
        return reply[0] == 1, self._verdicts(reply)

    async def _groups(self, limits: Sequence[Limit],
                      futs: list[tuple[list[int], asyncio.Future[Any]]]
                      ) -> tuple[bool, list[Verdict]]:
        verdicts: list[Verdict | None] = [None] * len(limits)
        admitted = True
        replies = await asyncio.gather(*(fut for _, fut in futs))
        for (idx, _), reply in zip(futs, replies, strict=True):
            admitted = admitted and reply[0] == 1
            for i, v in zip(idx, self._verdicts(reply), strict=True):
                verdicts[i] = v
        return admitted, [v for v in verdicts if v is not None]
