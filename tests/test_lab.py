"""`mesh lab` end to end: a real control plane, nodes and pods in network namespaces (the
lab's kubelets), one agent and one Envoy per node, pods wired by the CNI plugin, Services
balanced by the eBPF datapath; then nothing left behind."""

from __future__ import annotations

import ipaddress
import json
import os
import re
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
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule,
         labelSelector: {matchLabels: {app: echo}}}
      containers:
      - name: echo
        image: registry.k8s.io/gateway-api/echo-basic:v1.5.1
        env: [{name: HTTP_PORT, value: "8080"}]
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
    image: registry.k8s.io/gateway-api/echo-basic:v1.5.1
    env: [{name: HTTP_PORT, value: "8080"}]
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
    image: busybox
    command: [sleep, infinity]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: pooled, namespace: default}
spec:
  gatewayClassName: mesh
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: pooled, namespace: default}
spec:
  parentRefs: [{name: pooled}]
  rules: [{backendRefs: [{name: echo, port: 80}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: broken, namespace: default}
spec:
  containers:
  - name: broken
    image: broken
    command: [/no/such/command]
---
apiVersion: v1
kind: Pod
metadata: {name: needs-volume, namespace: default}
spec:
  containers:
  - name: app
    image: app
    command: [sleep, infinity]
    volumeMounts: [{name: data, mountPath: /data}]
  volumes: [{name: data, secret: {secretName: not-there}}]
---
apiVersion: v1
kind: Secret
metadata: {name: lab-secret, namespace: default}
stringData: {token: s3cret}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: lab-config, namespace: default}
data: {greeting: hello}
---
apiVersion: v1
kind: Pod
metadata: {name: volumes, namespace: default, labels: {tier: lab}}
spec:
  containers:
  - name: app
    image: app
    command: [sh, -c, 'cat MNT/secret/token MNT/config/hi MNT/info/labels; echo;
      touch MNT/secret/new 2>/dev/null || echo read-only; sleep infinity']
    volumeMounts:
    - {name: secret, mountPath: MNT/secret, readOnly: true}
    - {name: config, mountPath: MNT/config}
    - {name: info, mountPath: MNT/info}
  volumes:
  - {name: secret, secret: {secretName: lab-secret, defaultMode: 0400}}
  - {name: config, configMap: {name: lab-config, items: [{key: greeting, path: hi}]}}
  - {name: info, downwardAPI: {items: [{path: labels, fieldRef: {fieldPath: metadata.labels}}]}}
---
apiVersion: v1
kind: Pod
metadata: {name: unknown-image, namespace: default}
spec:
  containers:
  - {name: app, image: example.com/app:1.0}
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
# Where the volumes pod mounts its volumes (made on the host as empty mountpoints).
MNT = Path(f"/etc/mesh-lab-test-{os.getpid()}")
APP = APP.replace("GATE", str(GATE)).replace("MNT", str(MNT))


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
        assert not MNT.exists()  # the volumes' mountpoints went with their pod


def state(name: str) -> dict[str, Any]:
    data = cluster.read_state(name)
    assert data is not None
    return data


def deployment_of(pod: str) -> str:
    """A ReplicaSet's pod's Deployment: `echo-v1-7f49b47fdb-9vb6w` -> `echo-v1`."""
    return pod.rsplit("-", 2)[0]


def pods_of(name: str, deployment: str) -> list[str]:
    """The running pods of a Deployment (names, sorted)."""
    return sorted(k.split("/")[1] for k, p in state(name)["pods"].items()
                  if p["owner"] == deployment and not p["deleting"])


def kubectl(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / ".kube" / "bin" / "kubectl"), "--kubeconfig",
                           state(name)["kubeconfig"], *args], capture_output=True, text=True,
                          timeout=60)


