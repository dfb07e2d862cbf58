"""Sidecarless L7 in the lab: GAMMA routes on Services served by each node's one Envoy, the
datapath handing only those Services' connections to it (bpf_sk_assign), everything else
staying in the kernel. Real pods, real Envoys, real traffic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.lab import cluster
from tests.test_lab import ROOT, deployment_of, mesh, pods_of, state
from tests.testbed import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]


LAB = f"m{os.getpid() % 10000}"


def deployment(name: str, labels: str, node: int) -> str:
    """One echo pod, on node `node` of the lab (placed by the scheduler, by nodeSelector)."""
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: default}}
spec:
  replicas: 1
  selector: {{matchLabels: {{{labels}}}}}
  template:
    metadata: {{labels: {{{labels}}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {LAB}-node{node}}}
      containers:
      - name: echo
        image: registry.k8s.io/gateway-api/echo-basic:v1.5.1
        env: [{{name: HTTP_PORT, value: "8080"}}]
        ports: [{{name: http, containerPort: 8080}}]
---"""


def service(name: str, selector: str) -> str:
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{{selector}}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---"""


# echo-v1 on node1, echo-v2 on node2, the client on node1, flaky on node2, near on node1
# (the client's node).
APP = (deployment("echo-v1", "app: echo, version: v1", 1)
       + deployment("echo-v2", "app: echo, version: v2", 2) + f"""
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: default}}
spec:
  nodeSelector: {{kubernetes.io/hostname: {LAB}-node1}}
  containers:
  - name: client
    image: busybox
    command: [sleep, infinity]
---""" + deployment("flaky", "app: flaky", 2) + deployment("near", "app: near", 1)
       + service("echo", "app: echo") + service("echo-v1", "app: echo, version: v1")
       + service("echo-v2", "app: echo, version: v2") + service("plain", "app: echo")
       + service("flaky", "app: flaky") + service("near", "app: near"))
ROUTES = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-split, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        statusCode: 301
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
  - backendRefs: [{name: echo-v1, port: 80, weight: 90}, {name: echo-v2, port: 80, weight: 10}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: flaky-retry, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: flaky}]
  rules:
  - backendRefs: [{name: flaky, port: 80}]
    retry: {codes: [503], attempts: 3}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: near, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: near}]
  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-mesh, value: near}]}
    backendRefs: [{name: near, port: 80}]
"""
# GET each URL: status, answering pod (or Location), the response's x-mesh header, and
# whether the backend saw Envoy's x-request-id.
GET = """
import json, sys, urllib.request, urllib.error
class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k): return None
opener = urllib.request.build_opener(NoRedirect)
headers = json.loads(sys.argv[1])
for url in sys.argv[2:]:
    try:
        r = opener.open(urllib.request.Request(url, headers=headers), timeout=5)
        doc = json.load(r)
        print(json.dumps([r.status, doc["pod"], r.headers.get("x-mesh"),
                          "X-Request-Id" in doc["headers"], doc["client"]]), flush=True)
    except urllib.error.HTTPError as e:
        print(json.dumps([e.code, e.headers.get("location"), None, False, ""]), flush=True)
    except OSError as e:
        print(json.dumps([0, str(e), None, False, ""]), flush=True)
"""


