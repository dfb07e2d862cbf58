"""`mesh run --kubernetes` against the API test double: objects written to the "API server"
reach the node's Envoy, and changes follow, as they do from a directory of manifests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.echo import EchoIdentity, EchoServer
from tests.kubeapi import BackgroundAPI
from tests.manifests import http_route
from tests.meshrun import ROOT, MeshRun
from tests.testbed import http_get, wait_until

pytestmark = pytest.mark.e2e
ADDRESS = "127.5.6.1"
GW = "gateway.networking.k8s.io"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[BackgroundAPI, MeshRun, EchoServer]]:
    api = BackgroundAPI()
    echo = EchoServer("127.0.0.1", 0, EchoIdentity(pod="echo-k8s")).start()
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    api.gateway_and_echo(echo.port, ADDRESS)
    agent = MeshRun(None, Path(f"/tmp/mesh-k8s-{os.getpid()}"), "--kubernetes",
                        "--kubeconfig", str(kubeconfig))
    try:
        yield api, agent, echo
    finally:
        log = agent.stop()
        echo.stop()
        api.stop()
    assert "Traceback" not in log, log


def route(host: str, path: str = "/") -> dict[str, Any]:
    return http_route("r", [host], matches=[{"path": {"type": "PathPrefix", "value": path}}])


def test_objects_from_the_api_server_reach_envoy(
        cluster: tuple[BackgroundAPI, MeshRun, EchoServer]) -> None:
    api, agent, _ = cluster
    api.put(GW, "httproutes", route("k8s.example"))
    wait_until(lambda: http_get(8080, "/", host="k8s.example", address=ADDRESS).status == 200,
               timeout=15, what="the route from the API server")
    assert http_get(8080, "/", host="k8s.example", address=ADDRESS).json()["pod"] == "echo-k8s"
    api.put(GW, "httproutes", route("k8s.example", "/only"))  # a spec change
    wait_until(lambda: http_get(8080, "/x", host="k8s.example", address=ADDRESS).status == 404,
               timeout=15, what="the change")
    assert http_get(8080, "/only", host="k8s.example", address=ADDRESS).status == 200
    api.call(api.api.delete_object(GW, "httproutes", "default", "r"))
    wait_until(lambda: http_get(8080, "/only", host="k8s.example",
                                address=ADDRESS).status == 404, timeout=15, what="the delete")
    st = agent.status("Gateway", "gw")
    assert st is not None and any(c["type"] == "Accepted" for c in st["conditions"])


def test_status_written_back_keeping_other_controllers_entries(
        cluster: tuple[BackgroundAPI, MeshRun, EchoServer]) -> None:
    api, agent, _ = cluster
    foreign = {"parentRef": {"name": "theirs"}, "controllerName": "example.com/other",
               "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                               "message": "", "observedGeneration": 1,
                               "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    api.put(GW, "httproutes", {**route("k8s.example"), "status": {"parents": [foreign]}})

    def parents() -> list[dict[str, Any]]:
        obj = api.api.resource(GW, "httproutes").objects[("default", "r")]
        found: list[dict[str, Any]] = (obj.get("status") or {}).get("parents") or []
        return found

    wait_until(lambda: len(parents()) == 2, timeout=15, what="our parent entry written")
    ours = parents()[1]
    assert parents()[0] == foreign  # theirs, untouched
    assert ours["controllerName"] == "mesh.dev/gateway-controller"
    assert {c["type"]: c["status"] for c in ours["conditions"]}["Accepted"] == "True"
    wait_until(lambda: (api.api.resource(GW, "gateways").objects[("default", "gw")].get(
        "status") or {}).get("addresses") == [{"type": "IPAddress", "value": ADDRESS}],
        timeout=10, what="the Gateway's status")
    health = json.loads(agent.health(ready=True))
    assert health["ready"] is True and health["kubernetes"]["leader"] is None  # no election
    assert health["kubernetes"]["synced"]["Gateway.gateway.networking.k8s.io"] == "synced"
    assert health["kubernetes"]["synced"]["TLSRoute.gateway.networking.k8s.io"] == \
        "not installed"  # the double serves no TLSRoutes


def test_a_status_change_reaches_envoy(tmp_path: Path) -> None:
    """A Node's addresses are status (no generation): in `node` mode they are what the
    Gateway listens on, so a change of them alone must move the listener."""
    api = BackgroundAPI()
    echo = EchoServer("127.0.0.1", 0, EchoIdentity(pod="echo-node")).start()
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    state = Path(f"/tmp/mesh-k8s-node-{os.getpid()}")

    def node(address: str) -> None:
        api.put("", "nodes", {"metadata": {"name": state.name}, "status": {
            "addresses": [{"type": "InternalIP", "address": address}]}})

    node("127.5.6.11")
    api.gateway_and_echo(echo.port)
    api.put(GW, "httproutes", route("n.example"))
    agent = MeshRun(None, state, "--kubernetes", "--kubeconfig", str(kubeconfig),
                        "--gateway-addresses", "node")
    try:
        wait_until(lambda: http_get(8080, "/", host="n.example", address="127.5.6.11").status
                   == 200, timeout=15, what="the Gateway on the node's address")
        node("127.5.6.12")
        wait_until(lambda: http_get(8080, "/", host="n.example", address="127.5.6.12").status
                   == 200, timeout=15, what="the Gateway on the node's new address")
        wait_until(lambda: (api.api.resource(GW, "gateways").objects[("default", "gw")]
                            .get("status") or {}).get("addresses") ==
                   [{"type": "IPAddress", "value": "127.5.6.12"}], timeout=10,
                   what="the Gateway's status address")
    finally:
        log = agent.stop()
        echo.stop()
        api.stop()
        shutil.rmtree(state, ignore_errors=True)
    assert "Traceback" not in log, log


def test_envoy_in_a_container_of_its_own_outlives_the_agent(tmp_path: Path) -> None:
    """The chart's two containers: `mesh envoy` and `mesh run --envoy external` sharing the
    state directory. The agent restarted (an upgrade), Envoy keeps serving meanwhile and
    takes the next agent's configuration."""
    api = BackgroundAPI()
    echo = EchoServer("127.0.0.1", 0, EchoIdentity(pod="echo-ext")).start()
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    api.gateway_and_echo(echo.port, "127.5.6.21")
    api.put(GW, "httproutes", route("x.example"))
    state = Path(f"/tmp/mesh-k8s-ext-{os.getpid()}")
    state.mkdir(parents=True, exist_ok=True)
    envoy = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "envoy", "--node-id", state.name,
         "--state-dir", str(state)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=ROOT)
    args = ("--kubernetes", "--kubeconfig", str(kubeconfig), "--envoy", "external")
    agent = MeshRun(None, state, *args)
    try:
        def served(path: str = "/") -> bool:
            return http_get(8080, path, host="x.example", address="127.5.6.21").status == 200

        wait_until(served, timeout=15, what="the route through the external Envoy")
        assert json.loads(agent.health(ready=True))["externalEnvoy"] is True
        # The Envoy container's probes (`mesh health --envoy`): alive and ready.
        for probe in ([], ["--ready"]):
            got = subprocess.run([sys.executable, "-m", "mesh.cli", "health", "--envoy",
                                  "--state-dir", str(state), *probe], capture_output=True,
                                 text=True, cwd=ROOT, timeout=20)
            assert got.returncode == 0 and json.loads(got.stdout)["envoy"] == "LIVE", got
        log = agent.stop()
        assert envoy.poll() is None, "the agent's stop took Envoy along"
        assert served(), "Envoy stopped serving without its agent"
        api.put(GW, "httproutes", route("x.example", "/v2"))  # changed while no agent runs
        agent = MeshRun(None, state, *args)
        wait_until(lambda: served("/v2/x") and not served("/"), timeout=15,
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
        log = agent.stop()
        envoy.terminate()
        envoy.wait(10)
        echo.stop()
        api.stop()
        shutil.rmtree(state, ignore_errors=True)
    assert "Traceback" not in log, log
