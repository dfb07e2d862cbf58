"""`make run`'s lab (examples/lab) end to end. A module of its own: the lab it brings up
must be the only one running, since examples/lab names the nodes' addresses of the first
lab (172.30.0.0/24)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.error
import urllib.request

import pytest

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
    finally:
        assert mesh("lab", "down", "--name", name).returncode == 0