def get(lab: str, *urls: str, headers: dict[str, str] | None = None) -> list[list[Any]]:
    out = mesh("lab", "exec", "--name", lab, "client", "--", sys.executable, "-c", GET,
               json.dumps(headers or {}), *urls, timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def envoy_stat(lab: str, node: str, name: str) -> int:
    sock = cluster.lab_dir(lab) / node / "agent" / "envoy-admin.sock"
    out = subprocess.run(["curl", "-s", "--unix-socket", str(sock), "http://admin/stats"],
                         capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


MESH_CX = "listener.0.0.0.0_15001.downstream_cx_total"


def mesh_connections(lab: str) -> int:
    """Connections both nodes' mesh listeners accepted."""
    return sum(envoy_stat(lab, n, MESH_CX) for n in (f"{lab}-node1", f"{lab}-node2"))


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mesh")
    (path / "app.yaml").write_text(APP)
    (path / "routes.yaml").write_text(ROUTES)
    return path


@pytest.fixture(scope="module")
def lab(manifests: Path) -> Iterator[str]:
    path = manifests
    name = LAB
    up = mesh("lab", "up", "--nodes", "2", "--name", name, "--manifests", str(path))
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        # The routes are in Envoy once the canary answers from v2.
        wait_until(lambda: get(name, "http://echo/", headers={"x-canary": "yes"})[0][1]
                   .startswith("echo-v2"), timeout=20, what="the mesh routes served")
        yield name
    finally:
        down = mesh("lab", "down", "--name", name)
        assert down.returncode == 0, down.stderr


def test_a_gamma_route_splits_90_10_and_envoy_sees_the_client(lab: str) -> None:
    before = mesh_connections(lab)
    got = get(lab, *["http://echo/"] * 200)
    assert all(r[0] == 200 and r[3] for r in got), got[:3]  # through Envoy: x-request-id
    shares = Counter(deployment_of(r[1]) for r in got)
    # 10% of 200 is 20 with a standard deviation of 4.2: 5..40 is beyond 3.5 of them, so the
    # split is checked without a flaky bound (10..35 failed about one run in a hundred).
    assert set(shares) == {"echo-v1", "echo-v2"} and 5 <= shares["echo-v2"] <= 40, shares
    assert mesh_connections(lab) - before == 200  # one connection each, no loop
    # Envoy's access log: the client pod's own address and the ClusterIP it called.
    client = state(lab)["pods"]["default/client"]
    echo_ip = next(s for s in state(lab)["services"] if s["name"] == "echo")["clusterIP"]
    log = (cluster.lab_dir(lab) / client["node"] / "agent" / "envoy.log").read_text()
    entries = [json.loads(line) for line in log.splitlines() if line.startswith('{"mesh"')]
    assert entries and entries[-1]["client"].startswith(client["ip"] + ":"), entries[-1:]
    assert entries[-1]["destination"] == f"{echo_ip}:80"


def test_a_header_match_goes_to_the_canary_and_a_redirect_is_answered(lab: str) -> None:
    got = get(lab, *["http://echo/"] * 10, headers={"x-canary": "yes"})
    assert {deployment_of(r[1]) for r in got} == {"echo-v2"}, got
    assert get(lab, "http://echo/old/page")[0][:2] == [301, "http://echo/new/page"]


def test_a_retry_hides_a_flaky_backend(lab: str) -> None:
    """The echo fails the first two attempts of a uuid with 503: three attempts succeed."""
    got = get(lab, *[f"http://flaky/?responseCode=503&succeedAfter=2&uuid=u{i}"
                     for i in range(5)])
    assert [r[0] for r in got] == [200] * 5, got
    # Without the route's retry (straight to the pod) the backend's 503 shows.
    (flaky,) = pods_of(lab, "flaky")
    pod = state(lab)["pods"][f"default/{flaky}"]["ip"]
    assert get(lab, f"http://{pod}:8080/?responseCode=503&succeedAfter=2&uuid=direct")[0][0] \
        == 503


def test_a_service_without_routes_never_touches_envoy(lab: str) -> None:
    before = mesh_connections(lab)
    got = get(lab, *["http://plain/"] * 20)
    assert all(r[0] == 200 and not r[3] for r in got), got[:3]  # no x-request-id: no Envoy
    assert mesh_connections(lab) == before


def test_no_loop_when_the_backend_is_on_the_clients_node(lab: str) -> None:
    st = state(lab)
    (near,) = pods_of(lab, "near")
    assert st["pods"][f"default/{near}"]["node"] == st["pods"]["default/client"]["node"]
    node = st["pods"]["default/client"]["node"]
    before = envoy_stat(lab, node, MESH_CX)
    got = get(lab, *["http://near/"] * 10)
    assert all(r[0] == 200 and r[2] == "near" for r in got), got
    assert envoy_stat(lab, node, MESH_CX) - before == 10


def test_removing_a_route_moves_the_flow_back_to_the_kernel(lab: str,
                                                            manifests: Path) -> None:
    routes = manifests / "routes.yaml"
    assert get(lab, "http://near/")[0][2] == "near"
    text = routes.read_text()
    held = subprocess.Popen(  # an established connection to another Service, held open
        [sys.executable, "-m", "mesh.cli", "lab", "exec", "--name", lab, "client", "--",
         sys.executable, "-c", HOLD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, cwd=ROOT)
    try:
        assert ask(held) == "ok"
        routes.write_text(text.split("---\napiVersion: gateway.networking.k8s.io/v1\n"
                                     "kind: HTTPRoute\nmetadata: {name: near")[0])
        wait_until(lambda: get(lab, "http://near/")[0][2] is None, timeout=20,
                   what="near served by the kernel again")
        before = mesh_connections(lab)
        assert all(r[0] == 200 and not r[3] for r in get(lab, *["http://near/"] * 5))
        assert mesh_connections(lab) == before
        assert ask(held) == "ok"  # the other Service's connection went on
    finally:
        routes.write_text(text)
        held.kill()
    wait_until(lambda: get(lab, "http://near/")[0][2] == "near", timeout=20,
               what="near through Envoy again")


# Keeps one connection to the plain Service open; answers each line of stdin through it.
HOLD = """
import socket, sys
c = socket.create_connection(("plain", 80), timeout=10)
for line in sys.stdin:
    c.sendall(b"GET / HTTP/1.1\\r\\nHost: plain\\r\\n\\r\\n")
    data = b""
    while b"}" not in data:
        data += c.recv(65536)
    print("ok" if b'"pod"' in data else "bad", flush=True)
"""


def ask(proc: subprocess.Popen[str]) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("x\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def test_an_envoy_killed_fails_only_redirected_flows_until_it_is_back(lab: str) -> None:
    node = state(lab)["pods"]["default/client"]["node"]
    pid_file = cluster.lab_dir(lab) / node / "agent" / "envoy.pid"
    pid = int(json.loads(pid_file.read_text())["pid"])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    kernel_ok = redirected_ok = 0
    while time.monotonic() < deadline:
        plain, near = get(lab, "http://plain/", "http://near/")
        assert plain[0] == 200, plain  # the kernel's flows: never interrupted
        kernel_ok += 1
        if near[0] == 200 and near[2] == "near":
            redirected_ok += 1
            if redirected_ok >= 3:
                break
    assert redirected_ok >= 3, "the redirected Service did not come back within 30 s"
    assert int(json.loads(pid_file.read_text())["pid"]) != pid  # a new Envoy serves
