"""`make run`'s lab (examples/lab) end to end. A module of its own: the lab it brings up
must be the only one running, since examples/lab names the nodes' addresses of the first
lab (172.30.0.0/24)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mesh.hubble.servicemap import browse
from mesh.lab import cluster
from tests.test_lab import ROOT, deployment_of, exec_in, kubectl, mesh, state
from tests.testbed import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_the_demo_gateway_answers_on_both_nodes() -> None:
    """`make run`'s lab: the Gateway on each node's address, 90/10 over two versions, from
    a pod and from the host; a pod calling the echo Service through its node's Envoy (the
    GAMMA route: 90/10, marked), the NodePort from the host in the kernel; and kubectl
    against the lab's API server shows the status the agents wrote."""
    name = f"g{os.getpid() % 10000}"
    up = mesh("lab", "up", "--nodes", "2", "--name", name, "--manifests",
              str(ROOT / "examples" / "lab"))
    try:
        assert up.returncode == 0, up.stderr
        code = """
import json, sys, urllib.request
for node in sys.argv[1:]:
    r = urllib.request.Request(f"http://{node}:8080/", headers={"Host": "echo.example"})
    print(json.load(urllib.request.urlopen(r, timeout=5))["pod"].rsplit("-", 2)[0])
"""
        nodes = ["172.30.0.11", "172.30.0.12"]
        # `lab up` returns once the pods run; the agents' first builds (every pod's identity
        # made, on a machine busy with the other tests) may take longer than that.
        wait_until(lambda: mesh("lab", "exec", "--name", name, "client", "--",
                                sys.executable, "-c", code, *nodes).returncode == 0,
                   timeout=30, what="both Gateways answering")
        got = exec_in(name, "client", code, *nodes * 10)
        assert set(got) <= {"echo-v1", "echo-v2"} and got.count("echo-v1") >= 12, got
        # From the host, through either node's Gateway, to pods on both nodes.
        pods: dict[str, set[str]] = {n: set() for n in nodes}
        for node in nodes * 20:
            r = urllib.request.Request(f"http://{node}:8080/", headers={"Host": "echo.example"})
            pods[node].add(json.load(urllib.request.urlopen(r, timeout=5))["pod"])
        # Each Gateway reaches every echo-v1 replica wherever the scheduler put it (the
        # spread constraint counts all three echo pods: both v1 replicas may share a node,
        # and then the other node's Gateway reaches them across nodes).
        where = {k.split("/")[1]: p["node"] for k, p in state(name)["pods"].items()}
        replicas = {p for p in where if p.startswith("echo-v1")}
        assert len(replicas) == 2, where
        for node, seen in pods.items():
            assert replicas <= seen, (node, seen, where)
        mesh_code = """
import json, urllib.request
for _ in range(100):
    r = urllib.request.urlopen("http://echo/", timeout=5)
    print(json.load(r)["pod"].rsplit("-", 2)[0], r.headers.get("x-mesh"))
"""
        out = exec_in(name, "client", mesh_code)
        versions, marks = out[0::2], set(out[1::2])
        assert marks == {"node-envoy"}, marks
        assert 75 <= versions.count("echo-v1") <= 98, versions
        # The global limit (examples/lab/policies.yaml): 5 a minute per x-user, counted
        # once for both nodes' Gateways. A first decision on each node also opens its rate
        # limit service's Redis connection, which on a loaded machine can take longer than
        # the decision's 50 ms (the limit fails open then): one request per node first, for
        # another user.
        for node in nodes:
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(urllib.request.Request(
                    f"http://{node}:8080/", headers={"Host": "echo.example",
                                                     "x-user": "warm-up"}), timeout=5)
        statuses = []
        for node in nodes * 4:
            r = urllib.request.Request(f"http://{node}:8080/", headers={
                "Host": "echo.example", "x-user": "demo"})
            try:
                statuses.append(urllib.request.urlopen(r, timeout=5).status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)
        assert statuses == [200] * 5 + [429] * 3, statuses
        # `kubectl get gateways,httproutes -A`: the leader agent's status, both addresses.
        gateway = json.loads(kubectl(name, "get", "gateway", "demo", "-o", "json").stdout)
        assert [a["value"] for a in gateway["status"]["addresses"]] == nodes
        programmed = next(c for c in gateway["status"]["conditions"]
                          if c["type"] == "Programmed")
        assert programmed["status"] == "True", programmed
        route = json.loads(kubectl(name, "get", "httproute", "echo", "-o", "json").stdout)
        (parent,) = route["status"]["parents"]
        assert parent["controllerName"] == "mesh.dev/gateway-controller"
        assert {c["type"]: c["status"] for c in parent["conditions"]}["Accepted"] == "True"
        table = kubectl(name, "get", "gateways,httproutes", "-A").stdout
        assert "172.30.0.11" in table and "True" in table, table
        # The Deployments' pods are the ReplicaSets' (named by them), placed by the scheduler.
        echo = [k.split("/")[1] for k in state(name)["pods"] if k != "default/client"]
        assert sorted(map(deployment_of, echo)) == ["echo-v1", "echo-v1", "echo-v2"], echo
        observability(name)
    finally:
        assert mesh("lab", "down", "--name", name).returncode == 0


def observed(name: str, *args: str) -> list[dict[str, Any]]:
    """`mesh observe` through the lab's relay, as JSON lines: the flows."""
    out = mesh("observe", "--lab", name, "--last", "2000", "-o", "json", *args, timeout=60)
    assert out.returncode == 0, out.stderr
    return [r["flow"] for r in map(json.loads, out.stdout.splitlines()) if "flow" in r]


