"""Two nodes' agents against the API double, each with its own Envoy: one leader writes
status; Programmed is both nodes' (the lagging one named); the leader killed, the other
takes over within the lease duration and writes; unchanged status is not written again;
Gateway addresses are the nodes'."""

from __future__ import annotations

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
from tests.kubeapi import BackgroundAPI
from tests.meshrun import MeshRun
from tests.testbed import http_get, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
GW = "gateway.networking.k8s.io"
NODES = {"node-a": "127.5.7.1", "node-b": "127.5.7.2"}
LEASE = ["--lease-duration", "3", "--lease-renew-deadline", "2", "--lease-retry", "0.3"]


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.api = BackgroundAPI()
        self.echo = EchoServer("127.0.0.1", 0, EchoIdentity(pod="echo")).start()
        self.kubeconfig = self.api.kubeconfig(tmp / "kubeconfig")
        self.base = Path(f"/tmp/mesh-kc-{os.getpid()}")
        self.agents: dict[str, MeshRun] = {}
        for name, address in NODES.items():
            self.api.put("", "nodes", {"metadata": {"name": name}, "status": {"addresses": [
                {"type": "InternalIP", "address": address},
                {"type": "Hostname", "address": name}]}})
        self.api.gateway_and_echo(self.echo.port)
        self.route("/")

    def route(self, prefix: str) -> None:
        self.api.put(GW, "httproutes", {
            "metadata": {"name": "r", "namespace": "default"},
            "spec": {"parentRefs": [{"name": "gw"}], "hostnames": ["c.example"], "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
                 "backendRefs": [{"name": "echo", "port": 80}]}]}})

    def start(self, name: str) -> MeshRun:
        agent = MeshRun(None, self.base / name, "--kubernetes", "--kubeconfig",
                            str(self.kubeconfig), "--leader-elect", *LEASE,
                            "--gateway-addresses", "node")
        self.agents[name] = agent
        return agent

    def obj(self, plural: str, name: str, ns: str = "default") -> dict[str, Any]:
        res = self.api.api.resource(GW if plural != "leases" else "coordination.k8s.io", plural)
        found: dict[str, Any] = res.objects.get((ns, name)) or {}
        return found

    def holder(self) -> Any:
        return (self.obj("leases", "mesh-status-writer", "mesh-system").get("spec") or {}).get(
            "holderIdentity")

    def route_programmed(self) -> dict[str, Any] | None:
        parents = (self.obj("httproutes", "r").get("status") or {}).get("parents") or []
        for c in parents[0]["conditions"] if parents else []:
            if c["type"] == "Programmed":
                return dict(c)
        return None

    def generation(self) -> int:
        return int(self.obj("httproutes", "r")["metadata"]["generation"])

    def status_puts(self) -> int:
        return sum(1 for m, p in self.api.api.requests
                   if m == "PUT" and p.endswith("/status") and "/meshnodes/" not in p)

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
        self.api.stop()
        shutil.rmtree(self.base, ignore_errors=True)
        return logs


def served(address: str) -> bool:
    return http_get(8080, "/", host="c.example", address=address).status == 200


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        logs = c.close()
    for log in logs:
        assert "Traceback" not in log, log


def test_two_nodes_one_writer_programmed_merged(cluster: Cluster) -> None:
    cluster.start("node-a")
    wait_until(lambda: cluster.holder() == "node-a", timeout=10, what="node-a leading")
    cluster.start("node-b")
    # Both nodes serve the Gateway on their own address; the status lists both.
    for address in NODES.values():
        wait_until(partial(served, address), timeout=15, what=f"the route on {address}")
    wait_until(lambda: [a["value"] for a in (cluster.obj("gateways", "gw").get("status") or {})
                        .get("addresses", [])] == list(NODES.values()),
               timeout=10, what="the Gateway's addresses")
    wait_until(lambda: (cluster.route_programmed() or {}).get("status") == "True",
               timeout=10, what="the route Programmed on both nodes")
    assert cluster.holder() == "node-a"

    # Settled: nothing changes, nothing is written again.
    time.sleep(1.0)
    puts = cluster.status_puts()
    time.sleep(2.0)
    assert cluster.status_puts() == puts

    # node-b's Envoy stops taking configuration: the change is Programmed nowhere until it
    # does, and the message names node-b.
    os.kill(cluster.envoy_pid("node-b"), signal.SIGSTOP)
    try:
        cluster.route("/v2")
        gen = cluster.generation()
        wait_until(lambda: (cluster.route_programmed() or {}).get("message") ==
                   f"generation {gen} not yet programmed on node-b", timeout=10,
                   what="Programmed False naming node-b")
        assert cluster.route_programmed()["status"] == "False"  # type: ignore[index]
        wait_until(lambda: http_get(8080, "/v2", host="c.example",
                                    address=NODES["node-a"]).status == 200,
                   timeout=10, what="node-a serving the change")
    finally:
        os.kill(cluster.envoy_pid("node-b"), signal.SIGCONT)
    wait_until(lambda: (cluster.route_programmed() or {}).get("status") == "True",
               timeout=15, what="Programmed once node-b runs it")


def test_leader_killed_the_other_takes_over(cluster: Cluster) -> None:
    a = cluster.start("node-a")
    wait_until(lambda: cluster.holder() == "node-a", timeout=10, what="node-a leading")
    cluster.start("node-b")
    wait_until(lambda: (cluster.route_programmed() or {}).get("status") == "True",
               timeout=15, what="the route Programmed on both nodes")
    a.proc.send_signal(signal.SIGKILL)  # no release: node-b must wait out the lease
    a.proc.wait(5)
    killed = time.monotonic()
    wait_until(lambda: cluster.holder() == "node-b", timeout=10, what="node-b leading")
    took = time.monotonic() - killed
    assert took <= 3 + 2 * 0.3 + 1.0, took  # the duration, a retry, the machine's noise
    # node-b writes status now: a change gets its status from node-b, and node-a, whose
    # agent is gone but whose MeshNode is not stale yet, is named as not running it.
    cluster.route("/after")
    gen = cluster.generation()
    wait_until(lambda: (cluster.route_programmed() or {}).get("message") ==
               f"generation {gen} not yet programmed on node-a", timeout=10,
               what="node-b writing the route's status")
    health = json.loads(cluster.agents["node-b"].health())
    assert health["kubernetes"]["leader"]["leading"] is True
