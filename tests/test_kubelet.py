"""The lab's kubelet (mesh.lab.kubelet) against the real control plane (tests/cluster.py's
shared one): one node (a network namespace on an underlay, as mesh.lab.network makes them)
whose kubelet registers its Node with a node certificate, heartbeats, runs the Pods the real
scheduler binds to it through the CNI plugin, writes their status, finalizes their deletion,
and whose Node the node lifecycle controller marks NotReady once the kubelet stops.

The node carries a taint only these tests' pods tolerate, so the shared control plane's
other tests never get pods run here. Names start with `mkl<pid>`: no lab test's collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.cni.interfaces import host_ifname
from mesh.cni.runtime import HOST_LOCAL
from mesh.lab import network
from mesh.lab.controlplane import NODE_MONITOR_GRACE, ControlPlane
from mesh.lab.kubelet import KUBELET_VERSION, Kubelet, node_kubeconfig
from mesh.lab.network import NodeNet
from tests.cluster import eventually

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.e2e]

LAB = f"mkl{os.getpid()}"[:16]
NS = f"kubelet-{os.getpid()}"
TAINT = {"key": "mesh.dev/kubelet-test", "value": LAB, "effect": "NoSchedule"}
TOLERATION = {"key": TAINT["key"], "operator": "Equal", "value": LAB,
              "effect": "NoSchedule"}
ECHO_BASIC = "registry.k8s.io/gateway-api/echo-basic:v1.5.1"  # the lab runs its echo for it
RESTARTED: list[Running] = []  # kubelets started again by a test, stopped by the fixture




class Running:
    """A kubelet on an event loop of its own thread; `stop()` cancels it."""

    def __init__(self, kubelet: Kubelet) -> None:
        self.kubelet = kubelet
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self.thread.start()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        try:
            await self.kubelet.run()
        except asyncio.CancelledError:
            pass
        except BaseException as e:
            self.error = e

    def stop(self) -> bool:
        """Cancel the kubelet; whether it stopped (the cleanup goes on either way)."""
        if self.thread.is_alive() and self.loop is not None and self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(30)
        return not self.thread.is_alive()


@pytest.fixture(scope="module")
def node(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[NodeNet, Running]]:
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2")
    if not HOST_LOCAL.exists() or not shutil.which("mesh-cni", path=str(
            Path(sys.executable).parent)):
        pytest.skip("needs the CNI plugins (host-local, mesh-cni)")
    cp = control_plane
    index = next(i for i in range(254, 200, -1) if subprocess.run(
        ["ip", "link", "show", network.host_link(i)], capture_output=True).returncode != 0)
    n = network.plan(LAB, 1, index)[0]
    state = tmp_path_factory.mktemp("kubelet")
    running: Running | None = None
    try:
        network.build(LAB, [n], index)
        conf = node_kubeconfig(cp.certs, cp.server, n.name, state / "node.kubeconfig")
        kubelet = Kubelet(n.name, conf, state / "kubelet", netns=n.name,
                          address=n.underlay_ip, backoff=1.0, taints=(TAINT,))
        running = Running(kubelet)
        status, _ = cp.request("POST", "/api/v1/namespaces", {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        assert status == 201
        yield n, running
    finally:
        for r in [running, *RESTARTED]:
            if r is not None:
                r.stop()
        left = Kubelet.cleanup(state / "kubelet", n.name)
        cp.request("DELETE", f"/api/v1/namespaces/{NS}")
        for pod in (pods(cp) or []):
            cp.request("DELETE", f"/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}",
                       {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})
        cp.request("DELETE", f"/api/v1/nodes/{n.name}")
        cp.request("DELETE", f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/"
                             f"leases/{n.name}")
        left += network.teardown(LAB, [n.name])
        assert not left, left
        assert not [ns for ns in netns() if ns.startswith(LAB)]


def netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def get(cp: ControlPlane, path: str) -> dict[str, Any] | None:
    status, body = cp.request("GET", path)
    return body if status == 200 and isinstance(body, dict) else None


def pods(cp: ControlPlane, selector: str = "") -> list[dict[str, Any]] | None:
    q = f"?labelSelector={selector}" if selector else ""
    body = get(cp, f"/api/v1/namespaces/{NS}/pods{q}")
    return None if body is None else list(body["items"])


def condition(obj: dict[str, Any], kind: str) -> str | None:
    for c in obj.get("status", {}).get("conditions") or []:
        if c.get("type") == kind:
            return str(c.get("status"))
    return None


def create(cp: ControlPlane, path: str, body: dict[str, Any]) -> None:
    status, out = cp.request("POST", path, body)
    assert status == 201, (status, out)


def pod_body(name: str, command: list[str], restart: str = "Always") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
            "spec": {"restartPolicy": restart, "tolerations": [TOLERATION],
                     "terminationGracePeriodSeconds": 2,
                     "containers": [{"name": "main", "image": "busybox",
                                     "command": command}]}}


def test_the_node_registers_heartbeats_and_gets_a_pod_cidr(
        control_plane: ControlPlane, node: tuple[NodeNet, Running]) -> None:
    cp, (n, _) = control_plane, node
    began = time.monotonic()
    got = eventually("the Node, Ready, with a pod CIDR", lambda: (
        (o := get(cp, f"/api/v1/nodes/{n.name}")) and condition(o, "Ready") == "True"
        and o["spec"].get("podCIDR") and o), 30)
    status = got["status"]
    assert {"type": "InternalIP", "address": n.underlay_ip} in status["addresses"]
    assert status["nodeInfo"]["kubeletVersion"] == KUBELET_VERSION
    assert status["capacity"]["pods"] == "110" and status["allocatable"]["cpu"]
    assert ipaddress.IPv4Network(got["spec"]["podCIDR"]).subnet_of(
        ipaddress.IPv4Network(cp.cluster_cidr))
    assert [t for t in got["spec"].get("taints", []) if t["key"] == TAINT["key"]]
    lease = eventually("the Lease", lambda: get(
        cp, f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{n.name}"))
    assert lease["spec"]["holderIdentity"] == n.name
    assert lease["metadata"]["ownerReferences"][0]["name"] == n.name
    print(f"node registered and Ready in {time.monotonic() - began:.1f}s")


def test_a_deployment_runs_and_serves(control_plane: ControlPlane,
                                      node: tuple[NodeNet, Running]) -> None:
    cp, (n, running) = control_plane, node
    began = time.monotonic()
    labels = {"app": "echo"}
    create(cp, f"/apis/apps/v1/namespaces/{NS}/deployments", {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "echo", "namespace": NS},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"tolerations": [TOLERATION], "terminationGracePeriodSeconds": 5,
                     "containers": [{"name": "echo", "image": ECHO_BASIC,
                                     "env": [{"name": "HTTP_PORT", "value": "8080"}],
                                     "ports": [{"containerPort": 8080}]}]}}}})
    create(cp, f"/api/v1/namespaces/{NS}/services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": NS},
        "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}})

    def running_pods() -> list[dict[str, Any]] | None:
        got = pods(cp, "app=echo") or []
        ok = [p for p in got if p["status"].get("phase") == "Running"
              and condition(p, "Ready") == "True"]
        return ok if len(ok) == 2 and len(got) == 2 else None

    ready = eventually("2 echo pods Running and Ready", running_pods, 90)
    print(f"2 pods Running and Ready in {time.monotonic() - began:.1f}s")
    cidr = ipaddress.ip_network(running.kubelet.pod_cidr)
    for p in ready:
        st = p["status"]
        assert re.fullmatch(r"echo-[a-z0-9]+-[a-z0-9]{5}", p["metadata"]["name"])
        assert p["spec"]["nodeName"] == n.name and st["hostIP"] == n.underlay_ip
        assert ipaddress.ip_address(st["podIP"]) in cidr
        assert st["podIPs"] == [{"ip": st["podIP"]}]
        assert {c["type"] for c in st["conditions"]} >= {
            "PodScheduled", "Initialized", "ContainersReady", "Ready"}
        (c,) = st["containerStatuses"]
        assert c["ready"] and c["restartCount"] == 0 and c["state"]["running"]["startedAt"]
        out = subprocess.run(["ip", "netns", "exec", n.name, "curl", "-s", "--max-time", "5",
                              f"http://{st['podIP']}:8080/"], capture_output=True, text=True)
        assert json.loads(out.stdout)["pod"] == p["metadata"]["name"], out
    ips = {p["status"]["podIP"] for p in ready}

    def slice_ready() -> bool:
        body = get(cp, f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
                       "?labelSelector=kubernetes.io/service-name=echo") or {"items": []}
        seen = {a for s in body["items"] for e in s.get("endpoints") or []
                if e.get("conditions", {}).get("ready") for a in e["addresses"]}
        return seen == ips

    eventually("the EndpointSlice lists both pods ready", slice_ready, 30)


def test_a_pod_that_cannot_run_waits_and_a_crashing_one_restarts(
        control_plane: ControlPlane, node: tuple[NodeNet, Running]) -> None:
    cp = control_plane
    create(cp, f"/api/v1/namespaces/{NS}/pods",
           pod_body("broken", ["/nonexistent/mesh-kubelet-test"]))
    create(cp, f"/api/v1/namespaces/{NS}/pods", pod_body("crasher", ["sh", "-c", "exit 3"]))

    def waiting() -> dict[str, Any] | None:
        p = get(cp, f"/api/v1/namespaces/{NS}/pods/broken") or {}
        for c in p.get("status", {}).get("containerStatuses") or []:
            w = c["state"].get("waiting") or {}
            if w.get("reason") == "CreateContainerError":
                return dict(w)
        return None

    w = eventually("broken's CreateContainerError", waiting, 60)
    assert "no such file" in w["message"]

    def restarted() -> dict[str, Any] | None:
        p = get(cp, f"/api/v1/namespaces/{NS}/pods/crasher") or {}
        for c in p.get("status", {}).get("containerStatuses") or []:
            if c["restartCount"] >= 2:
                return dict(c)
        return None

    c = eventually("crasher restarted twice", restarted, 60)
    assert c["lastState"]["terminated"]["exitCode"] == 3
    assert not c["ready"]
    others = pods(cp, "app=echo") or []
    assert len(others) == 2 and all(p["status"]["phase"] == "Running" and
                                    condition(p, "Ready") == "True" for p in others)
    for name in ("broken", "crasher"):  # the kubelet finalizes the deletion
        cp.request("DELETE", f"/api/v1/namespaces/{NS}/pods/{name}")
    eventually("broken and crasher gone", lambda: all(
        cp.request("GET", f"/api/v1/namespaces/{NS}/pods/{name}")[0] == 404
        for name in ("broken", "crasher")), 30)


def test_scaling_down_removes_a_pod_and_its_network(
        control_plane: ControlPlane, node: tuple[NodeNet, Running]) -> None:
    cp, (n, _) = control_plane, node
    before = {p["metadata"]["uid"]: p for p in pods(cp, "app=echo") or []}
    assert len(before) == 2
    began = time.monotonic()
    cp.kubectl("-n", NS, "scale", "deployment/echo", "--replicas=1")
    def one_left() -> list[dict[str, Any]] | None:
        got = pods(cp, "app=echo")
        return got if got is not None and len(got) == 1 else None

    left = eventually("one echo pod left", one_left, 60)
    print(f"scaled down (pod finalized) in {time.monotonic() - began:.1f}s")
    (gone,) = set(before) - {left[0]["metadata"]["uid"]}
    assert f"{n.name}-{gone[:8]}" not in netns()
    link = subprocess.run(["ip", "-n", n.name, "link", "show", host_ifname(gone, "eth0")],
                          capture_output=True)
    assert link.returncode != 0
    kept = left[0]["metadata"]["uid"]
    assert f"{n.name}-{kept[:8]}" in netns()


def test_a_stopped_kubelet_leaves_its_node_not_ready(
        control_plane: ControlPlane, node: tuple[NodeNet, Running]) -> None:
    cp, (n, running) = control_plane, node
    assert running.stop(), "the kubelet did not stop"
    assert running.error is None, running.error
    began = time.monotonic()
    eventually("the Node NotReady", lambda: condition(
        get(cp, f"/api/v1/nodes/{n.name}") or {}, "Ready") not in ("True", None),
        NODE_MONITOR_GRACE + RENEW_SLACK)
    print(f"Node NotReady {time.monotonic() - began:.1f}s after the kubelet stopped")
    # Its pods keep running, as a real kubelet's do.
    left = pods(cp, "app=echo")
    assert left is not None and len(left) == 1
    p = left[0]
    with contextlib.suppress(KeyError):
        out = subprocess.run(["ip", "netns", "exec", n.name, "curl", "-s", "--max-time", "5",
                              f"http://{p['status']['podIP']}:8080/"],
                             capture_output=True, text=True)
        assert json.loads(out.stdout)["pod"] == p["metadata"]["name"]


# The renew interval plus the node lifecycle controller's period (5 s) and some slack.
RENEW_SLACK = 25


def test_a_restarted_kubelet_adopts_its_pods(
        control_plane: ControlPlane, node: tuple[NodeNet, Running]) -> None:
    """A kubelet started again on the stopped one's state: the Node Ready again, the pod
    keeps its sandbox and address (a pod's IP never changes), its container is started
    again and counted as a restart, and it serves; nothing is left of the old process."""
    cp, (n, stopped) = control_plane, node
    (before,) = pods(cp, "app=echo") or [{}]
    old = stopped.kubelet
    kubelet = Kubelet(n.name, old.kubeconfig, old.state_dir, netns=n.name,
                      address=n.underlay_ip, backoff=1.0, taints=(TAINT,))
    RESTARTED.append(Running(kubelet))
    eventually("the Node Ready again", lambda: condition(
        get(cp, f"/api/v1/nodes/{n.name}") or {}, "Ready") == "True", 60)

    def adopted() -> dict[str, Any] | None:
        (p,) = pods(cp, "app=echo") or [{}]
        st = p.get("status") or {}
        cs = (st.get("containerStatuses") or [{}])[0]
        return p if cs.get("ready") and cs.get("restartCount", 0) >= 1 else None

    p = eventually("the pod running again, a restart counted", adopted, 60)
    assert p["metadata"]["uid"] == before["metadata"]["uid"]
    assert p["status"]["podIP"] == before["status"]["podIP"]
    assert p["status"]["startTime"] == before["status"]["startTime"]
    assert f"{n.name}-{p['metadata']['uid'][:8]}" in netns()
    out = subprocess.run(["ip", "netns", "exec", n.name, "curl", "-s", "--max-time", "5",
                          f"http://{p['status']['podIP']}:8080/"], capture_output=True, text=True)
    assert json.loads(out.stdout)["pod"] == p["metadata"]["name"], out
    # One echo process for the pod: the old run's was stopped, not left beside the new.
    ps = subprocess.run(["ip", "netns", "pids", f"{n.name}-{p['metadata']['uid'][:8]}"],
                        capture_output=True, text=True).stdout.split()
    echoes = [pid for pid in ps if b"echo" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(echoes) == 1, echoes

