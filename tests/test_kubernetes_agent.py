"""`mesh run --kubernetes` against the real API server (the run's shared control plane,
tests/cluster.py), with the agent's ServiceAccount token and RBAC: status written back keeps
another controller's parent entry; a Node's status change alone moves the Gateway's listener;
the chart's two containers, Envoy serving across an agent restart. (A route created, changed
and deleted through the API reaching Envoy: tests/test_kubernetes_real.py.) Each test has a
namespace, a GatewayClass, a Node name and a directory of its own, all removed afterwards."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.echo import EchoIdentity, EchoServer
from mesh.kube.resources import resources
from mesh.lab.controlplane import ControlPlane
from tests import manifests
from tests.meshrun import ROOT, MeshRun
from tests.test_kubernetes_real import agent_namespace, apply, host_address, install_crds
from tests.testbed import http_get, wait_until

pytestmark = pytest.mark.e2e
NAMESPACE = "k8s-agent"  # and a number: each test's own (a deleted one lingers)
KINDS = {r.kind: r for r in resources(None)}
_COUNT = itertools.count(1)


class Server:
    """The real API server for one test: its namespace (also the name of its GatewayClass
    and of its agent's node), the agent's kubeconfig there, an echo server behind a Service
    `echo`, and the agents it started."""

    def __init__(self, cp: ControlPlane, namespace: str, kubeconfig: Path, base: Path) -> None:
        self.cp = cp
        self.namespace = self.node_name = namespace
        self.kubeconfig = kubeconfig
        self.base = base
        self.agents: list[MeshRun] = []
        address = host_address()  # a real API server refuses loopback endpoints
        self.echo = EchoServer(address, 0, EchoIdentity(pod="echo-k8s")).start()
        self.apply(
            manifests.gateway_class(namespace),
            # No selector: the EndpointSlice below is ours, the controllers leave it alone.
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "echo", "namespace": namespace},
             "spec": {"ports": [{"name": "http", "port": 80}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "echo-1", "namespace": namespace,
                          "labels": {"kubernetes.io/service-name": "echo",
                                     "endpointslice.kubernetes.io/managed-by": "tests"}},
             "addressType": "IPv4", "ports": [{"name": "http", "port": self.echo.port}],
             "endpoints": [{"addresses": [address]}]})

    def apply(self, *objects: dict[str, Any]) -> None:
        apply(self.cp, *objects)

    def gateway(self, *addresses: str) -> None:
        """A Gateway `gw` of the test's class with an HTTP listener on 8080, on `addresses`
        (else as the agent's --gateway-addresses says)."""
        gw = manifests.gateway(None, namespace=self.namespace, gatewayClassName=self.namespace)
        if addresses:
            gw["spec"]["addresses"] = [{"type": "IPAddress", "value": a} for a in addresses]
        self.apply(gw)

    def route(self, host: str, path: str = "/") -> dict[str, Any]:
        return manifests.http_route("r", [host], namespace=self.namespace,
                                    matches=[{"path": {"type": "PathPrefix", "value": path}}])

    def node(self, address: str) -> None:
        """The agent's Node, with this InternalIP."""
        self.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name}})
        self.cp.kubectl("patch", "node", self.node_name, "--subresource=status",
                        "--type=merge", "-p", json.dumps({"status": {"addresses": [
                            {"type": "InternalIP", "address": address}]}}))

    def get(self, kind: str, name: str) -> dict[str, Any]:
        code, body = self.cp.request("GET", KINDS[kind].item(self.namespace, name))
        assert code == 200, body
        found: dict[str, Any] = body
        return found

    def agent(self, state: str, *extra: str) -> MeshRun:
        """`mesh run --kubernetes` with the agent's token, its state in the test's directory."""
        run = MeshRun(None, self.base / state, "--kubernetes", "--kubeconfig",
                      str(self.kubeconfig), *extra, node_id=self.node_name)
        self.agents.append(run)
        return run

    def close(self) -> list[str]:
        """The agents still running stopped (their logs), and what the test made removed."""
        logs = [a.stop() for a in self.agents if a.proc.poll() is None]
        print("\n".join(logs))  # shown when the test fails
        self.echo.stop()
        for kind in ("node", "meshnode"):  # the agent's MeshNode is named after its node
            self.cp.kubectl("delete", kind, self.node_name, "--ignore-not-found", check=False)
        self.cp.kubectl("delete", "gatewayclass", self.namespace, "--ignore-not-found",
                        check=False)
        return logs


@pytest.fixture
def server(control_plane: ControlPlane) -> Iterator[Server]:
    install_crds(control_plane)
    base = Path(tempfile.mkdtemp(prefix="mesh-k8s-"))  # short: it holds unix sockets
    logs: list[str] = []
    try:
        namespace = f"{NAMESPACE}-{next(_COUNT)}"
        with agent_namespace(control_plane, namespace, base / "kubeconfig") as kubeconfig:
            s = Server(control_plane, namespace, kubeconfig, base)
            try:
                yield s
            finally:
                logs = s.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for log in logs:
        assert "Traceback" not in log, log


