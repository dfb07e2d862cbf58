"""Two nodes' agents against the real API server (the run's shared control plane), each with
its own Envoy and the agent's RBAC: one leader (a real Lease) writes status; the Gateway's
addresses are the Nodes'; Programmed is both nodes' (their MeshNodes merged), False naming
the lagging one; the leader killed, the other takes over within the lease duration and
writes. `Cluster` serves both backends: the double (tests/test_kubernetes_cluster.py) keeps
what the real server cannot show, a count of the status writes."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import pytest

from mesh.echo import EchoIdentity, EchoServer
from mesh.kube.resources import LEASE, MESH_NODE, Resource, resources
from mesh.lab.controlplane import ControlPlane
from tests import manifests
from tests.meshrun import MeshRun
from tests.test_kubernetes_real import NAMESPACE as OTHER_NAMESPACE
from tests.test_kubernetes_real import agent_namespace, apply, host_address, install_crds
from tests.testbed import http_get, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NAMESPACE = "real-cluster"  # and a number: each test's own (a deleted one lingers)
NODES = {"real-a": "127.5.15.1", "real-b": "127.5.15.2"}
LEASE_TIMING = ["--lease-duration", "3", "--lease-renew-deadline", "2", "--lease-retry", "0.3"]
CLASS = "mesh-cluster"
KINDS: dict[str, Resource] = {r.kind: r for r in [*resources(None), LEASE, MESH_NODE]}
assert NAMESPACE != OTHER_NAMESPACE


class Backend(Protocol):
    """Where the cluster's objects live, for the agents and for the test."""

    namespace: str
    kubeconfig: Path  # the agents'
    echo_address: str  # where the echo listens: its EndpointSlice's address

    def apply(self, *objects: dict[str, Any]) -> None: ...

    def node(self, name: str, address: str) -> None:
        """A Node with this InternalIP."""

    def get(self, kind: str, name: str) -> dict[str, Any]:
        """An object of the namespace (or cluster-scoped) by kind and name; {} if none."""

    def close(self) -> None: ...


class RealBackend:
    """The real API server; the agents use the agent's ServiceAccount token and RBAC."""

    def __init__(self, cp: ControlPlane, namespace: str, base: Path) -> None:
        self.cp = cp
        self.namespace = namespace
        self.echo_address = host_address()  # a real API server refuses loopback endpoints
        self.nodes: list[str] = []
        self._stack = contextlib.ExitStack()
        self.kubeconfig = self._stack.enter_context(
            agent_namespace(cp, namespace, base / "kubeconfig"))

    def apply(self, *objects: dict[str, Any]) -> None:
        apply(self.cp, *objects)

    def node(self, name: str, address: str) -> None:
        apply(self.cp, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
        self.nodes.append(name)
        self.cp.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p",
                        json.dumps({"status": {"addresses": [
                            {"type": "InternalIP", "address": address},
                            {"type": "Hostname", "address": name}]}}))

    def get(self, kind: str, name: str) -> dict[str, Any]:
        code, body = self.cp.request("GET", KINDS[kind].item(self.namespace, name))
        if code == 404:
            return {}
        assert code == 200, body
        found: dict[str, Any] = body
        return found

    def close(self) -> None:
        if self.nodes:
            self.cp.kubectl("delete", "node", *self.nodes, "--ignore-not-found", check=False)
            self.cp.kubectl("delete", "meshnodes", *self.nodes, "--ignore-not-found",
                            check=False)
        self.cp.kubectl("delete", "gatewayclass", CLASS, "--ignore-not-found", check=False)
        self._stack.close()


class Cluster:
    """Nodes, our GatewayClass, a Gateway `gw` with an HTTP listener on 8080 on the nodes'
    addresses, a Service `echo` whose endpoint is an echo server, an HTTPRoute `r` for
    c.example; `start` runs a node's agent (leader election on) with its Envoy."""

    def __init__(self, backend: Backend, base: Path, nodes: dict[str, str]) -> None:
        self.backend = backend
        self.ns = backend.namespace
        self.base = base
        self.nodes = nodes
        self.agents: dict[str, MeshRun] = {}
        for name, node_address in nodes.items():
            backend.node(name, node_address)
        self.echo = EchoServer(backend.echo_address, 0, EchoIdentity(pod="echo")).start()
        backend.apply(
            manifests.gateway_class(CLASS),
            manifests.gateway(None, namespace=self.ns, gatewayClassName=CLASS),
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "echo", "namespace": self.ns},
             "spec": {"ports": [{"name": "http", "port": 80}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "echo-1", "namespace": self.ns,
                          "labels": {"kubernetes.io/service-name": "echo",
                                     "endpointslice.kubernetes.io/managed-by": "tests"}},
             "addressType": "IPv4", "ports": [{"name": "http", "port": self.echo.port}],
             "endpoints": [{"addresses": [backend.echo_address]}]})
        self.route("/")

    def route(self, prefix: str) -> None:
        self.backend.apply(manifests.http_route(
            "r", ["c.example"], namespace=self.ns,
            matches=[{"path": {"type": "PathPrefix", "value": prefix}}]))

    def start(self, name: str) -> MeshRun:
        agent = MeshRun(None, self.base / name, "--kubernetes", "--kubeconfig",
                        str(self.backend.kubeconfig), "--node-name", name, "--leader-elect",
                        *LEASE_TIMING, "--leader-namespace", self.ns,
                        "--gateway-addresses", "node", fresh=True)
        self.agents[name] = agent
        return agent

    def holder(self) -> Any:
        return (self.backend.get("Lease", "mesh-status-writer").get("spec") or {}).get(
            "holderIdentity")

    def addresses(self) -> list[str]:
        """The Gateway's addresses, as its status gives them."""
        status = self.backend.get("Gateway", "gw").get("status") or {}
        return [a["value"] for a in status.get("addresses") or []]

    def reported(self) -> bool:
        """Every node's view is in its MeshNode. The leader merges only the nodes that wrote
        one: until then, Programmed can be the other nodes' alone."""
        return all(self.backend.get("MeshNode", name) for name in self.nodes)

    def route_programmed(self) -> dict[str, Any] | None:
        parents = (self.backend.get("HTTPRoute", "r").get("status") or {}).get("parents") or []
        for c in parents[0]["conditions"] if parents else []:
            if c["type"] == "Programmed":
                return dict(c)
        return None

    def generation(self) -> int:
        return int(self.backend.get("HTTPRoute", "r")["metadata"]["generation"])

    def envoy_pid(self, name: str) -> int:
        return int(json.loads((self.base / name / "envoy.pid").read_text())["pid"])

    def close(self) -> list[str]:
        logs = []
        for name, agent in self.agents.items():
            if agent.proc.poll() is None:
                logs.append(agent.stop())
            try:  # an agent killed on purpose left its Envoy serving: end it
                pid = self.envoy_pid(name)
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass
        self.echo.stop()
        return logs


