"""Hubble's Observer API on the node's flows: the filters with Hubble's meaning, the flows as
Hubble's messages, the gRPC service on its unix socket, and the real `hubble` CLI (built
from its Go module by make) reading them unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from mesh.flows.model import (
    DROPPED,
    EGRESS,
    FORWARDED,
    INGRESS,
    L3_L4,
    L7,
    Connection,
    Endpoint,
    Flow,
    Http,
)
from mesh.flows.store import RING_LOST, FlowStore
from mesh.hubble.api.flow import flow_pb2
from mesh.hubble.api.observer import observer_pb2, observer_pb2_grpc
from mesh.hubble.convert import to_proto
from mesh.hubble.filters import FilterError, compile_filters
from mesh.hubble.observer import Observer, ObserverServer

HUBBLE = Path(__file__).resolve().parent.parent / ".kube" / "bin" / "hubble"
T0 = 1_800_000_000.0

CLIENT = Endpoint("10.1.0.5", 40000, "demo", "client-7d9f", ("app=client",), 1001,
                  node="node1")
ECHO = Endpoint("10.1.1.7", 8080, "demo", "echo-v1-5c6b", ("app=echo", "version=v1"), 1002,
                node="node2")


def l4(t: float, src: Endpoint = CLIENT, dst: Endpoint = ECHO, verdict: str = FORWARDED,
       reason: str = "", event: str = "NEW", flags: tuple[str, ...] = ("SYN",),
       protocol: str = "TCP") -> Flow:
    return Flow(time=T0 + t, node="node1", kind=L3_L4, verdict=verdict, drop_reason=reason,
                source=src, destination=dst, protocol=protocol, direction=EGRESS,
                connection=Connection(event=event, point="" if reason else "TO_STACK",
                                      is_reply=False, tcp_flags=flags))


def http(t: float, status: int, method: str = "GET", path: str = "/") -> Flow:
    return Flow(time=T0 + t, node="node1", kind=L7, verdict=FORWARDED, source=CLIENT,
                destination=ECHO.__class__(**{**ECHO.__dict__, "service": "demo/echo"}),
                protocol="TCP", direction=INGRESS,
                http=Http(method, path, "echo", status, 1.5, "HTTP/1.1"))


FLOWS = [
    l4(1),
    l4(2, verdict=DROPPED, reason="POLICY_DENIED"),
    http(3, 200),
    http(4, 503, "POST", "/api/v1/items"),
    l4(5, src=ECHO, dst=Endpoint("10.96.0.10", 53), protocol="UDP", flags=()),
]


def matching(*filters: dict[str, Any], blacklist: tuple[dict[str, Any], ...] = ()
             ) -> list[int]:
    """The indexes in FLOWS of the flows the filters take."""
    match = compile_filters([flow_pb2.FlowFilter(**f) for f in filters],
                            [flow_pb2.FlowFilter(**f) for f in blacklist])
    return [i for i, f in enumerate(FLOWS) if match(to_proto(f))]


def test_filters_mean_what_hubble_means() -> None:
    assert matching() == [0, 1, 2, 3, 4]
    # pods: namespace/prefix; a bare name is in "default"; L7 flows are responses
    # (from the server), as Hubble's
    assert matching({"source_pod": ["demo/client"]}) == [0, 1]
    assert matching({"source_pod": ["demo/"]}) == [0, 1, 2, 3, 4]
    assert matching({"source_pod": ["client"]}) == []
    assert matching({"source_pod": ["demo/echo"]}, {"destination_pod": ["demo/echo"]}) == \
        [0, 1, 2, 3, 4]
    # labels, with or without Cilium's source; set operations; negation
    assert matching({"destination_label": ["app=echo"]}) == [0, 1]
    assert matching({"destination_label": ["k8s:app=echo,version in (v1,v2)"]}) == [0, 1]
    assert matching({"source_label": ["app=echo,!version"]}) == []
    assert matching({"source_label": ["k8s:io.kubernetes.pod.namespace=demo"]}) == \
        [0, 1, 2, 3, 4]
    # addresses and CIDRs; ports; protocols
    assert matching({"destination_ip": ["10.96.0.0/16"]}) == [4]
    assert matching({"destination_port": ["8080"]}) == [0, 1]
    assert matching({"protocol": ["udp"]}) == [4]
    assert matching({"protocol": ["http"]}) == [2, 3]
    # verdicts, reasons, HTTP
    assert matching({"verdict": [flow_pb2.DROPPED]}) == [1]
    assert matching({"drop_reason_desc": [flow_pb2.POLICY_DENIED]}) == [1]
    assert matching({"http_status_code": ["5+"]}) == [3]
    assert matching({"http_status_code": ["200"]}) == [2]
    assert matching({"http_method": ["post"]}) == [3]
    assert matching({"http_path": ["^/api/v[0-9]+/"]}) == [3]
    assert matching({"destination_service": ["demo/echo"]}) == []  # a response's is the client
    assert matching({"source_service": ["demo/echo"]}) == [2, 3]
    # fields within one filter: all; filters: any; the blacklist (--not) takes away
    assert matching({"source_pod": ["demo/client"], "verdict": [flow_pb2.FORWARDED]}) == [0]
    assert matching({"protocol": ["udp"]}, {"http_status_code": ["5+"]}) == [3, 4]
    assert matching(blacklist=({"protocol": ["http"]},)) == [0, 1, 4]
    tcp_syn = flow_pb2.TCPFlags(SYN=True)
    assert matching({"tcp_flags": [tcp_syn]}) == [0, 1]
    assert matching({"event_type": [flow_pb2.EventTypeFilter(type=1)]}) == [1]


@pytest.mark.parametrize("bad, says", [
    ({"source_ip": ["10.0.0.300"]}, "source_ip"),
    ({"http_status_code": ["5xx"]}, "neither a code"),
    ({"http_path": ["("]}, "http_path"),
    ({"source_label": ["app in (a"]}, "label selector"),
    ({"protocol": ["quic"]}, "unknown protocol"),
    ({"source_fqdn": ["*.example.com"]}, "source_fqdn: this filter is not supported"),
    ({"destination_port": ["http"]}, "destination_port"),
])
def test_a_filter_it_cannot_use_is_refused_with_its_name(bad: dict[str, Any], says: str
                                                         ) -> None:
    with pytest.raises(FilterError, match=says):
        compile_filters([flow_pb2.FlowFilter(**bad)], [])


def test_flows_read_as_hubbles() -> None:
    dropped = to_proto(FLOWS[1])
    assert (dropped.verdict, dropped.drop_reason_desc, dropped.event_type.type) == \
        (flow_pb2.DROPPED, flow_pb2.POLICY_DENIED, 1)
    assert dropped.source.pod_name == "client-7d9f" and dropped.l4.TCP.flags.SYN
    assert "k8s:app=client" in dropped.source.labels
    assert dropped.traffic_direction == flow_pb2.EGRESS
    response = to_proto(FLOWS[3])
    assert response.Type == flow_pb2.L7 and response.l7.type == flow_pb2.RESPONSE
    assert (response.l7.http.code, response.l7.http.method, response.l7.http.url) == \
        (503, "POST", "http://echo/api/v1/items")
    assert response.l7.latency_ns == 1_500_000 and response.is_reply.value
    assert (response.source.pod_name, response.destination.pod_name) == \
        ("echo-v1-5c6b", "client-7d9f")
    forwarded = to_proto(FLOWS[0])
    assert forwarded.trace_observation_point == flow_pb2.TO_STACK
    assert forwarded.time.ToNanoseconds() == int((T0 + 1) * 1e9)


@contextlib.asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[tuple[FlowStore, Path]]:
    """FLOWS in a store, its Observer on a unix socket."""
    store = FlowStore(capacity=100)
    for f in FLOWS:
        store.add(f)
    socket = tmp_path / "hubble.sock"
    server = ObserverServer(socket, Observer(store, "node1", lambda: {"demo"}))
    task = asyncio.create_task(server.run())
    try:
        await asyncio.wait_for(server.ready.wait(), 10)
        yield store, socket
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_the_api_on_its_socket(tmp_path: Path) -> None:
    asyncio.run(api_on_its_socket(tmp_path))


async def api_on_its_socket(tmp_path: Path) -> None:
    async with served(tmp_path) as (store, socket):
        await calls(store, socket)


async def calls(store: FlowStore, socket: Path) -> None:
    assert stat.S_IMODE(os.stat(socket).st_mode) == 0o600
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        stub = observer_pb2_grpc.ObserverStub(channel)  # type: ignore[no-untyped-call]
        status = await stub.ServerStatus(observer_pb2.ServerStatusRequest())
        assert (status.num_flows, status.max_flows, status.seen_flows) == (5, 100, 5)
        last = [r async for r in stub.GetFlows(observer_pb2.GetFlowsRequest(number=2))]
        assert [r.flow.time.seconds for r in last] == [int(T0) + 4, int(T0) + 5]
        first = [r async for r in stub.GetFlows(observer_pb2.GetFlowsRequest(
            number=2, first=True))]
        assert [r.flow.time.seconds for r in first] == [int(T0) + 1, int(T0) + 2]
        since = observer_pb2.GetFlowsRequest(number=10)
        since.since.FromSeconds(int(T0) + 3)
        assert len([r async for r in stub.GetFlows(since)]) == 3
        # follow: the last one that matches, then new ones as they come, a loss told
        call = stub.GetFlows(observer_pb2.GetFlowsRequest(
            number=1, follow=True, whitelist=[flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED])]))
        got = [await call.read()]
        store.add(l4(6))  # forwarded: not for this follower
        store.add(l4(7, verdict=DROPPED, reason="UNENCRYPTED_TRAFFIC"))
        store.add_lost(3, RING_LOST)
        got += [await call.read(), await call.read()]
        call.cancel()
        assert [g.flow.drop_reason_desc for g in got[:2]] == \
            [flow_pb2.POLICY_DENIED, flow_pb2.UNENCRYPTED_TRAFFIC]
        assert (got[2].lost_events.source, got[2].lost_events.num_events_lost) == \
            (flow_pb2.PERF_EVENT_RING_BUFFER, 3)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in stub.GetFlows(observer_pb2.GetFlowsRequest(
                    whitelist=[flow_pb2.FlowFilter(http_status_code=["abc"])])):
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "http_status_code" in (e.value.details() or "")
        nodes = await stub.GetNodes(observer_pb2.GetNodesRequest())
        assert [n.name for n in nodes.nodes] == ["node1"]
        namespaces = await stub.GetNamespaces(observer_pb2.GetNamespacesRequest())
        assert [n.namespace for n in namespaces.namespaces] == ["demo"]


def hubble(socket: Path, *args: str) -> str:
    out = subprocess.run([str(HUBBLE), *args, "--server", f"unix://{socket}"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(not HUBBLE.exists(), reason="the hubble CLI is built by make (hubble-bin)")
def test_the_hubble_cli_reads_the_flows_unchanged(tmp_path: Path) -> None:
    asyncio.run(hubble_cli(tmp_path))


async def hubble_cli(tmp_path: Path) -> None:
    async with served(tmp_path) as (_, socket):
        compact = await asyncio.to_thread(hubble, socket, "observe", "--last", "10")
        lines = compact.strip().splitlines()
        assert len(lines) == 5, compact
        assert "demo/client-7d9f:40000" in lines[1] and "demo/echo-v1-5c6b:8080" in lines[1]
        assert "DROPPED" in lines[1] and "Policy denied" in lines[1]
        assert "http-response" in lines[3] and "503" in lines[3] and "POST" in lines[3]
        as_json = await asyncio.to_thread(hubble, socket, "observe", "--last", "10", "-o",
                                          "jsonpb", "--http-status", "5+")
        (only,) = [json.loads(line) for line in as_json.strip().splitlines()]
        assert only["flow"]["l7"]["http"]["code"] == 503
        assert only["flow"]["source"]["pod_name"] == "echo-v1-5c6b"
        dropped = await asyncio.to_thread(hubble, socket, "observe", "--last", "10", "--not",
                                          "--verdict", "FORWARDED", "-o", "json")
        assert len(dropped.strip().splitlines()) == 1 and "POLICY_DENIED" in dropped
        status = await asyncio.to_thread(hubble, socket, "status")
        assert "Current/Max Flows: 5/100" in status, status
        pods = await asyncio.to_thread(hubble, socket, "observe", "--last", "10", "--pod",
                                       "demo/client", "-o", "compact")
        assert len(pods.strip().splitlines()) == 4, pods  # to or from the client


def translation(t: float) -> Flow:
    """A socket's translation: the client to echo's backend, balanced from its Service."""
    backend = Endpoint(**{**ECHO.__dict__, "service": "demo/echo"})
    return Flow(time=T0 + t, node="node1", kind="SOCK", verdict="TRANSLATED", source=CLIENT,
                destination=backend, protocol="TCP", direction=EGRESS,
                connection=Connection(event="TRANSLATED", point="", is_reply=False))


def test_a_translation_reads_as_hubbles_socket_trace(tmp_path: Path) -> None:
    from mesh.hubble.cli import row

    f = to_proto(translation(1))
    assert (f.Type, f.verdict, f.sock_xlate_point) == (
        flow_pb2.SOCK, flow_pb2.TRANSLATED, flow_pb2.SOCK_XLATE_POINT_POST_DIRECTION_FWD)
    assert (f.event_type.type, f.event_type.sub_type) == (7, 2)  # TraceSock, post-xlate-fwd
    assert f.destination_service.name == "echo" and not f.l4.TCP.HasField("flags")
    shown = row(observer_pb2.GetFlowsResponse(flow=f))
    assert shown is not None and shown[2:] == ("demo/client-7d9f:40000", "->",
                                 "demo/echo-v1-5c6b:8080 (demo/echo)", "TRANSLATED",
                                 "post-xlate-fwd TCP")
    if HUBBLE.exists():  # Hubble's own CLI prints it as it prints Cilium's
        asyncio.run(translation_in_hubble(tmp_path))


async def translation_in_hubble(tmp_path: Path) -> None:
    async with served(tmp_path) as (store, socket):
        store.add(translation(9))
        out = await asyncio.to_thread(hubble, socket, "observe", "--last", "1")
        assert "demo/client-7d9f:40000 (ID:1001) -> demo/echo-v1-5c6b:8080 (ID:1002) " \
            "post-xlate-fwd TRANSLATED (TCP)" in out, out
        typed = await asyncio.to_thread(hubble, socket, "observe", "--last", "10", "--type",
                                        "trace-sock", "-o", "json")
        assert len(typed.strip().splitlines()) == 1, typed


def test_observe_builds_filters_as_hubbles_cli() -> None:
    from mesh.hubble.cli import FilterUsage, parse_filters

    f = parse_filters(["--from-pod", "demo/client", "--verdict", "dropped"])
    assert f.whitelist == [{"source_pod": ["demo/client"], "verdict": [flow_pb2.DROPPED]}]
    # an either-end filter: one filter per end, the others in both; a second value joins
    f = parse_filters(["--namespace", "demo", "--http-status", "5+", "--namespace", "prod"])
    assert f.whitelist == [
        {"source_pod": ["demo/", "prod/"], "http_status_code": ["5+"]},
        {"destination_pod": ["demo/", "prod/"], "http_status_code": ["5+"]}]
    # --not: the next filter excludes
    f = parse_filters(["--to-port", "8080", "--not", "--verdict", "FORWARDED"])
    assert f.whitelist == [{"destination_port": ["8080"]}]
    assert f.blacklist == [{"verdict": [flow_pb2.FORWARDED]}]
    for bad in (["--from-planet", "x"], ["--verdict", "MAYBE"], ["--not"], ["--pod"]):
        with pytest.raises(FilterUsage):
            parse_filters(bad)


def mesh_observe(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    mesh = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "mesh"
    return subprocess.run([str(mesh), "observe", "--server", f"unix://{socket}", *args],
                          capture_output=True, text=True, timeout=60)


def test_mesh_observe_reads_the_api(tmp_path: Path) -> None:
    asyncio.run(observe_api(tmp_path))


async def observe_api(tmp_path: Path) -> None:
    from dataclasses import replace

    async with served(tmp_path) as (store, socket):
        out = await asyncio.to_thread(mesh_observe, socket)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == 5
        assert "demo/client-7d9f:40000 -> demo/echo-v1-5c6b:8080 DROPPED POLICY_DENIED " \
               "(drop TCP Flags: SYN)" in lines[1]
        # the response printed with the client on the left, as Hubble does
        assert "demo/client-7d9f:40000 <- demo/echo-v1-5c6b:8080 FORWARDED (http-response " \
               "HTTP/1.1 503 1ms (POST http://echo/api/v1/items))" in lines[3]
        out = await asyncio.to_thread(mesh_observe, socket, "--namespace", "demo", "--not",
                                      "--protocol", "http", "--last", "2", "-o", "json")
        assert out.returncode == 0, out.stderr
        got = [json.loads(line) for line in out.stdout.splitlines()]
        assert [g["flow"]["l4"].keys() for g in got] == [{"TCP"}, {"UDP"}]
        out = await asyncio.to_thread(mesh_observe, socket, "--http-status", "nope")
        assert out.returncode != 0 and "http_status_code" in out.stderr
        out = await asyncio.to_thread(mesh_observe, socket, "-o", "table", "--to-ip",
                                      "10.96.0.0/12")
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0].split()[:3] == ["TIME", "NODE", "SOURCE"]
        assert len(out.stdout.splitlines()) == 2 and "UDP" in out.stdout
        # a flow joined to its connection: the id in its JSON, the node named as Hubble does
        host = Endpoint("172.30.0.11", 0, labels=("reserved:host",), identity=1)
        store.add(replace(l4(20, src=host), id="f-1", connection_id="c-1"))
        out = await asyncio.to_thread(mesh_observe, socket, "--last", "1", "-o", "json")
        assert out.returncode == 0, out.stderr
        flow = json.loads(out.stdout)["flow"]
        assert flow["uuid"] == "f-1"
        assert flow["extensions"] == {"@type": "type.googleapis.com/google.protobuf.Struct",
                                      "value": {"connection_id": "c-1"}}
        out = await asyncio.to_thread(mesh_observe, socket, "--last", "1")
        assert "172.30.0.11 (host) -> demo/echo-v1-5c6b:8080" in out.stdout, out.stdout


def test_the_relay_joins_the_nodes(tmp_path: Path) -> None:
    asyncio.run(relay_joins(tmp_path))


async def relay_joins(tmp_path: Path) -> None:
    from dataclasses import replace

    from mesh.hubble.relay import Relay, RelayServer

    stores = {"node1": FlowStore(), "node2": FlowStore()}
    for i, f in enumerate(FLOWS):  # alternately on each node, in time order overall
        node = "node1" if i % 2 == 0 else "node2"
        stores[node].add(replace(f, node=node))
    tasks = []
    servers = {}
    for node, store in stores.items():
        (tmp_path / node).mkdir()
        servers[node] = ObserverServer(tmp_path / node / "hubble.sock", Observer(store, node))
        tasks.append(asyncio.create_task(servers[node].run()))
    peers = {n: f"unix://{s.socket}" for n, s in servers.items()}
    peers["node3"] = f"unix://{tmp_path / 'node3.sock'}"  # never up
    relay = RelayServer(f"unix://{tmp_path / 'relay.sock'}", Relay(peers))
    tasks.append(asyncio.create_task(relay.run()))
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        for ready in (*(s.ready for s in servers.values()), relay.ready):
            await asyncio.wait_for(ready.wait(), 10)
        # three servers started at once leave the process's umask as it was (each changes
        # it around its bind alone)
        assert os.umask(umask) == umask
        assert stat.S_IMODE(os.stat(tmp_path / "relay.sock").st_mode) == 0o600
        async with grpc.aio.insecure_channel(f"unix://{tmp_path / 'relay.sock'}") as ch:
            stub = observer_pb2_grpc.ObserverStub(ch)  # type: ignore[no-untyped-call]
            got = [r async for r in stub.GetFlows(observer_pb2.GetFlowsRequest(number=10))]
            flows = [r for r in got if r.WhichOneof("response_types") == "flow"]
            assert [(r.flow.node_name, r.flow.time.seconds - int(T0)) for r in flows] == \
                [("node1", 1), ("node2", 2), ("node1", 3), ("node2", 4), ("node1", 5)]
            (down,) = [r.node_status for r in got
                       if r.WhichOneof("response_types") == "node_status"]
            assert list(down.node_names) == ["node3"]
            status = await stub.ServerStatus(observer_pb2.ServerStatusRequest())
            assert (status.num_flows, status.num_connected_nodes.value,
                    list(status.unavailable_nodes)) == (5, 2, ["node3"])
            # following: each node's new flows as they come
            call = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True))
            await asyncio.sleep(0.5)
            stores["node2"].add(replace(l4(9), node="node2"))
            seen: list[str] = []
            while len(seen) < 1:
                r = await asyncio.wait_for(call.read(), 10)
                if r.WhichOneof("response_types") == "flow":
                    seen.append(r.flow.node_name)
            call.cancel()
            assert seen == ["node2"]
        if HUBBLE.exists():  # Hubble's own CLI against the relay: every node's flows
            out = await asyncio.to_thread(hubble, tmp_path / "relay.sock", "observe",
                                          "--last", "10", "--print-node-name")
            assert out.count("node1") == 3 and out.count("node2") == 3, out
            nodes = await asyncio.to_thread(hubble, tmp_path / "relay.sock", "list", "nodes")
            assert "node1" in nodes and "node3" in nodes and "Unavailable" in nodes, nodes
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_a_pods_workload_is_its_deployment_as_hubble_names_it() -> None:
    from mesh.translate.directory import workload

    replica = {"ownerReferences": [{"kind": "ReplicaSet", "name": "echo-v1-7f49b47fdb",
                                    "controller": True}]}
    assert workload("echo-v1-7f49b47fdb-g7cmw", replica,
                    {"pod-template-hash": "7f49b47fdb"}) == ("echo-v1", "Deployment")
    assert workload("db-0", {"ownerReferences": [{"kind": "StatefulSet", "name": "db",
                                                  "controller": True}]}, {}) == \
        ("db", "StatefulSet")
    assert workload("client", {}, {}) == ("client", "Pod")
    assert workload("x", {"ownerReferences": [{"kind": 3, "controller": True}]}, {}) == \
        ("x", "Pod")