def exec_in(name: str, pod: str, code: str, *args: str) -> list[str]:
    out = mesh("lab", "exec", "--name", name, pod, "--", sys.executable, "-c", code, *args,
               timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_pods_spread_over_nodes_and_a_cluster_ip_reaches_every_backend(lab: str) -> None:
    """The ReplicaSet's pods (named by it), placed by the scheduler as their spread
    constraint asks, behind a ClusterIP the API server gave as asked."""
    pods = state(lab)["pods"]
    echo = pods_of(lab, "echo")
    assert len(echo) == 2 and {pods[f"default/{p}"]["node"] for p in echo} == \
        {f"{lab}-node1", f"{lab}-node2"}
    seen = exec_in(lab, "client", GET, "http://10.96.7.7/", "30")
    assert set(seen) == set(echo), seen
    # Pod to pod across nodes, by IP, and the Service's variables in the pod's environment.
    other = next(p for p in echo if pods[f"default/{p}"]["node"] !=
                 pods["default/client"]["node"])
    ip = pods[f"default/{other}"]["ip"]
    assert exec_in(lab, "client", GET, f"http://{ip}:8080/", "1") == [other]
    env = exec_in(lab, "client", "import os; print(os.environ['ECHO_SERVICE_HOST'])")
    assert env == ["10.96.7.7"]
    table = mesh("lab", "status", "--name", lab).stdout
    assert "10.96.7.7" in table and echo[0] in table and f"{lab}-node2" in table
    # ... and kubectl says the same, from the lab's API server.
    wide = kubectl(lab, "get", "pods", "-o", "wide").stdout
    assert all(p in wide for p in echo) and ip in wide


def test_a_pod_that_cannot_run_waits_with_the_reason_and_the_others_run(lab: str) -> None:
    """A command that does not exist: the kubelet's CreateContainerError and its message in
    the Pod's status, as a kubelet writes it; the lab came up around it."""
    got = json.loads(kubectl(lab, "get", "pod", "broken", "-o", "json").stdout)
    waiting = got["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "CreateContainerError", waiting
    assert "/no/such/command" in waiting["message"]
    assert state(lab)["pods"]["default/broken"]["reason"] == "CreateContainerError"
    assert "CreateContainerError" in mesh("lab", "status", "--name", lab).stdout
    # A volume of a Secret that is not there: CreateContainerConfigError, naming it.
    got = json.loads(kubectl(lab, "get", "pod", "needs-volume", "-o", "json").stdout)
    waiting = got["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "CreateContainerConfigError", waiting
    assert 'secret "not-there" not found' in waiting["message"]
    # An image the lab has no command for, and no command: ErrImageNeverPull, naming it.
    got = json.loads(kubectl(lab, "get", "pod", "unknown-image", "-o", "json").stdout)
    waiting = got["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "ErrImageNeverPull", waiting
    assert "example.com/app:1.0" in waiting["message"]


def test_volumes_are_mounted_where_the_spec_says_and_only_for_the_pod(lab: str) -> None:
    """A Secret (read-only, mode 0400), a ConfigMap's key under its own path and the
    downward API's labels, at their mountPaths in the container's own mount namespace: the
    process reads them there; the host sees only the empty mountpoints."""
    wait_until(lambda: "read-only" in mesh("lab", "logs", "--name", lab, "volumes").stdout,
               timeout=30, what="the volumes pod's output")
    out = mesh("lab", "logs", "--name", lab, "volumes").stdout
    assert out.startswith('s3crethellotier="lab"'), out
    assert not (MNT / "secret" / "token").exists()  # not on the host's file system
    assert not list((MNT / "secret").iterdir())


def test_kubectl_logs_reads_a_pods_log_through_the_kubelet(lab: str) -> None:
    """`kubectl logs`: the API server asks the node's kubelet (its HTTPS endpoint on the
    node's address, certificates both ways) for the container's log, with --tail,
    --timestamps and --since as a kubelet answers them."""
    pod = pods_of(lab, "echo")[0]
    ip = state(lab)["pods"][f"default/{pod}"]["ip"]
    exec_in(lab, "client", GET, f"http://{ip}:8080/logged-{os.getpid()}", "1")
    line = f"Echoing back request made to /logged-{os.getpid()} to client"
    wait_until(lambda: line in kubectl(lab, "logs", pod).stdout, timeout=10,
               what="the request in kubectl logs")
    tail = kubectl(lab, "logs", pod, "--tail=1", "--timestamps").stdout.splitlines()
    assert len(tail) == 1 and re.match(r"\d{4}-\d\d-\d\dT[\d:.]+Z ", tail[0]), tail
    assert line in kubectl(lab, "logs", pod, "--since=60s").stdout
    assert kubectl(lab, "logs", pod, "--since-time=2999-01-01T00:00:00Z").stdout == ""


def test_a_pod_reaches_a_service_that_selects_itself(lab: str) -> None:
    """Hairpin: an echo pod calls its own Service and is among those that answer."""
    echo = pods_of(lab, "echo")
    seen = exec_in(lab, echo[0], GET, "http://10.96.7.7/", "30")
    assert set(seen) == set(echo), seen


def test_cluster_dns_resolves_services_by_short_and_full_names(lab: str) -> None:
    code = "import socket, sys; print(*[socket.gethostbyname(h) for h in sys.argv[1:]])"
    got = exec_in(lab, "client", code, "echo", "echo.default",
                  "echo.default.svc.cluster.local")
    assert got == ["10.96.7.7"] * 3
    assert exec_in(lab, "client", GET, "http://echo.default/", "1")[0] in pods_of(lab, "echo")


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
        assert set(seen) == set(pods_of(lab, "echo")), (node, seen)
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
    # Below the kernel's ephemeral range (32768-60999): no other socket of the host holds them.
    base = 10000 + os.getpid() % 20000
    picks = {}
    for source in range(base, base + 24):
        got = {http_get(f"http://{a}:{port}/", source)["pod"] for a in addresses}
        assert len(got) == 1, (source, got)
        picks[source] = got.pop()
    assert set(picks.values()) == set(pods_of(lab, "echo")), picks
    # ... and again: the flow's backend did not depend on which node saw it first.
    for source in list(picks)[:6]:
        assert http_get(f"http://{addresses[-1]}:{port}/", source)["pod"] == picks[source]


def test_a_gateway_without_addresses_answers_from_the_host_on_its_pool_address(
        lab: str) -> None:
    """The lab's pool (routed from the host to the nodes): the Gateway's status address, as
    the leader allocated it, answers from the host, and from pods through the Gateway's
    generated Service."""
    got = json.loads(kubectl(lab, "get", "gateway", "pooled", "-o", "json").stdout)
    (address,) = [a["value"] for a in got["status"]["addresses"]]
    assert ipaddress.ip_address(address) in ipaddress.ip_network(state(lab)["pool"])
    seen = {http_get(f"http://{address}:80/")["pod"] for _ in range(10)}
    assert seen <= set(pods_of(lab, "echo")) and seen, seen
    # Its generated Service shows that address as EXTERNAL-IP, and pods reach the Gateway
    # by the Service's name (its EndpointSlice holds the address).
    svc = json.loads(kubectl(lab, "get", "service", "mesh-gateway-pooled", "-o",
                             "json").stdout)
    assert svc["spec"]["type"] == "LoadBalancer", svc
    assert svc["status"]["loadBalancer"]["ingress"][0]["ip"] == address, svc
    seen = set(exec_in(lab, "client", GET, "http://mesh-gateway-pooled/", "5"))
    assert seen <= set(pods_of(lab, "echo")) and seen, seen


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
        # The pod's Ready and its EndpointSlice are read one after the other: either may
        # show the change first.
        wait_until(lambda: endpoints() == [] and not state(lab)["pods"]["default/gated"][
            "ready"], timeout=10, what="the endpoint gone and the pod not ready")
    finally:
        GATE.touch()
    wait_until(lambda: endpoints() == [ip], timeout=10, what="the endpoint back")


def test_a_pod_that_exits_is_restarted_and_serves_again(lab: str) -> None:
    """Its container killed: the kubelet restarts it (restartCount, lastState with the
    signal's exit code), the probe makes it ready, the Service has it again."""
    pod = pods_of(lab, "echo")[0]
    os.kill(state(lab)["pods"][f"default/{pod}"]["pid"], signal.SIGKILL)
    wait_until(lambda: state(lab)["pods"][f"default/{pod}"]["restarts"] >= 1, timeout=20,
               what="the pod restarted")
    got = json.loads(kubectl(lab, "get", "pod", pod, "-o", "json").stdout)
    last = got["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert last["exitCode"] == 137, last  # 128 + SIGKILL, as a runtime reports it
    wait_until(lambda: state(lab)["pods"][f"default/{pod}"]["ready"], timeout=30,
               what="the pod ready again")
    wait_until(lambda: pod in exec_in(lab, "client", GET, "http://10.96.7.7/", "10"),
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


def test_a_stopped_kubelet_makes_its_node_not_ready_and_its_endpoints_leave(lab: str) -> None:
    """A node's kubelet hangs (SIGSTOP): no Lease renewal, so the node lifecycle controller
    marks the Node NotReady and its pods not ready, and the EndpointSlice controller takes
    their endpoints out: the Service answers from the other node only. Resumed, it all comes
    back."""
    st = state(lab)
    node = st["pods"]["default/client"]["node"]
    other = next(n for n in st["nodes"] if n != node)
    on_other = [p for p in pods_of(lab, "echo") if st["pods"][f"default/{p}"]["node"] == other]
    kubelet = st["kubelets"][other]
    os.kill(kubelet, signal.SIGSTOP)
    try:
        wait_until(lambda: not next(i for i in state(lab)["node_info"]
                                    if i["name"] == other)["ready"],
                   timeout=60, what=f"{other} NotReady")
        wait_until(lambda: not set(on_other) & set(
            exec_in(lab, "client", GET, "http://10.96.7.7/", "10")),
            timeout=30, what="the stopped node's pods out of the Service")
    finally:
        os.kill(kubelet, signal.SIGCONT)
    wait_until(lambda: next(i for i in state(lab)["node_info"] if i["name"] == other)["ready"],
               timeout=60, what=f"{other} Ready again")
    wait_until(lambda: set(on_other) <= set(
        exec_in(lab, "client", GET, "http://10.96.7.7/", "20")),
        timeout=60, what="its pods back behind the Service")


def test_a_deployment_scaled_up_and_down(lab: str, manifests: Path) -> None:
    """Through the manifests the lab follows: a third replica comes (a new ReplicaSet pod,
    a new endpoint), then two go, their namespaces with them."""
    before = pods_of(lab, "echo")
    (manifests / "app.yaml").write_text(APP.replace("replicas: 2", "replicas: 3"))
    wait_until(lambda: len(pods_of(lab, "echo")) == 3 and all(
        state(lab)["pods"][f"default/{p}"]["ready"] for p in pods_of(lab, "echo")),
        timeout=60, what="a third echo pod ready")
    wait_until(lambda: set(exec_in(lab, "client", GET, "http://10.96.7.7/", "30")) ==
               set(pods_of(lab, "echo")), timeout=30, what="three pods behind the Service")
    netns_before = {state(lab)["pods"][f"default/{p}"]["netns"] for p in pods_of(lab, "echo")}
    (manifests / "app.yaml").write_text(APP.replace("replicas: 2", "replicas: 1"))
    wait_until(lambda: len([k for k in state(lab)["pods"] if k.startswith("default/echo-")])
               == 1, timeout=60, what="two echo pods removed")
    (kept,) = pods_of(lab, "echo")
    gone = netns_before - {state(lab)["pods"][f"default/{kept}"]["netns"]}
    assert len(gone) == 2 and not gone & _netns()
    wait_until(lambda: set(exec_in(lab, "client", GET, "http://10.96.7.7/", "10")) ==
               {kept}, timeout=20, what="only one pod behind the Service")
    svc = next(s for s in state(lab)["services"] if s["name"] == "echo")
    assert svc["clusterIP"] == "10.96.7.7" and len(svc["endpoints"]) == 1
    assert len(before) == 2


def test_kubectl_apply_to_a_bare_lab_then_down_leaves_nothing() -> None:
    """A lab brought up without manifests takes the demo from `kubectl apply -f
    examples/lab/`, as a cluster does; then `mesh lab down` removes all of it."""
    name = f"d{os.getpid() % 10000}"
    try:
        up = mesh("lab", "up", "--nodes", "2", "--name", name)
        assert up.returncode == 0, up.stderr
        applied = kubectl(name, "apply", "-f", str(ROOT / "examples" / "lab"))
        assert applied.returncode == 0, applied.stderr
        assert "deployment.apps/echo-v1 created" in applied.stdout
        wait_until(lambda: len(state(name)["pods"]) == 4 and all(
            p["ready"] for p in state(name)["pods"].values()), timeout=90,
            what="the demo's 4 pods ready")
        made = {ns for ns in _netns() if ns.startswith(f"{name}-")}
        assert len(made) >= 7  # underlay, 2 nodes, 4 pods
        control_plane = state(name)["control_plane"]
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
    assert str(cluster.lab_dir(name)) not in ps  # etcd, the API server, kubelets, agents...
    assert control_plane not in ps and not Path(control_plane).exists()
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

