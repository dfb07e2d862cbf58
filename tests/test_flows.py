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


def serve_two_routes(harness: Harness, echo_port: int, port: int, accesslog: Path) -> int:
    """A real Envoy logging to `accesslog`, listening on `port`: `/gone` to a backend nobody
    listens on (its port returned), the rest to the echo server."""
    dead = port + 1 if port < 65000 else port - 1
    harness.set_snapshot("node1", [
        r.eds_cluster("v1"), r.load_assignment("v1", [("127.0.0.1", echo_port)]),
        r.eds_cluster("dead"), r.load_assignment("dead", [("127.0.0.1", dead)]),
        _listener(port),
        r.route_configuration("rc", [r.virtual_host("all", ["*"], [
            r.prefix_route("/gone", "dead", name="to-dead"),
            r.prefix_route("/", "v1", name="to-v1")])])])
    harness.start_envoy(accesslog=ListenAddress(unix_path=accesslog))
    harness.wait_settled()
    return dead


def test_envoys_requests_become_l7_flows(harness: Harness, echo_v1: EchoServer,
                                         free_port: int) -> None:
    store = FlowStore()
    socket = harness.dir / "accesslog.sock"
    server = AccessLogServer(socket, store, "node1")
    task = harness.sync(lambda: asyncio.ensure_future(server.run()))
    harness.call(server.ready.wait())
    assert stat.S_IMODE(os.stat(socket).st_mode) == 0o600
    dead = serve_two_routes(harness, echo_v1.port, free_port, socket)
    try:
        assert http_get(free_port, "/hello?x=1", host="shop.example").status == 200
        assert http_get(free_port, "/gone").status == 503
        wait_until(lambda: len(store) >= 2, timeout=10)
        # each of Envoy's workers streams its own entries: they may arrive in either order
        by_path = {f.http.path: f for f in harness.sync(lambda: store.last()) if f.http}
        ok, failed = by_path["/hello?x=1"], by_path["/gone"]
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


def test_the_ends_are_named_from_the_clusters_pods_and_services() -> None:
    from mesh import ir
    from mesh.flows.directory import FlowDirectory
    from mesh.store.objects import parse_object
    from mesh.store.store import Store
    from mesh.translate.directory import translate_directory

    def pod(name: str, ip: str, phase: str = "Running", **labels: object) -> dict[str, object]:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "shop", "labels": labels},
                "spec": {"nodeName": "node2"},
                "status": {"phase": phase, "podIPs": [{"ip": ip}]}}

    store = Store()
    store.replace("test", [parse_object(o) for o in (
        pod("web-1", "10.244.1.5", app="web", tier="front"),
        pod("old", "10.244.1.9", "Succeeded", app="web"),  # done: its address is free
        pod("odd", "10.244.1.7", app=7),  # a label that is not a string: left out
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web",
                                                             "namespace": "shop"},
         "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "not-an-ip"]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "headless",
                                                             "namespace": "shop"},
         "spec": {"clusterIP": "None"}})])
    directory = translate_directory(store.snapshot())
    assert directory == ir.Directory(
        (ir.DirectoryPod("10.244.1.5", "shop", "web-1", ("app=web", "tier=front"), "node2",
                         "web-1", "Pod"),
         ir.DirectoryPod("10.244.1.7", "shop", "odd", (), "node2", "odd", "Pod")),
        (ir.DirectoryService("10.96.0.20", "shop", "web"),))
    names = FlowDirectory()
    names.apply(ir.IR(directory=directory,
                      identities=ir.IdentityMap(endpoints=(("10.244.1.5", 4711),))))
    assert names.endpoint("10.244.1.5", 8080) == Endpoint(
        "10.244.1.5", 8080, "shop", "web-1", ("app=web", "tier=front"), 4711, node="node2",
        workload="web-1", workload_kind="Pod")
    assert names.endpoint("10.96.0.20", 80) == Endpoint("10.96.0.20", 80, service="shop/web")
    assert names.endpoint("192.0.2.1") == Endpoint("192.0.2.1")
    assert names.service("10.96.0.20") == "shop/web" and names.service("10.244.1.5") == ""
    # an entry of Envoy's, as the access log service gets it: a client pod's request to the
    # Service's ClusterIP, which Envoy sent to web-1
    from envoy.data.accesslog.v3 import accesslog_pb2

    from mesh.flows.accesslog import http_flow

    entry = accesslog_pb2.HTTPAccessLogEntry()
    common = entry.common_properties
    common.downstream_remote_address.socket_address.address = "10.244.0.8"
    common.downstream_remote_address.socket_address.port_value = 40000
    common.downstream_local_address.socket_address.address = "10.96.0.20"
    common.downstream_local_address.socket_address.port_value = 80
    common.upstream_remote_address.socket_address.address = "10.244.1.5"
    common.upstream_remote_address.socket_address.port_value = 8080
    entry.request.request_method = 1  # GET
    entry.request.path = "/cart"
    entry.response.response_code.value = 403
    entry.response.response_code_details = "rbac_access_denied_matched_policy[none]"
    got = http_flow(entry, "node1", names)
    assert got.source == Endpoint("10.244.0.8", 40000)  # not in the directory
    assert got.destination == Endpoint("10.244.1.5", 8080, "shop", "web-1",
                                       ("app=web", "tier=front"), 4711, "shop/web", "node2",
                                       "web-1", "Pod")
    assert (got.verdict, got.drop_reason) == ("DROPPED", "POLICY_DENIED")
    assert got.http is not None and (got.http.method, got.http.path) == ("GET", "/cart")


