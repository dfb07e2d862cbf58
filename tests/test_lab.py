"""`mesh lab` end to end: nodes and pods in network namespaces, one agent and one Envoy per
node, pods wired by the CNI plugin, Services balanced by the eBPF datapath; then nothing
left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.lab import cluster
from tests.testbed import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent

APP = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: default}
spec:
  replicas: 2
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers:
      - name: echo
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /, port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  clusterIP: 10.96.7.7
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-np, namespace: default}
spec:
  type: NodePort
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata:
  name: echo-maglev
  namespace: default
  annotations: {mesh.dev/lb-algorithm: maglev}
spec:
  type: NodePort
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: gated, namespace: default, labels: {app: gated}}
spec:
  containers:
  - name: echo
    ports: [{containerPort: 8080}]
    readinessProbe:
      exec: {command: [test, -e, GATE]}
      periodSeconds: 1
      failureThreshold: 1
---
apiVersion: v1
kind: Service
metadata: {name: gated, namespace: default}
spec:
  selector: {app: gated}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
spec:
  containers:
  - name: client
    command: [sleep, infinity]
"""
GET = """
import json, sys, urllib.request
for _ in range(int(sys.argv[2])):
    print(json.load(urllib.request.urlopen(sys.argv[1], timeout=5))["pod"], flush=True)
"""
HOLD = """
import socket, sys
c = socket.create_connection(("10.96.7.7", 80), timeout=10)
for line in sys.stdin:
    c.sendall(b"GET /" + line.strip().encode() + b" HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    data = b""
    while b"}" not in data:
        data += c.recv(4096)
    print("ok" if b'"pod"' in data else "bad", flush=True)
"""


# The gated pod's readinessProbe passes while this file exists.
GATE = Path(f"/tmp/mesh-lab-gate-{os.getpid()}")
APP = APP.replace("GATE", str(GATE))


def mesh(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, **kw)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("lab")
    (path / "app.yaml").write_text(APP)
    GATE.touch()
    yield path
    GATE.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def lab(manifests: Path) -> Iterator[str]:
    name = f"t{os.getpid() % 10000}"
    up = mesh("lab", "up", "--nodes", "2", "--name", name, "--manifests", str(manifests))
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        yield name
    finally:
        down = mesh("lab", "down", "--name", name)
        assert down.returncode == 0, down.stderr


def state(name: str) -> dict[str, Any]:
    data = cluster.read_state(name)
    assert data is not None
    return data


