"""Global rate limits end to end: two agents, two Envoys, each node's rate limit service, one
real redis-server. One limit shared by both Envoys admits exactly the limit; with Redis stopped,
fail-open and fail-closed limits are each decided within the filter's timeout; with Redis
back, limiting resumes without a restart.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.manifests import docs
from tests.meshrun import MeshRun
from tests.test_policies import service
from tests.test_ratelimit_service import RedisProcess
from tests.testbed import Reply, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (make install installs it from Debian)")]
ADDRESSES = ("127.5.5.1", "127.5.5.2")
PORT = 8080


def manifests(directory: Path, address: str, port: int) -> None:
    directory.mkdir()
    (directory / "all.yaml").write_text(docs(
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
         "metadata": {"name": "mesh"}, "spec": {"controllerName": "mesh.dev/gateway-controller"}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "gw", "namespace": "default"},
         "spec": {"gatewayClassName": "mesh",
                  "addresses": [{"type": "IPAddress", "value": address}],
                  "listeners": [{"name": "http", "port": PORT, "protocol": "HTTP"}]}},
        *(doc for name, requests, mode in (
            ("shared", 20, "Open"), ("open", 100_000, "Open"), ("closed", 100_000, "Closed"))
          for doc in route_and_policy(name, requests, mode))
    ) + "\n---\n" + service("one", [port]))


def route_and_policy(name: str, requests: int, mode: str) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
         "metadata": {"name": name, "namespace": "default"},
         "spec": {"parentRefs": [{"name": "gw"}], "hostnames": [f"{name}.example"],
                  "rules": [{"backendRefs": [{"name": "one", "port": 80}]}]}},
        {"apiVersion": "mesh.dev/v1alpha1", "kind": "TrafficPolicy",
         "metadata": {"name": name, "namespace": "default"},
         "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                  "name": name}],
                  "rateLimit": {"global": {"failureMode": mode, "rules": [
                      {"limit": {"requests": requests, "unit": "Hour"}}]}}}}]


def get(address: str, host: str) -> Reply:
    import http.client
    conn = http.client.HTTPConnection(address, PORT, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        return Reply(resp.status, resp.read().decode(),
                     {k.lower(): v for k, v in resp.getheaders()})
    finally:
        conn.close()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[RedisProcess, list[MeshRun]]]:
    from mesh.echo import EchoIdentity, EchoServer

    tmp = tmp_path_factory.mktemp("global")
    redis = RedisProcess(tmp / "redis").start()
    echo = EchoServer("127.0.0.1", 0, EchoIdentity(pod="echo")).start()
    agents: list[MeshRun] = []
    try:
        for i, address in enumerate(ADDRESSES):
            manifests(tmp / f"node{i}", address, echo.port)
            agents.append(MeshRun(tmp / f"node{i}", Path(f"/tmp/mesh-rl{i}-{os.getpid()}"),
                                      "--ratelimit-redis", redis.url))
        for address in ADDRESSES:
            wait_until(lambda a=address: get(a, "shared.example").headers.get(  # type: ignore[misc]
                "x-ratelimit-limit"), timeout=20, what="the global limit on both nodes")
        yield redis, agents
    finally:
        logs = [a.stop() for a in agents]
        redis.stop()
        echo.stop()
    for log in logs:
        assert "Traceback" not in log, log


def test_one_limit_shared_by_two_envoys_admits_exactly_the_limit(
        nodes: tuple[RedisProcess, list[MeshRun]]) -> None:
    # The fixture's probes used some of the 20: count what is left, then hammer.
    left = int(get(ADDRESSES[0], "shared.example").headers["x-ratelimit-remaining"])
    statuses: list[int] = []
    lock = threading.Lock()

    def hammer(address: str) -> None:
        for _ in range(20):
            status = get(address, "shared.example").status
            with lock:
                statuses.append(status)

    threads = [threading.Thread(target=hammer, args=(a,)) for a in ADDRESSES for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(statuses) == 80
    assert statuses.count(200) == left, statuses
    assert statuses.count(429) == 80 - left


def test_redis_down_fail_open_and_closed_decide_within_the_timeout_and_resume(
        nodes: tuple[RedisProcess, list[MeshRun]]) -> None:
    redis, _ = nodes
    address = ADDRESSES[0]
    assert get(address, "closed.example").status == 200
    redis.stop()
    try:
        for host, expected in (("open.example", 200), ("closed.example", 503)):
            for _ in range(5):
                started = time.monotonic()
                status = get(address, host).status
                elapsed = time.monotonic() - started
                assert status == expected, (host, status)
                # The filter's timeout is 50 ms; the service answers at once without Redis.
                assert elapsed < 0.25, (host, elapsed)
        assert get(address, "shared.example").status == 200  # fail-open: let through
    finally:
        redis.start()
    # Counters are gone with Redis (no persistence): the limit starts afresh and applies.
    wait_until(lambda: get(address, "closed.example").status == 200, timeout=10,
               what="limiting to resume")
    statuses = [get(address, "shared.example").status for _ in range(25)]
    assert statuses.count(200) == 20 and statuses[-1] == 429, statuses