def served(address: str, host: str, path: str = "/") -> bool:
    return http_get(8080, path, host=host, address=address).status == 200


def test_status_written_back_keeping_other_controllers_entries(server: Server) -> None:
    address = "127.5.6.1"
    server.gateway(address)
    server.apply(server.route("k8s.example"))
    # Another controller's parent entry, written before our agent starts.
    foreign = {"parentRef": {"name": "theirs"}, "controllerName": "example.com/other",
               "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                               "message": "", "observedGeneration": 1,
                               "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    route = server.get("HTTPRoute", "r")
    code, body = server.cp.request("PUT", KINDS["HTTPRoute"].item(server.namespace, "r") +
                                   "/status", {**route, "status": {"parents": [foreign]}})
    assert code == 200, body
    [theirs] = body["status"]["parents"]  # as the server keeps it (its defaults filled in)

    def parents() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = (server.get("HTTPRoute", "r").get("status") or {}).get(
            "parents") or []
        return found

    agent = server.agent("a")
    wait_until(lambda: len(parents()) == 2, timeout=15, what="our parent entry written")
    ours = parents()[1]
    assert parents()[0] == theirs  # theirs, untouched
    assert ours["controllerName"] == "mesh.dev/gateway-controller"
    assert {c["type"]: c["status"] for c in ours["conditions"]}["Accepted"] == "True"
    wait_until(lambda: (server.get("Gateway", "gw").get("status") or {}).get("addresses") ==
               [{"type": "IPAddress", "value": address}], timeout=10,
               what="the Gateway's status")
    health = json.loads(agent.health(ready=True))
    assert health["ready"] is True and health["kubernetes"]["leader"] is None  # no election
    assert health["kubernetes"]["synced"]["Gateway.gateway.networking.k8s.io"] == "synced"
    # Gateway API v1.6.1 serves ListenerSet, no longer its experimental XListenerSet.
    assert health["kubernetes"]["synced"]["XListenerSet.gateway.networking.x-k8s.io"] == \
        "not installed"


def test_a_status_change_reaches_envoy(server: Server) -> None:
    """A Node's addresses are status (no generation): in `node` mode they are what the
    Gateway listens on, so a change of them alone must move the listener."""
    server.node("127.5.6.11")
    server.gateway()
    server.apply(server.route("n.example"))
    server.agent("n", "--gateway-addresses", "node")
    wait_until(lambda: served("127.5.6.11", "n.example"), timeout=15,
               what="the Gateway on the node's address")
    server.node("127.5.6.12")
    wait_until(lambda: served("127.5.6.12", "n.example"), timeout=15,
               what="the Gateway on the node's new address")
    wait_until(lambda: (server.get("Gateway", "gw").get("status") or {}).get("addresses") ==
               [{"type": "IPAddress", "value": "127.5.6.12"}], timeout=10,
               what="the Gateway's status address")


def test_envoy_in_a_container_of_its_own_outlives_the_agent(server: Server) -> None:
    """The chart's two containers: `mesh envoy` and `mesh run --envoy external` sharing the
    state directory. The agent restarted (an upgrade), Envoy keeps serving meanwhile and
    takes the next agent's configuration."""
    address = "127.5.6.21"
    server.gateway(address)
    server.apply(server.route("x.example"))
    state = server.base / "ext"
    state.mkdir()
    envoy = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "envoy", "--node-id", server.node_name,
         "--state-dir", str(state)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=ROOT)
    try:
        agent = server.agent("ext", "--envoy", "external")
        wait_until(lambda: served(address, "x.example"), timeout=15,
                   what="the route through the external Envoy")
        assert json.loads(agent.health(ready=True))["externalEnvoy"] is True
        # The Envoy container's probes (`mesh health --envoy`): alive and ready.
        for probe in ([], ["--ready"]):
            got = subprocess.run([sys.executable, "-m", "mesh.cli", "health", "--envoy",
                                  "--state-dir", str(state), *probe], capture_output=True,
                                 text=True, cwd=ROOT, timeout=20)
            assert got.returncode == 0 and json.loads(got.stdout)["envoy"] == "LIVE", got
        log = agent.stop()
        assert "Traceback" not in log, log
        assert envoy.poll() is None, "the agent's stop took Envoy along"
        assert served(address, "x.example"), "Envoy stopped serving without its agent"
        server.apply(server.route("x.example", "/v2"))  # changed while no agent runs
        server.agent("ext", "--envoy", "external")
        wait_until(lambda: served(address, "x.example", "/v2/x") and
                   not served(address, "x.example"), timeout=15,
                   what="the next agent's configuration in the same Envoy")
        assert envoy.poll() is None
        envoy.terminate()
        envoy.wait(10)
        # Envoy gone: its liveness probe fails, so the kubelet would restart the container.
        gone = subprocess.run([sys.executable, "-m", "mesh.cli", "health", "--envoy",
                               "--state-dir", str(state)], capture_output=True, text=True,
                              cwd=ROOT, timeout=20)
        assert gone.returncode == 1 and json.loads(gone.stdout)["envoy"] == "unreachable"
    finally:
        envoy.terminate()
        envoy.wait(10)
