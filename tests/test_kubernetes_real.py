"""`mesh run --kubernetes` against the real API server (the run's shared control plane,
tests/cluster.py): objects created, changed and deleted through the API reach Envoy, and the
status the agent writes back is what `kubectl get` shows, judged by the real status schema."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.echo import EchoIdentity, EchoServer
from mesh.kube.rbac import cluster_rules, namespace_rules
from mesh.lab.bootstrap import token_kubeconfig
from mesh.lab.controlplane import ControlPlane, gateway_api_crds
from tests import manifests
from tests.meshrun import ROOT, MeshRun
from tests.testbed import http_get, wait_until

pytestmark = pytest.mark.e2e
ADDRESS = "127.5.14.1"  # not the other agent tests' addresses
NAMESPACE = "real-agent"


def apply(cp: ControlPlane, *objects: dict[str, Any]) -> None:
    done = cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                      input=manifests.docs(*objects), check=False)
    assert done.returncode == 0, done.stderr


def get(cp: ControlPlane, kind: str, name: str) -> dict[str, Any]:
    got: dict[str, Any] = json.loads(cp.kubectl("get", kind, name, "-n", NAMESPACE,
                                                "-o", "json").stdout)
    return got


def host_address() -> str:
    """An IPv4 address of this host outside 127.0.0.0/8: a real API server refuses loopback
    endpoints, so the echo listens there."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        return line.split()[3].split("/")[0]
    pytest.skip("this host has no IPv4 address outside loopback for an endpoint")


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


@pytest.fixture(scope="module")
def agent(control_plane: ControlPlane) -> Iterator[tuple[ControlPlane, MeshRun, EchoServer]]:
    cp = control_plane
    install_crds(cp)
    address = host_address()
    echo = EchoServer(address, 0, EchoIdentity(pod="echo-real")).start()
    apply(cp, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    apply(cp, manifests.gateway_class("mesh-real"),
          manifests.gateway(ADDRESS, namespace=NAMESPACE, gatewayClassName="mesh-real"),
          # No selector: the EndpointSlice below is ours, the controllers leave it alone.
          {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "echo", "namespace": NAMESPACE},
           "spec": {"ports": [{"name": "http", "port": 80}]}},
          {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "echo-1", "namespace": NAMESPACE,
                        "labels": {"kubernetes.io/service-name": "echo",
                                   "endpointslice.kubernetes.io/managed-by": "tests"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": echo.port}],
           "endpoints": [{"addresses": [address]}]})
    state = Path(f"/tmp/mesh-real-{os.getpid()}")
    kubeconfig = agent_kubeconfig(cp, state.with_name(state.name + ".kubeconfig"))
    run = MeshRun(None, state, "--kubernetes", "--kubeconfig", str(kubeconfig),
                  "--node-name", "real-node", "--leader-namespace", NAMESPACE, fresh=True)
    try:
        yield cp, run, echo
    finally:
        log = run.stop()
        echo.stop()
        cp.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        cp.kubectl("delete", "gatewayclass", "mesh-real", "--wait=false", check=False)
        cp.kubectl("delete", "clusterrole,clusterrolebinding", f"mesh-agent-{NAMESPACE}",
                   "--ignore-not-found", check=False)
        shutil.rmtree(state, ignore_errors=True)
        kubeconfig.unlink(missing_ok=True)
    assert "Traceback" not in log, log


_CRDS_IN: set[Path] = set()  # the control planes (state directories) that have them


def install_crds(cp: ControlPlane) -> None:
    """The Gateway API's CRDs (from its Go module) and ours, established; once per control
    plane (nothing deletes them, and applying them takes seconds)."""
    if cp.state_dir in _CRDS_IN:
        return
    for crd in [*gateway_api_crds(), ROOT / "gateway-api" / "trafficpolicy.yaml",
                ROOT / "gateway-api" / "meshnode.yaml", ROOT / "gateway-api" / "meshidentity.yaml",
                ROOT / "gateway-api" / "meshnetworkpolicy.yaml"]:
        cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
               "crd/httproutes.gateway.networking.k8s.io", "crd/gateways.gateway.networking.k8s.io",
               "crd/meshnodes.mesh.dev", "crd/meshidentities.mesh.dev")
    _CRDS_IN.add(cp.state_dir)