def observability(name: str) -> None:
    """The demo's traffic as flows through the relay (`mesh observe`, and Hubble's own CLI):
    the GAMMA requests with their status and workloads, a connection to the echo pods'
    closed admin port dropped by their policy (examples/lab/network-policy.yaml), each
    node's metrics."""
    closed = """
import socket
try:
    socket.create_connection(("echo-admin", 9000), timeout=2)
    print("connected")
except OSError:
    print("refused")
"""
    assert exec_in(name, "client", closed) == ["refused"]
    dropped: list[dict[str, Any]] = []

    def seen_dropped() -> bool:
        dropped[:] = observed(name, "--verdict", "DROPPED", "--from-pod", "default/client",
                              "--to-port", "9000")
        return bool(dropped)
    wait_until(seen_dropped, timeout=15, what="the dropped connection as a flow")
    flow = dropped[0]
    assert flow["drop_reason_desc"] == "POLICY_DENIED", flow
    assert flow["destination"]["pod_name"].startswith("echo-"), flow
    assert flow["traffic_direction"] == "INGRESS"  # the echo pod's ingress policy
    # The socket load balancer sent it from the echo-admin Service straight to that pod:
    # told as a translation, on the client's node, the Service named, one connection id
    translated = observed(name, "--verdict", "TRANSLATED", "--from-pod", "default/client",
                          "--to-port", "9000")
    ids = {f["extensions"]["value"]["connection_id"] for f in translated}
    client_node = [f for f in observed(name, "--from-pod", "default/client", "--to-port",
                                       "9000", "--not", "--verdict", "TRANSLATED")
                   if f["extensions"]["value"]["connection_id"] in ids]
    assert translated and client_node, translated
    for f in translated:
        assert f["destination_service"] == {"namespace": "default", "name": "echo-admin"}
        assert f["destination"]["pod_name"].startswith("echo-"), f
    assert all(f.get("destination_service", {}).get("name") == "echo-admin"
               for f in client_node)
    # The relay found the agents in the API server and asks them over mutual TLS
    relay_log = (cluster.lab_dir(name) / "hubble-relay.log").read_text()
    assert re.search(r'relay peers nodes=\["[^"]+", "[^"]+"\]', relay_log), relay_log
    # The GAMMA requests of the test: responses from the echo pods to the client, their
    # status and workload named, each joined to the connection it came on.
    http = observed(name, "--protocol", "http", "--to-pod", "default/client")
    assert len(http) >= 50, len(http)
    connections = {f["extensions"]["value"]["connection_id"]
                   for f in observed(name, "--from-pod", "default/client", "--to-port", "80")
                   if "extensions" in f}
    joined = [f for f in http if f.get("extensions", {}).get("value", {}).get(
        "connection_id") in connections]
    assert len(joined) >= len(http) // 2, (len(joined), len(http))
    assert {f["l7"]["http"]["code"] for f in http} == {200}
    assert {w["name"] for f in http for w in f["source"]["workloads"]} <= \
        {"echo-v1", "echo-v2"}
    assert {f["destination_service"]["name"] for f in http if "destination_service" in f} \
        <= {"echo"}
    # L7 visibility without a route: echo-v2 (eBPF only, no route) annotated, its requests
    # are seen by the client's node Envoy and become HTTP flows
    assert kubectl(name, "annotate", "service", "echo-v2",
                   "mesh.dev/l7-visibility=http").returncode == 0
    request = """
import urllib.request
print(urllib.request.urlopen("http://echo-v2/", timeout=5).status)
"""

    def seen_by_envoy() -> bool:
        assert exec_in(name, "client", request) == ["200"]
        return any(w["name"] == "echo-v2" for f in observed(name, "--protocol", "http")
                   for w in f["source"].get("workloads", []))
    wait_until(seen_by_envoy, timeout=30, what="echo-v2's requests as HTTP flows")
    # Hubble's own CLI, against the relay, unchanged
    relay = cluster.lab_dir(name) / "hubble-relay.sock"
    hubble = subprocess.run([str(ROOT / ".kube" / "bin" / "hubble"), "observe", "--server",
                             f"unix://{relay}", "--last", "1000", "--verdict", "DROPPED",
                             "--to-port", "9000", "-o", "json"],
                            capture_output=True, text=True, timeout=60)
    assert hubble.returncode == 0, hubble.stderr
    assert "POLICY_DENIED" in hubble.stdout
    # The service map of what was seen, in a real headless Chromium
    with tempfile.TemporaryDirectory() as tmp:
        page, png = Path(tmp) / "map.html", Path(tmp) / "map.png"
        made = mesh("map", "--lab", name, "-o", str(page), "--png", str(png), timeout=120)
        assert made.returncode == 0, made.stderr
        dom = browse(page, "--dump-dom")
        assert 'data-ready="1"' in dom.stdout, dom.stderr[-2000:]
        for workload in ("default/client", "default/echo-v1", "default/echo-v2"):
            assert f'data-name="{workload}"' in dom.stdout, workload
        assert "dropped (POLICY_DENIED)" in dom.stdout and "req/s" in dom.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each node's metrics, on its own loopback
    metrics = """
import urllib.request
print(urllib.request.urlopen("http://127.0.0.1:9965/metrics", timeout=5).read().decode())
"""
    node = next(n for n in state(name)["nodes"]
                if n == dropped[0]["node_name"])
    out = subprocess.run(["ip", "netns", "exec", node, sys.executable, "-c", metrics],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert re.search(r'hubble_drop_total\{protocol="TCP",reason="POLICY_DENIED"\} [1-9]',
                     out.stdout), out.stdout[:3000]