def exec_in(name: str, pod: str, code: str, *args: str) -> list[str]:
    out = mesh("lab", "exec", "--name", name, pod, "--", sys.executable, "-c", code, *args,
               timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_pods_spread_over_nodes_and_a_cluster_ip_reaches_every_backend(lab: str) -> None:
    pods = state(lab)["pods"]
    assert {pods["default/echo-0"]["node"], pods["default/echo-1"]["node"]} == \
        {f"{lab}-node1", f"{lab}-node2"}
    seen = exec_in(lab, "client", GET, "http://10.96.7.7/", "30")
    assert set(seen) == {"echo-0", "echo-1"}, seen
    # Pod to pod across nodes, by IP, and the Service's variables in the pod's environment.
    other = pods["default/echo-1"]["ip"]
    assert exec_in(lab, "client", GET, f"http://{other}:8080/", "1") == ["echo-1"]
    env = exec_in(lab, "client", "import os; print(os.environ['ECHO_SERVICE_HOST'])")
    assert env == ["10.96.7.7"]
    table = mesh("lab", "status", "--name", lab).stdout
    assert "10.96.7.7" in table and "echo-0" in table and f"{lab}-node2" in table


def test_a_pod_reaches_a_service_that_selects_itself(lab: str) -> None:
    """Hairpin: echo-0 calls its own Service and is among those that answer."""
    seen = exec_in(lab, "echo-0", GET, "http://10.96.7.7/", "30")
    assert set(seen) == {"echo-0", "echo-1"}, seen


def test_cluster_dns_resolves_services_by_short_and_full_names(lab: str) -> None:
    code = "import socket, sys; print(*[socket.gethostbyname(h) for h in sys.argv[1:]])"
    got = exec_in(lab, "client", code, "echo", "echo.default",
                  "echo.default.svc.cluster.local")
    assert got == ["10.96.7.7"] * 3
    assert exec_in(lab, "client", GET, "http://echo.default/", "1")[0] in ("echo-0", "echo-1")


def http_get(url: str, source_port: int = 0) -> dict[str, Any]:
    """One GET from the host, from `source_port` if given; closed with a RST so that the
    same port can be used again at once (no TIME_WAIT)."""
    host, _, port = url.split("/")[2].partition(":")
    with socket.create_connection((host, int(port)), timeout=5,
                                  source_address=("", source_port)) as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    doc: dict[str, Any] = json.loads(data.partition(b"\r\n\r\n")[2])
    return doc


def node_port(name: str, service: str) -> int:
    svc = next(s for s in state(name)["services"] if s["name"] == service)
    return int(svc["ports"][0]["nodePort"])


def test_a_node_port_answers_from_the_host_on_every_node(lab: str) -> None:
    """NodePort, balanced at the node's underlay device: a local backend sees the client's
    own address, a backend on the other node sees the node the request came in on (SNAT)."""
    st = state(lab)
    nodes = {n["name"]: n["underlay"] for n in st["node_info"]}
    where = {k.split("/")[1]: p["node"] for k, p in st["pods"].items()}
    assert node_port(lab, "echo-np") == 30080
    for node, address in nodes.items():
        seen: dict[str, str] = {}
        for _ in range(30):
            doc = http_get(f"http://{address}:30080/")
            seen[doc["pod"]] = doc["client"].rpartition(":")[0]
        assert set(seen) == {"echo-0", "echo-1"}, (node, seen)
        for pod, client in seen.items():
            expected = st["host_address"] if where[pod] == node else address
            assert client == expected, (node, pod, seen)
    assert "80:30080/TCP" in mesh("lab", "status", "--name", lab).stdout


def test_maglev_gives_a_flow_the_same_backend_on_every_node(lab: str) -> None:
    """The same client address and port reach the same backend whichever node they enter
    (the nodes compute the same Maglev table); different ports spread over the backends."""
    port = node_port(lab, "echo-maglev")
    assert 30000 <= port < 32768
    addresses = [n["underlay"] for n in state(lab)["node_info"]]
    base = 20000 + os.getpid() % 20000
    picks = {}
    for source in range(base, base + 24):
        got = {http_get(f"http://{a}:{port}/", source)["pod"] for a in addresses}
        assert len(got) == 1, (source, got)
        picks[source] = got.pop()
    assert set(picks.values()) == {"echo-0", "echo-1"}, picks
    # ... and again: the flow's backend did not depend on which node saw it first.
    for source in list(picks)[:6]:
        assert http_get(f"http://{addresses[-1]}:{port}/", source)["pod"] == picks[source]


def test_a_readiness_probe_takes_the_endpoint_out_and_back(lab: str) -> None:
    """An exec readinessProbe (period 1 s, one failure): the pod's endpoint leaves its
    Service's EndpointSlice while the probe fails and comes back when it passes."""
    def endpoints() -> list[str]:
        svc = next(s for s in state(lab)["services"] if s["name"] == "gated")
        return [str(e) for e in svc["endpoints"]]

    ip = state(lab)["pods"]["default/gated"]["ip"]
    assert endpoints() == [ip]
    GATE.unlink()
    try:
        wait_until(lambda: endpoints() == [], timeout=10, what="the endpoint gone")
        assert not state(lab)["pods"]["default/gated"]["ready"]
    finally:
        GATE.touch()
    wait_until(lambda: endpoints() == [ip], timeout=10, what="the endpoint back")


def test_a_pod_that_exits_is_restarted_and_serves_again(lab: str) -> None:
    pid = state(lab)["pods"]["default/echo-0"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: state(lab)["pods"]["default/echo-0"]["restarts"] >= 1, timeout=20,
               what="the pod restarted")
    wait_until(lambda: state(lab)["pods"]["default/echo-0"]["ready"], timeout=30,
               what="the pod ready again")
    wait_until(lambda: "echo-0" in exec_in(lab, "client", GET, "http://10.96.7.7/", "10"),
               timeout=30, what="the restarted pod behind the Service")


def test_an_agent_killed_keeps_connections_and_services(lab: str) -> None:
    node = state(lab)["pods"]["default/client"]["node"]
    hold = subprocess.Popen([sys.executable, "-m", "mesh.cli", "lab", "exec", "--name", lab,
                             "client", "--", sys.executable, "-c", HOLD],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert hold.stdin is not None and hold.stdout is not None
    try:
        hold.stdin.write("before\n")
        hold.stdin.flush()
        assert hold.stdout.readline().strip() == "ok"
        killed = state(lab)["agents"][node]
        os.kill(killed, signal.SIGKILL)
        hold.stdin.write("during\n")
        hold.stdin.flush()
        assert hold.stdout.readline().strip() == "ok"  # the connection survives
        # New connections keep working with no agent (pinned maps, attached programs).
        assert len(exec_in(lab, "client", GET, "http://10.96.7.7/", "5")) == 5
    finally:
        hold.stdin.close()
        hold.wait(10)
    # The supervisor starts the node's agent again; it adopts the Envoy and the maps.
    wait_until(lambda: state(lab)["agents"][node] != killed, timeout=20,
               what="the agent restarted")
    assert len(exec_in(lab, "client", GET, "http://10.96.7.7/", "5")) == 5


def test_a_scaled_down_deployment_loses_its_pod_and_endpoint(lab: str,
                                                            manifests: Path) -> None:
    (manifests / "app.yaml").write_text(APP.replace("replicas: 2", "replicas: 1"))
    wait_until(lambda: "default/echo-1" not in state(lab)["pods"], timeout=20,
               what="echo-1 removed")
    assert f"{lab}-default-echo-1" not in _netns()
    wait_until(lambda: set(exec_in(lab, "client", GET, "http://10.96.7.7/", "10")) ==
               {"echo-0"}, timeout=20, what="only echo-0 behind the Service")
    svc = next(s for s in state(lab)["services"] if s["name"] == "echo")
    assert svc["clusterIP"] == "10.96.7.7" and len(svc["endpoints"]) == 1


def test_lab_down_leaves_nothing(tmp_path: Path) -> None:
    name = f"d{os.getpid() % 10000}"
    (tmp_path / "app.yaml").write_text(APP.replace("10.96.7.7", "10.96.7.8"))
    try:
        up = mesh("lab", "up", "--nodes", "2", "--name", name, "--manifests", str(tmp_path))
        assert up.returncode == 0, up.stderr
        made = {ns for ns in _netns() if ns.startswith(f"{name}-")}
        assert len(made) >= 6  # underlay, 2 nodes, 3 pods
        host_link = f"mlab{state(name)['index']}"
        assert _links() >= {host_link}
    finally:
        down = mesh("lab", "down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert not {ns for ns in _netns() if ns.startswith(f"{name}-")}
    assert not cluster.lab_dir(name).exists()
    assert host_link not in _links()
    mounts = Path("/proc/mounts").read_text()
    assert str(cluster.lab_dir(name)) not in mounts
    assert not (cluster.CGROUP_ROOT / name).exists()
    assert not [p for p in Path("/etc/netns").glob(f"{name}-*")]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(cluster.lab_dir(name)) not in ps
    assert "no lab" in mesh("lab", "status", "--name", name).stderr


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_clear_errors() -> None:
    out = mesh("lab", "status", "--name", "no-such-lab")
    assert out.returncode != 0 and "no lab 'no-such-lab'" in out.stderr

