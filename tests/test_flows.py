"""Flows: the node's ring of the last flows and its followers (bounded: a slow follower loses
flows, counted and told where), and the L7 flows of a real Envoy's requests through the
agent's access log service (gRPC on a unix socket): method, path, status, latency, route,
upstream; a request Envoy answered itself (no route, no upstream) marked as such."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path

from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from mesh.echo import EchoServer
from mesh.flows.accesslog import AccessLogServer
from mesh.flows.model import ERROR, FORWARDED, L7, Endpoint, Flow
from mesh.flows.store import FlowStore, Lost
from mesh.sinks.envoy import resources as r
from mesh.sinks.envoy.listeners import flow_access_log
from meshxds.address import ListenAddress
from tests.testbed import Harness, http_get, wait_until


def flow(n: int) -> Flow:
    return Flow(float(n), "node1", L7, FORWARDED, Endpoint("10.0.0.1"), Endpoint("10.0.0.2", n),
                "TCP")


def test_the_ring_keeps_the_last_flows_and_a_slow_follower_loses_counted() -> None:
    async def scenario() -> tuple[list[object], int, int]:
        store = FlowStore(capacity=5, follower_queue=3)
        for n in range(8):
            store.add(flow(n))
        assert [f.time for f in store.last()] == [3, 4, 5, 6, 7] and store.seen == 8
        assert [f.time for f in store.last(2, lambda f: f.destination.port % 2 == 0)] == [4, 6]
        got: list[object] = []
        follow = store.follow(number=2)
        got += [await anext(follow), await anext(follow)]  # the ring's last two
        for n in range(8, 14):  # six new ones; the follower's queue holds three
            store.add(flow(n))
        for _ in range(3):
            got.append(await anext(follow))
        store.add(flow(14))  # room again: first the gap is told, then the flow
        got += [await anext(follow), await anext(follow)]
        await follow.aclose()
        store.add(flow(15))  # no follower left: nothing counted lost
        return got, store.lost, store.seen

    got, lost, seen = asyncio.run(scenario())
    times = [g.time if isinstance(g, Flow) else g for g in got]
    assert times == [6, 7, 8, 9, 10, Lost(3), 14]
    assert (lost, seen) == (3, 16)


def _listener(port: int) -> listener_pb2.Listener:
    """The test config's listener with the agent's flow access log, as every HTTP connection
    manager the agent makes has it."""
    listener = r.http_listener("http", "127.0.0.1", port, "rc")
    f = listener.filter_chains[0].filters[0]
    hcm = hcm_pb2.HttpConnectionManager()
    f.typed_config.Unpack(hcm)
    hcm.access_log.append(flow_access_log())
    f.typed_config.Pack(hcm)
    return listener


def test_envoys_requests_become_l7_flows(harness: Harness, echo_v1: EchoServer,
                                         free_port: int) -> None:
    store = FlowStore()
    socket = harness.dir / "accesslog.sock"
    server = AccessLogServer(socket, store, "node1")
    task = harness.sync(lambda: asyncio.ensure_future(server.run()))
    harness.call(server.ready.wait())
    assert stat.S_IMODE(os.stat(socket).st_mode) == 0o600
    dead = free_port + 1 if free_port < 65000 else free_port - 1
    harness.set_snapshot("node1", [
        r.eds_cluster("v1"), r.load_assignment("v1", [("127.0.0.1", echo_v1.port)]),
        r.eds_cluster("dead"), r.load_assignment("dead", [("127.0.0.1", dead)]),
        _listener(free_port),
        r.route_configuration("rc", [r.virtual_host("all", ["*"], [
            r.prefix_route("/gone", "dead", name="to-dead"),
            r.prefix_route("/", "v1", name="to-v1")])])])
    harness.start_envoy(accesslog=ListenAddress(unix_path=Path(socket)))
    harness.wait_settled()
    try:
        assert http_get(free_port, "/hello?x=1", host="shop.example").status == 200
        assert http_get(free_port, "/gone").status == 503
        wait_until(lambda: len(store) >= 2, timeout=10)
        ok, failed = harness.sync(lambda: store.last())
        assert ok.kind == L7 and ok.verdict == FORWARDED and ok.node == "node1"
        assert ok.source.ip == "127.0.0.1" and ok.source.port > 0
        assert (ok.destination.ip, ok.destination.port) == ("127.0.0.1", echo_v1.port)
        assert ok.http is not None and failed.http is not None
        assert (ok.http.method, ok.http.path, ok.http.host, ok.http.status) == (
            "GET", "/hello?x=1", "shop.example", 200)
        assert (ok.http.route, ok.http.upstream_cluster, ok.http.protocol) == (
            "to-v1", "v1", "HTTP/1.1")
        assert ok.http.latency_ms > 0 and ok.http.details == "via_upstream"
        # Envoy answered for the upstream that was not there
        assert failed.verdict == ERROR and failed.http.status == 503
        assert failed.http.route == "to-dead" and failed.destination.port in (dead, free_port)
        assert server.entries == 2
    finally:
        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        harness.call(stop)