@contextlib.contextmanager
def running(backend: Backend, base: Path, nodes: dict[str, str]) -> Iterator[Cluster]:
    """The cluster on `backend`; afterwards the agents stopped, their logs free of
    tracebacks, the backend and `base` cleaned up."""
    logs: list[str] = []
    try:
        c = Cluster(backend, base, nodes)
        try:
            yield c
        finally:
            logs = c.close()
            print("\n".join(logs))  # shown when the test fails
    finally:
        backend.close()
        shutil.rmtree(base, ignore_errors=True)
    for log in logs:
        assert "Traceback" not in log, log


_COUNT = itertools.count(1)


def served(address: str, path: str = "/") -> bool:
    return http_get(8080, path, host="c.example", address=address).status == 200


@pytest.fixture
def cluster(control_plane: ControlPlane) -> Iterator[Cluster]:
    install_crds(control_plane)
    base = Path(f"/tmp/mesh-kcr-{os.getpid()}")  # short: it holds unix sockets
    base.mkdir(parents=True, exist_ok=True)
    backend = RealBackend(control_plane, f"{NAMESPACE}-{next(_COUNT)}", base)
    with running(backend, base, NODES) as c:
        yield c


def test_two_nodes_one_writer_programmed_merged(cluster: Cluster) -> None:
    cluster.start("real-a")
    wait_until(lambda: cluster.holder() == "real-a", timeout=15, what="real-a leading")
    cluster.start("real-b")
    for address in NODES.values():
        wait_until(partial(served, address), timeout=20, what=f"the route on {address}")
    wait_until(lambda: cluster.addresses() == list(NODES.values()), timeout=15,
               what="the Gateway's addresses: the nodes'")
    wait_until(cluster.reported, timeout=15, what="both nodes' MeshNodes")
    wait_until(lambda: (cluster.route_programmed() or {}).get("status") == "True",
               timeout=15, what="the route Programmed on both nodes")
    assert cluster.holder() == "real-a"

    # real-b's Envoy stops taking configuration: the change is Programmed nowhere until it
    # does, and the message names real-b.
    os.kill(cluster.envoy_pid("real-b"), signal.SIGSTOP)
    try:
        cluster.route("/v2")
        gen = cluster.generation()
        wait_until(lambda: (cluster.route_programmed() or {}).get("message") ==
                   f"generation {gen} not yet programmed on real-b", timeout=15,
                   what="Programmed False naming real-b")
        assert cluster.route_programmed()["status"] == "False"  # type: ignore[index]
        wait_until(lambda: served(NODES["real-a"], "/v2"), timeout=10,
                   what="real-a serving the change")
    finally:
        os.kill(cluster.envoy_pid("real-b"), signal.SIGCONT)
    wait_until(lambda: (cluster.route_programmed() or {}).get("status") == "True",
               timeout=20, what="Programmed once real-b runs it")


def test_leader_killed_the_other_takes_over(cluster: Cluster) -> None:
    a = cluster.start("real-a")
    wait_until(lambda: cluster.holder() == "real-a", timeout=15, what="real-a leading")
    cluster.start("real-b")
    wait_until(cluster.reported, timeout=15, what="both nodes' MeshNodes")
    wait_until(lambda: (cluster.route_programmed() or {}).get("status") == "True",
               timeout=20, what="the route Programmed on both nodes")
    a.proc.send_signal(signal.SIGKILL)  # no release: real-b must wait out the lease
    a.proc.wait(5)
    killed = time.monotonic()
    wait_until(lambda: cluster.holder() == "real-b", timeout=15, what="real-b leading")
    took = time.monotonic() - killed
    assert took <= 3 + 2 * 0.3 + 2.0, took  # the duration, a retry, the machine's noise
    # real-b writes status now: a change gets its status from real-b, and real-a, whose
    # agent is gone but whose MeshNode is not stale yet, is named as not running it.
    cluster.route("/after")
    gen = cluster.generation()
    wait_until(lambda: (cluster.route_programmed() or {}).get("message") ==
               f"generation {gen} not yet programmed on real-a", timeout=15,
               what="real-b writing the route's status")
    health = json.loads(cluster.agents["real-b"].health())
    assert health["kubernetes"]["leader"]["leading"] is True
