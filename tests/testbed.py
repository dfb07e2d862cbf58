"""Test bed: a real xDS server and real Envoys on an event loop in a background thread.

Tests stay synchronous (plain HTTP clients, load threads) and call into the loop with
`Harness.call`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message

from mesh.envoy.bootstrap import NO_ACCESSLOG, BootstrapConfig, Protocol
from mesh.envoy.supervisor import Backoff, EnvoySupervisor
from meshxds.acks import ResourceStatus
from meshxds.address import ListenAddress
from meshxds.cache import Resource, SnapshotCache
from meshxds.server import XdsServer

T = TypeVar("T")


def free_port() -> int:
    """A loopback TCP port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # the thing polled may not be up yet
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_error!r})" if last_error else ""))


@dataclass
class Reply:
    status: int
    body: str
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def http_get(port: int, path: str = "/", host: str = "example.com", timeout: float = 5.0,
             address: str = "127.0.0.1") -> Reply:
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return Reply(resp.status, resp.read().decode(), headers)
    finally:
        conn.close()


@dataclass
class LoadResult:
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


class SteadyLoad:
    """Requests in a loop from a few threads on keep-alive connections, until stopped."""

    def __init__(self, port: int, path: str = "/", threads: int = 2, interval: float = 0.005,
                 max_seconds: float = 60.0) -> None:
        self.port, self.path, self.interval, self.max_seconds = port, path, interval, max_seconds
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn.request("GET", self.path, headers={"Host": "example.com"})
                resp = conn.getresponse()
                resp.read()
                good = resp.status == 200
                error = "" if good else f"HTTP {resp.status}"
            except (OSError, http.client.HTTPException) as e:
                good, error = False, repr(e)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            with self._lock:
                if good:
                    self.result.ok += 1
                else:
                    self.result.failed += 1
                    self.result.errors.append(error)
            time.sleep(self.interval)
        conn.close()

    def __enter__(self) -> SteadyLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


class Harness:
    def __init__(self) -> None:
        # Short paths: unix socket paths are limited to 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="mesh-test-"))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="harness-loop",
                                        daemon=True)
        self._thread.start()
        self.cache = SnapshotCache()
        self.server: XdsServer | None = None
        self.envoys: list[EnvoySupervisor] = []
        self.address = ListenAddress.parse(f"unix:{self.dir}/xds.sock")

    def call(self, fn: Callable[[], Awaitable[T]] | Awaitable[T], timeout: float = 30) -> T:
        async def run() -> T:
            return await (fn() if callable(fn) else fn)

        fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return fut.result(timeout)

    def sync(self, fn: Callable[[], T]) -> T:
        """Run a plain function on the loop thread (the cache is not thread-safe)."""
        async def run() -> T:
            return fn()

        return self.call(run)

    def start_server(self, cache: SnapshotCache | None = None) -> XdsServer:
        if cache is not None:
            self.cache = cache
        self.server = XdsServer(self.cache, self.address)
        self.call(self.server.start())
        return self.server

    def stop_server(self) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace=0))
            self.server = None

    def start_envoy(self, node_id: str = "node1", protocol: Protocol = "delta",
                    wait_ready: bool = True, accesslog: ListenAddress | None = None
                    ) -> EnvoySupervisor:
        d = self.dir / node_id
        sup = EnvoySupervisor(
            BootstrapConfig(node_id=node_id, xds=self.address,
                            admin=ListenAddress.parse(f"unix:{d}/admin.sock"), protocol=protocol,
                            accesslog=accesslog or NO_ACCESSLOG),
            d, log_level="warning", backoff=Backoff(initial=0.05, maximum=1.0),
        )
        self.sync(sup.start)
        self.envoys.append(sup)
        if wait_ready:
            self.call(sup.wait_ready(timeout=15))
        return sup

    def set_snapshot(self, node_id: str, resources: Iterable[Message | Resource]) -> list[str]:
        rs = list(resources)
        return self.sync(lambda: self.cache.set_snapshot(node_id, rs))

    def wait_settled(self, node_id: str = "node1", timeout: float = 10.0) -> None:
        async def settled() -> None:
            async with asyncio.timeout(timeout):
                await self.cache.node(node_id).wait_settled()

        self.call(settled, timeout=timeout + 5)

    def status(self, node_id: str = "node1") -> dict[tuple[str, str], ResourceStatus]:
        return {(s.type_url, s.name): s for s in self.sync(lambda: self.cache.status(node_id))}

    def close(self) -> None:
        for sup in self.envoys:
            self.call(sup.stop())
        self.stop_server()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)