def test_a_request_is_joined_to_its_connection() -> None:
    """The datapath's events of a connection handed to Envoy (client to a ClusterIP) and the
    requests Envoy logged on it carry one connection id, also in Hubble's flow (its
    extensions); a request on a connection the datapath never saw carries none."""
    from envoy.data.accesslog.v3 import accesslog_pb2
    from google.protobuf.struct_pb2 import Struct

    from mesh.datapath.flowevents import FlowEvent
    from mesh.datapath.layout import FLOW_CLOSED, FLOW_NEW
    from mesh.flows.accesslog import http_flow
    from mesh.flows.connections import Connections
    from mesh.flows.datapath import event_flows
    from mesh.hubble.convert import to_proto

    connections = Connections()

    def event(type_: int, sport: int = 40000) -> Flow:
        ev = FlowEvent(time_ns=1, saddr="10.244.0.8", daddr="10.96.0.20", sport=sport,
                       dport=80, proto=6, packets=(1, 0), bytes=(60, 0), ifindex=3,
                       type=type_, verdict=5, reason=0, point=1, is_reply=False,
                       tcp_flags=0x02)
        (flow,) = event_flows(ev, "node1", None, lambda _a: True, 0.0, connections)
        return flow

    def request(sport: int = 40000) -> Flow:
        entry = accesslog_pb2.HTTPAccessLogEntry()
        common = entry.common_properties
        common.downstream_remote_address.socket_address.address = "10.244.0.8"
        common.downstream_remote_address.socket_address.port_value = sport
        common.downstream_local_address.socket_address.address = "10.96.0.20"
        common.downstream_local_address.socket_address.port_value = 80
        entry.response.response_code.value = 200
        return http_flow(entry, "node1", None, connections)

    opened = event(FLOW_NEW)
    first, second = request(), request()
    closed = event(FLOW_CLOSED)
    assert opened.connection_id and len({opened.connection_id, first.connection_id,
                                         second.connection_id, closed.connection_id}) == 1
    assert len({opened.id, first.id, second.id, closed.id}) == 4  # each flow its own id
    assert request(sport=40001).connection_id == ""
    reopened = event(FLOW_NEW)  # the tuple used again: another connection
    assert reopened.connection_id not in ("", opened.connection_id)
    proto = to_proto(first)
    assert proto.uuid == first.id
    extension = Struct()
    assert proto.extensions.Unpack(extension)
    assert extension["connection_id"] == opened.connection_id
    small = Connections(capacity=2)
    for port in (1, 2, 3):
        small.open(("10.0.0.1", port, "10.0.0.2", 80, "TCP"))
    assert len(small) == 2 and small.get(("10.0.0.1", 1, "10.0.0.2", 80, "TCP")) == ""


def test_a_nodes_address_is_the_host_or_a_remote_node_as_hubble_names_them() -> None:
    from mesh import ir
    from mesh.flows.directory import FlowDirectory
    from mesh.hubble.convert import to_proto
    from mesh.store.objects import parse_object
    from mesh.store.store import Store
    from mesh.translate.directory import translate_directory

    store = Store()
    store.replace("test", [parse_object(
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
         "status": {"addresses": [{"type": "InternalIP", "address": address},
                                  {"type": "Hostname", "address": name}]}})
        for name, address in (("node1", "172.30.0.11"), ("node2", "172.30.0.12"))])
    directory = translate_directory(store.snapshot())
    assert directory.nodes == (ir.DirectoryNode("172.30.0.11", "node1"),
                               ir.DirectoryNode("172.30.0.12", "node2"))
    names = FlowDirectory("node1")
    names.apply(ir.IR(directory=directory))
    host, remote = names.endpoint("172.30.0.11", 40000), names.endpoint("172.30.0.12")
    assert (host.identity, host.labels, host.node) == (1, ("reserved:host",), "node1")
    assert (remote.identity, remote.labels, remote.node) == (6, ("reserved:remote-node",),
                                                             "node2")
    probe = Flow(time=1.0, node="node1", kind="L3_L4", verdict="FORWARDED", source=host,
                 destination=names.endpoint("10.244.0.9", 8080), protocol="TCP")
    assert list(to_proto(probe).source.labels) == ["reserved:host"]
