"""The relay and the agents' Observer APIs on the network, as the chart deploys them: mutual
TLS both ways (a client without the CA's certificate is refused, as is an agent with a
foreign one), the agents' certificate read again when its files change, and the relay
finding the nodes in the real API server (Nodes listed and watched with the relay's RBAC
rules alone), following them as they join and leave."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from mesh.flows.store import FlowStore
from mesh.hubble.api.observer import observer_pb2, observer_pb2_grpc
from mesh.hubble.api.relay import relay_pb2
from mesh.hubble.observer import Observer, ObserverServer, check_listen
from mesh.hubble.relay import Relay
from mesh.hubble.tls import CLIENT_NAME, SERVER_NAME, TLSFiles, peer_name
from mesh.kube.rbac import relay_rules
from mesh.lab.bootstrap import token_kubeconfig
from mesh.lab.controlplane import ControlPlane, Issued, issue, make_ca, write_file
from tests.test_hubble import T0, l4

ROOT = Path(__file__).resolve().parent.parent


def tls_dir(path: Path, ca: Issued, leaf: Issued) -> TLSFiles:
    path.mkdir(parents=True, exist_ok=True)
    write_file(path / "ca.crt", ca.cert_pem())
    write_file(path / "tls.crt", leaf.cert_pem())
    write_file(path / "tls.key", leaf.key_pem(), 0o600)
    return TLSFiles(path)


def agent_files(path: Path, ca: Issued) -> TLSFiles:
    return tls_dir(path, ca, issue(ca, "agent", server=True, dns=(SERVER_NAME,)))


def relay_files(path: Path, ca: Issued) -> TLSFiles:
    return tls_dir(path, ca, issue(ca, CLIENT_NAME))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def agents(tls: TLSFiles, nodes: dict[str, str]) -> AsyncIterator[dict[str, FlowStore]]:
    """An Observer API per node on its HOST:PORT with `tls`, each with one flow."""
    stores: dict[str, FlowStore] = {}
    servers, tasks = [], []
    for i, (node, listen) in enumerate(nodes.items()):
        stores[node] = FlowStore()
        stores[node].add(replace(l4(i + 1), node=node))
        server = ObserverServer(Path("/nonexistent"), Observer(stores[node], node), listen, tls)
        servers.append(server)
        tasks.append(asyncio.create_task(server.run()))
    try:
        for s in servers:
            await asyncio.wait_for(s.ready.wait(), 10)
        yield stores
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def flows_via(relay: Relay) -> tuple[list[str], list[str]]:
    """(the nodes of the flows, the nodes reported unavailable) through `relay`."""
    got = [r async for r in relay.flows(observer_pb2.GetFlowsRequest(number=10))]
    flows = [r.flow.node_name for r in got if r.WhichOneof("response_types") == "flow"]
    down = sorted(n for r in got if r.WhichOneof("response_types") == "node_status"
            for n in r.node_status.node_names)
    return flows, down


def test_plain_text_is_served_on_the_loopback_and_unix_sockets_only() -> None:
    check_listen("unix:///run/x.sock", None)
    check_listen("127.0.0.1:4244", None)
    check_listen("[::1]:4244", None)
    for listen in ("0.0.0.0:4244", "10.0.0.5:4244", "[::]:4244", "node1:4244"):
        with pytest.raises(ValueError, match="needs TLS"):
            check_listen(listen, None)


def test_the_relay_and_the_agents_authenticate_each_other(tmp_path: Path) -> None:
    asyncio.run(mutual_tls(tmp_path))


async def mutual_tls(tmp_path: Path) -> None:
    ca, foreign = make_ca("mesh-hubble-ca"), make_ca("someone-else")
    served = agent_files(tmp_path / "agent", ca)
    nodes = {"node1": f"127.0.0.1:{free_port()}", "node2.example.com": f"127.0.0.1:{free_port()}"}
    async with agents(served, nodes):
        relay = Relay(nodes, relay_files(tmp_path / "relay", ca))
        try:
            assert await flows_via(relay) == (["node1", "node2.example.com"], [])
            # the names it asks the agents to prove: one DNS label under the wildcard
            assert peer_name("node2.example.com") == "node2-example-com.hubble.mesh.dev"
        finally:
            await relay.close()
        # a client with no certificate, or one of another CA: refused at the handshake
        for who, creds in (
                ("no certificate", grpc.ssl_channel_credentials(root_certificates=ca.cert_pem())),
                ("a foreign CA's", grpc.ssl_channel_credentials(
                    root_certificates=ca.cert_pem(),
                    private_key=(leaf := issue(foreign, CLIENT_NAME)).key_pem(),
                    certificate_chain=leaf.cert_pem()))):
            async with grpc.aio.secure_channel(nodes["node1"], creds, options=[
                    ("grpc.ssl_target_name_override", peer_name("node1"))]) as ch:
                stub = observer_pb2_grpc.ObserverStub(ch)  # type: ignore[no-untyped-call]
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, who
        # a relay that trusts another CA does not talk to these agents: both reported down
        other = Relay(nodes, relay_files(tmp_path / "other-relay", foreign))
        try:
            assert await flows_via(other) == ([], ["node1", "node2.example.com"])
        finally:
            await other.close()
        # the agents' files replaced (a renewed Secret, of a new CA): new connections use them
        agent_files(tmp_path / "agent", foreign)
        renewed = Relay(nodes, relay_files(tmp_path / "renewed-relay", foreign))
        try:
            assert await flows_via(renewed) == (["node1", "node2.example.com"], [])
        finally:
            await renewed.close()


def test_a_following_stream_takes_in_a_node_that_joins(tmp_path: Path) -> None:
    asyncio.run(joins(tmp_path))


async def joins(tmp_path: Path) -> None:
    ca = make_ca()
    served = agent_files(tmp_path / "agent", ca)
    nodes = {"node1": f"127.0.0.1:{free_port()}", "node2": f"127.0.0.1:{free_port()}"}
    async with agents(served, nodes) as stores:
        relay = Relay({"node1": nodes["node1"]}, relay_files(tmp_path / "relay", ca))
        stream = relay.flows(observer_pb2.GetFlowsRequest(number=1, follow=True))
        try:
            first = await asyncio.wait_for(anext(stream), 10)
            assert first.flow.node_name == "node1"
            relay.set_peers(nodes)  # node2 joins
            await asyncio.sleep(0.5)
            stores["node2"].add(replace(l4(50), node="node2"))
            times = set()
            while (int(T0) + 50) not in times:  # node2's last flow before it, then the new
                r = await asyncio.wait_for(anext(stream), 10)
                assert r.flow.node_name == "node2"
                times.add(r.flow.time.seconds)
            relay.set_peers({"node2": nodes["node2"]})  # node1 leaves
            assert sorted(relay.peers) == ["node2"]
        finally:
            await stream.aclose()
            await relay.close()


def test_a_following_stream_waits_for_a_node_that_is_down(tmp_path: Path) -> None:
    asyncio.run(comes_up(tmp_path))


async def comes_up(tmp_path: Path) -> None:
    """A node whose agent is not up yet is reported unavailable once, asked again, and
    followed once it answers (its new flows, not its old ones again)."""
    ca = make_ca()
    served = agent_files(tmp_path / "agent", ca)
    nodes = {"node1": f"127.0.0.1:{free_port()}"}
    relay = Relay(nodes, relay_files(tmp_path / "relay", ca))
    stream = relay.flows(observer_pb2.GetFlowsRequest(number=5, follow=True))
    try:
        first = await asyncio.wait_for(anext(stream), 10)
        assert first.node_status.state_change == relay_pb2.NODE_UNAVAILABLE
        assert list(first.node_status.node_names) == ["node1"]
        async with agents(served, nodes) as stores:  # l4(1) stored before it listens
            up = await asyncio.wait_for(anext(stream), 10)
            stores["node1"].add(replace(l4(60), node="node1"))
            assert up.node_status.state_change == relay_pb2.NODE_CONNECTED, up
            new = await asyncio.wait_for(anext(stream), 10)
            assert new.flow.time.seconds == int(T0) + 60  # not l4(1) again
    finally:
        await stream.aclose()
        await relay.close()


# -- the relay against the real API server -------------------------------------------------

def relay_kubeconfig(cp: ControlPlane, path: Path) -> Path:
    """The token of a ServiceAccount bound to the relay's rules alone (the chart's are
    checked against them in tests/test_chart.py)."""
    name = "mesh-hubble-relay-test"
    manifest = [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": name, "namespace": "default"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": name}, "rules": relay_rules()},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": "default"}]}]
    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                      "items": manifest}))
    return token_kubeconfig(cp, path, name, namespace="default")


def node(cp: ControlPlane, name: str, address: str) -> None:
    cp.kubectl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}))
    cp.kubectl("patch", "node", name, "--subresource", "status", "--type", "merge", "-p",
               json.dumps({"status": {"addresses": [{"type": "InternalIP",
                                                     "address": address}]}}))


@pytest.mark.e2e
def test_the_relay_finds_the_nodes_in_the_api_server(control_plane: ControlPlane,
                                                      tmp_path: Path) -> None:
    asyncio.run(discovery(control_plane, tmp_path))


async def discovery(cp: ControlPlane, tmp_path: Path) -> None:
    ca = make_ca()
    served = agent_files(tmp_path / "agent", ca)
    relay_tls = relay_files(tmp_path / "relay", ca)
    addresses = {"hubble-peer-a": "127.5.16.1", "hubble-peer-b": "127.5.16.2"}
    port = free_port("127.5.16.1")
    kubeconfig = relay_kubeconfig(cp, tmp_path / "relay.kubeconfig")
    relay_sock = tmp_path / "relay.sock"
    proc = None
    async with agents(served, {n: f"{a}:{port}" for n, a in addresses.items()}):
        try:
            await asyncio.to_thread(node, cp, "hubble-peer-a", addresses["hubble-peer-a"])
            proc = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "mesh"), "relay", "--peers-from-kubernetes",
                "--kubeconfig", str(kubeconfig), "--peer-port", str(port),
                "--tls-dir", str(relay_tls.directory), "--listen", f"unix://{relay_sock}",
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)

            async def nodes_seen() -> dict[str, Any]:
                if not relay_sock.exists():
                    return {}
                async with grpc.aio.insecure_channel(f"unix://{relay_sock}") as ch:
                    stub = observer_pb2_grpc.ObserverStub(ch)  # type: ignore[no-untyped-call]
                    answer = await stub.GetNodes(observer_pb2.GetNodesRequest(), timeout=5)
                return {n.name: (n.address, n.state) for n in answer.nodes}

            async def until(what: str, check: Any) -> dict[str, Any]:
                seen: dict[str, Any] = {}
                for _ in range(150):
                    assert proc is not None
                    if proc.returncode is not None:
                        out = await proc.stdout.read() if proc.stdout else b""
                        raise AssertionError(f"the relay ended: {out.decode()}")
                    seen = await nodes_seen()
                    if check(seen):
                        return seen
                    await asyncio.sleep(0.2)
                raise AssertionError(f"{what}: the relay saw {seen}")

            seen = await until("node a", lambda s: "hubble-peer-a" in s)
            assert seen["hubble-peer-a"] == (f"127.5.16.1:{port}", relay_pb2.NODE_CONNECTED)
            # the Nodes of the other tests' (no agent there) are reported, not fatal
            await asyncio.to_thread(node, cp, "hubble-peer-b", addresses["hubble-peer-b"])
            await until("node b joined", lambda s: s.get("hubble-peer-b", ("", 0))[1] ==
                        relay_pb2.NODE_CONNECTED)
            await asyncio.to_thread(cp.kubectl, "delete", "node", "hubble-peer-a")
            await until("node a left", lambda s: "hubble-peer-a" not in s)
        finally:
            if proc is not None and proc.returncode is None:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 10)
            for name in addresses:
                await asyncio.to_thread(cp.kubectl, "delete", "node", name,
                                        "--ignore-not-found", check=False)
            await asyncio.to_thread(
                cp.kubectl, "delete", "clusterrole,clusterrolebinding",
                "mesh-hubble-relay-test", "--ignore-not-found", check=False)
            await asyncio.to_thread(cp.kubectl, "delete", "serviceaccount", "-n", "default",
                                    "mesh-hubble-relay-test", "--ignore-not-found",
                                    check=False)