def agent_kubeconfig(cp: ControlPlane, path: Path, namespace: str = NAMESPACE) -> Path:
    """A kubeconfig with the token of a ServiceAccount of `namespace` bound to the agent's
    ClusterRole and Role there (mesh.kube.rbac, which the chart's are checked against): a
    permission the agent uses and the rules lack fails here as on a cluster."""
    name = f"mesh-agent-{namespace}"
    role = {"apiGroup": "rbac.authorization.k8s.io", "name": name}
    subject = [{"kind": "ServiceAccount", "name": "mesh-agent", "namespace": namespace}]
    apply(cp, {"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "mesh-agent", "namespace": namespace}},
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
           "metadata": {"name": name}, "rules": cluster_rules()},
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
           "metadata": {"name": name}, "roleRef": {**role, "kind": "ClusterRole"},
           "subjects": subject},
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
           "metadata": {"name": name, "namespace": namespace}, "rules": namespace_rules()},
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
           "metadata": {"name": name, "namespace": namespace},
           "roleRef": {**role, "kind": "Role"}, "subjects": subject})
    return token_kubeconfig(cp, path, "mesh-agent", namespace=namespace)


@contextlib.contextmanager
def agent_namespace(cp: ControlPlane, namespace: str, kubeconfig: Path) -> Iterator[Path]:
    """A namespace of its own and the agent's kubeconfig there (`agent_kubeconfig`), for the
    tests that run the agent's parts in process with its token; all removed afterwards."""
    apply(cp, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    try:
        yield agent_kubeconfig(cp, kubeconfig, namespace)
    finally:
        cp.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        cp.kubectl("delete", "clusterrole,clusterrolebinding", f"mesh-agent-{namespace}",
                   "--ignore-not-found", check=False)
        kubeconfig.unlink(missing_ok=True)


def route(path: str = "/") -> dict[str, Any]:
    return manifests.http_route("r", ["real.example"], namespace=NAMESPACE,
                                matches=[{"path": {"type": "PathPrefix", "value": path}}])


def test_routes_from_the_real_api_server_reach_envoy_and_status_comes_back(
        agent: tuple[ControlPlane, MeshRun, EchoServer]) -> None:
    cp, _, _ = agent
    apply(cp, route())

    def answer(path: str) -> int:
        return http_get(8080, path, host="real.example", address=ADDRESS).status

    wait_until(lambda: answer("/") == 200, timeout=30, what="the route from the API server")
    assert http_get(8080, "/", host="real.example", address=ADDRESS).json()["pod"] == "echo-real"

    # What kubectl shows: the route's parent status written by our controller, Programmed
    # once the node's Envoy runs it, at the route's generation.
    def programmed() -> dict[str, Any] | None:
        parents = get(cp, "httproute", "r").get("status", {}).get("parents") or []
        ours = [p for p in parents if p["controllerName"] == "mesh.dev/gateway-controller"]
        c = condition(ours[0], "Programmed") if ours else None
        return c if c and c["status"] == "True" else None

    c = wait_until(programmed, timeout=30, what="Programmed in the route's status")
    assert c["observedGeneration"] == get(cp, "httproute", "r")["metadata"]["generation"]
    gw = get(cp, "gateway", "gw")["status"]
    assert condition(gw, "Programmed")["status"] == "True"  # type: ignore[index]
    assert gw["addresses"] == [{"type": "IPAddress", "value": ADDRESS}]
    assert gw["listeners"][0]["attachedRoutes"] == 1

    # A spec change, then a delete, through the API.
    apply(cp, route("/only"))
    wait_until(lambda: answer("/x") == 404 and answer("/only/x") == 200, timeout=30,
               what="the changed route")
    wait_until(lambda: (p := programmed()) is not None and p["observedGeneration"] == 2,
               timeout=30, what="the new generation Programmed")
    cp.kubectl("delete", "httproute", "r", "-n", NAMESPACE)
    wait_until(lambda: answer("/only/x") == 404, timeout=30, what="the deleted route gone")
