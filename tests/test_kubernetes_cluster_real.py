"""Two nodes' agents against the real API server (the run's shared control plane), each with
its own Envoy and the agent's RBAC: one leader (a real Lease) writes status; Programmed is
both nodes' (their MeshNodes merged), the lagging one named; the leader killed, the other
takes over within the lease duration and writes. The double (tests/test_kubernetes_cluster.py)
keeps what the real server cannot show: a count of the status writes."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from mesh.echo import EchoIdentity, EchoServer
from mesh.lab.controlplane import ControlPlane
from tests import manifests
from tests.meshrun import MeshRun
from tests.test_kubernetes_real import NAMESPACE as OTHER_NAMESPACE
from tests.test_kubernetes_real import agent_kubeconfig, apply, host_address, install_crds
from tests.testbed import http_get, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NAMESPACE = "real-cluster"  # and a number: each test's own (a deleted one lingers)
NODES = {"real-a": "127.5.15.1", "real-b": "127.5.15.2"}
LEASE = ["--lease-duration", "3", "--lease-renew-deadline", "2", "--lease-retry", "0.3"]
assert NAMESPACE != OTHER_NAMESPACE


class Cluster:
    def __init__(self, cp: ControlPlane, namespace: str) -> None:
        self.cp = cp
        self.ns = namespace
        self.base = Path(f"/tmp/mesh-kcr-{os.getpid()}")
        self.base.mkdir(parents=True, exist_ok=True)
        address = host_address()
        self.echo = EchoServer(address, 0, EchoIdentity(pod="echo")).start()
        apply(cp, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.ns}})
        self.kubeconfig = agent_kubeconfig(cp, self.base / "kubeconfig", self.ns)
        for name, node_address in NODES.items():
            apply(cp, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
            cp.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p",
                       json.dumps({"status": {"addresses": [
                           {"type": "InternalIP", "address": node_address},
                           {"type": "Hostname", "address": name}]}}))
        apply(cp, manifests.gateway_class("mesh-cluster"),
              manifests.gateway(None, namespace=self.ns, gatewayClassName="mesh-cluster"),
              {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "echo", "namespace": self.ns},
               "spec": {"ports": [{"name": "http", "port": 80}]}},
              {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "echo-1", "namespace": self.ns,
                            "labels": {"kubernetes.io/service-name": "echo",
                                       "endpointslice.kubernetes.io/managed-by": "tests"}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": self.echo.port}],
               "endpoints": [{"addresses": [address]}]})
        self.route("/")
        self.agents: dict[str, MeshRun] = {}

    def route(self, prefix: str) -> None:
        apply(self.cp, manifests.http_route(
            "r", ["c.example"], namespace=self.ns,
            matches=[{"path": {"type": "PathPrefix", "value": prefix}}]))

    def start(self, name: str) -> MeshRun:
        agent = MeshRun(None, self.base / name, "--kubernetes", "--kubeconfig",
                        str(self.kubeconfig), "--node-name", name, "--leader-elect", *LEASE,
                        "--leader-namespace", self.ns, "--gateway-addresses", "node",
                        fresh=True)
        self.agents[name] = agent
        return agent

    def get(self, kind: str, name: str) -> dict[str, Any]:
        args = ["get", kind, name, "-o", "json", "--ignore-not-found"]
        out = self.cp.kubectl(*args, "-n", self.ns).stdout
        found: dict[str, Any] = json.loads(out) if out.strip() else {}
        return found

    def holder(self) -> Any:
        return (self.get("lease", "mesh-status-writer").get("spec") or {}).get(
            "holderIdentity")

    def route_programmed(self) -> dict[str, Any] | None:
        parents = (self.get("httproute", "r").get("status") or {}).get("parents") or []
        for c in parents[0]["conditions"] if parents else []:
            if c["type"] == "Programmed":
                return dict(c)
        return None

    def generation(self) -> int:
        return int(self.get("httproute", "r")["metadata"]["generation"])

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
        for name in NODES:
            self.cp.kubectl("delete", "node", name, "--ignore-not-found", check=False)
        self.cp.kubectl("delete", "meshnodes", *NODES, "--ignore-not-found", check=False)
        self.cp.kubectl("delete", "namespace", self.ns, "--wait=false", check=False)
        self.cp.kubectl("delete", "gatewayclass", "mesh-cluster", "--ignore-not-found",
                        check=False)
        self.cp.kubectl("delete", "clusterrole,clusterrolebinding", f"mesh-agent-{self.ns}",
                        "--ignore-not-found", check=False)
        shutil.rmtree(self.base, ignore_errors=True)
        return logs


_COUNT = itertools.count(1)


def served(address: str, path: str = "/") -> bool:
    return http_get(8080, path, host="c.example", address=address).status == 200


@pytest.fixture
def cluster(control_plane: ControlPlane) -> Iterator[Cluster]:
    install_crds(control_plane)
    c = Cluster(control_plane, f"{NAMESPACE}-{next(_COUNT)}")
    try:
        yield c
    finally:
        logs = c.close()
        print("\n".join(logs))  # shown when the test fails
    for log in logs:
        assert "Traceback" not in log, log


def test_two_nodes_one_writer_programmed_merged(cluster: Cluster) -> None:
    cluster.start("real-a")
    wait_until(lambda: cluster.holder() == "real-a", timeout=15, what="real-a leading")
    cluster.start("real-b")
    for address in NODES.values():
        wait_until(partial(served, address), timeout=20, what=f"the route on {address}")
    wait_until(lambda: [a["value"] for a in (cluster.get("gateway", "gw").get("status") or {})
                        .get("addresses", [])] == list(NODES.values()),
               timeout=15, what="the Gateway's addresses: the nodes'")
    wait_until(lambda: (cluster.route_programmed() or {}).get("status") == "True",
               timeout=15, what="the route Programmed on both nodes")
    assert cluster.holder() == "real-a"
    assert {m["metadata"]["name"] for m in json.loads(cluster.cp.kubectl(
        "get", "meshnodes", "-o", "json").stdout)["items"]} >= set(NODES)

    # real-b's Envoy stops taking configuration: the change is Programmed nowhere until it
    # does, and the message names real-b.
    os.kill(cluster.envoy_pid("real-b"), signal.SIGSTOP)
    try:
        cluster.route("/v2")
        gen = cluster.generation()
        wait_until(lambda: (cluster.route_programmed() or {}).get("message") ==
                   f"generation {gen} not yet programmed on real-b", timeout=15,
                   what="Programmed False naming real-b")
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
    wait_until(lambda: (cluster.route_programmed() or {}).get("status") == "True",
               timeout=20, what="the route Programmed on both nodes")
    a.proc.send_signal(signal.SIGKILL)  # no release: real-b must wait out the lease
    a.proc.wait(5)
    killed = time.monotonic()
    wait_until(lambda: cluster.holder() == "real-b", timeout=15, what="real-b leading")
    took = time.monotonic() - killed
    assert took <= 3 + 2 * 0.3 + 2.0, took  # the duration, a retry, kubectl's own time
    cluster.route("/after")
    gen = cluster.generation()
    wait_until(lambda: (cluster.route_programmed() or {}).get("message") ==
               f"generation {gen} not yet programmed on real-a", timeout=15,
               what="real-b writing the route's status")
