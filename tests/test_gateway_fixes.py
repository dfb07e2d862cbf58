"""Gateway API behaviours found by sending real requests, checked the same way: the real agent
(`mesh run --manifests`) and the real Envoy, and HTTP requests to the Gateway.

- A CORS preflight from an origin the route does not allow is answered by the gateway,
  without access-control-allow-origin, and never reaches the backend.
- Hostname matching ignores the Host header's port, on every listener port; the Host reaches
  the backend as the client sent it.
- A ListenerSet listener's `allowedRoutes.namespaces.from: Same` admits routes from the
  ListenerSet's namespace.
"""

from __future__ import annotations

import http.client
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mesh.echo import EchoIdentity, EchoServer
from tests.manifests import docs, local_service
from tests.meshrun import MeshRun
from tests.testbed import Reply, http_get, wait_until

pytestmark = pytest.mark.e2e
ADDRESS = "127.5.9.1"  # not test_gateway_agent's: both may run at once
PORT, OTHER_PORT = 8080, 8091

MANIFESTS = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: team}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: mesh}}
spec: {{controllerName: mesh.dev/gateway-controller}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw, namespace: default}}
spec:
  gatewayClassName: mesh
  addresses: [{{type: IPAddress, value: {ADDRESS}}}]
  allowedListeners: {{namespaces: {{from: All}}}}
  listeners:
  - {{name: http, port: {PORT}, protocol: HTTP}}
  - {{name: other, port: {OTHER_PORT}, protocol: HTTP}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: cors, namespace: default}}
spec:
  parentRefs: [{{name: gw, sectionName: http}}]
  hostnames: [cors.example]
  rules:
  - filters:
    - type: CORS
      cors:
        allowOrigins: ["https://www.foo.com"]
        allowMethods: [GET, OPTIONS]
        allowHeaders: [x-header-1]
        maxAge: 3600
    backendRefs: [{{name: echo, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: specific, namespace: default}}
spec:
  parentRefs: [{{name: gw}}]
  hostnames: [very.specific.com]
  rules: [{{backendRefs: [{{name: echo, port: 80}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: ListenerSet
metadata: {{name: team-listeners, namespace: team}}
spec:
  parentRef: {{group: gateway.networking.k8s.io, kind: Gateway, name: gw, namespace: default}}
  listeners:
  - name: team
    port: {PORT}
    protocol: HTTP
    hostname: team.example
    allowedRoutes: {{namespaces: {{from: Same}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: team-route, namespace: team}}
spec:
  parentRefs:
  - {{group: gateway.networking.k8s.io, kind: ListenerSet, name: team-listeners,
     sectionName: team}}
  rules: [{{backendRefs: [{{name: echo, port: 80}}]}}]
"""


def service(namespace: str, port: int) -> str:
    return docs(*local_service("echo", [port], namespace, target_port=port))


@dataclass
class Mesh:
    agent: MeshRun
    echo: EchoServer

    def status(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        found = self.agent.status(kind, name, namespace)
        assert found is not None, (kind, namespace, name)
        return found


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    echo = EchoServer("127.0.0.1", 0, EchoIdentity(pod="echo-1")).start()
    manifests = tmp_path_factory.mktemp("fixes") / "manifests"
    manifests.mkdir()
    (manifests / "mesh.yaml").write_text(MANIFESTS)
    (manifests / "services.yaml").write_text(
        service("default", echo.port) + "---\n" + service("team", echo.port))
    state = Path(f"/tmp/mesh-fixes-{os.getpid()}")  # short: it holds unix sockets
    agent = MeshRun(manifests, state, node_id="e2e-fixes", fresh=True,
                    log=manifests.parent / "agent.log", wait=False)
    try:
        agent.wait_ready()
        wait_until(lambda: http_get(PORT, "/", host="very.specific.com",
                                    address=ADDRESS).status == 200,
                   timeout=15, what="the gateway answering")
        yield Mesh(agent, echo)
    finally:
        text = agent.stop()
        echo.stop()
        shutil.rmtree(state, ignore_errors=True)
    assert "Traceback" not in text, text


def request(method: str, port: int, path: str, headers: dict[str, str]) -> Reply:
    conn = http.client.HTTPConnection(ADDRESS, port, timeout=5)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return Reply(resp.status, resp.read().decode(),
                     {k.lower(): v for k, v in resp.getheaders()})
    finally:
        conn.close()


def preflight(origin: str) -> Reply:
    return request("OPTIONS", PORT, "/cors", {
        "Host": "cors.example", "Origin": origin, "Access-Control-Request-Method": "GET"})


def test_preflight_from_a_disallowed_origin_is_answered_by_the_gateway(mesh: Mesh) -> None:
    allowed = wait_until(lambda: (r := preflight("https://www.foo.com")).status in (200, 204)
                         and r, what="the CORS route answering preflights")
    assert allowed.headers["access-control-allow-origin"] == "https://www.foo.com"
    before = mesh.echo.requests
    refused = preflight("https://evil.example")
    assert refused.status in (200, 204)
    assert "access-control-allow-origin" not in refused.headers
    assert refused.body == "", f"the backend answered the preflight: {refused.body[:200]}"
    assert mesh.echo.requests == before, "the preflight reached the backend"
    # A real request (not a preflight) from that origin still goes to the backend.
    got = request("GET", PORT, "/cors", {"Host": "cors.example", "Origin": "https://evil.example"})
    assert got.status == 200 and got.json()["pod"] == "echo-1"
    assert "access-control-allow-origin" not in got.headers


@pytest.mark.parametrize("port", [PORT, OTHER_PORT])
@pytest.mark.parametrize("host_port", ["1234", str(PORT), str(OTHER_PORT)])
def test_host_header_port_is_ignored_for_hostname_matching(mesh: Mesh, port: int,
                                                          host_port: str) -> None:
    host = f"very.specific.com:{host_port}"
    got = request("GET", port, "/s1", {"Host": host})
    assert got.status == 200, f"Host {host} on port {port}: {got.status}"
    echoed = got.json()
    assert echoed["pod"] == "echo-1"
    assert echoed["host"] == host  # the Host reaches the backend as sent
    # Only the port is ignored: another name with the same port does not match.
    assert request("GET", port, "/s1", {"Host": f"other.specific.com:{host_port}"}).status \
        == 404


def test_listener_set_same_namespace_admits_the_listener_sets_routes(mesh: Mesh) -> None:
    got = wait_until(lambda: (r := http_get(PORT, "/team", host="team.example",
                                            address=ADDRESS)).status == 200 and r,
                     what="the ListenerSet's route answering")
    assert got.json()["pod"] == "echo-1"

    def accepted() -> dict[str, Any]:
        parents = mesh.status("HTTPRoute", "team", "team-route")["parents"]
        return next(c for c in parents[0]["conditions"] if c["type"] == "Accepted")

    wait_until(lambda: accepted()["status"] == "True", what="the route's status written")
    assert accepted()["reason"] == "Accepted"


def test_listener_isolation_keeps_a_routes_names_from_more_specific_listeners() -> None:
    """Upstream's GatewayHTTPListenerIsolation with intersecting hostnames: a route on the
    listener without a hostname that names *.example.com serves none of it when a
    *.example.com listener shares the port; on *.example.com, names a *.foo.example.com or
    abc.foo.example.com listener takes are left to them."""
    from mesh.translate.gateway.hostnames import isolate

    others = [None, "*.example.com", "*.foo.example.com", "abc.foo.example.com"]
    route = ("bar.com", "*.example.com", "*.foo.example.com", "abc.foo.example.com")
    assert isolate(route, None, others) == ("bar.com",)
    assert isolate(route[1:], "*.example.com", others) == ("*.example.com",)
    assert isolate(("*.foo.example.com", "abc.foo.example.com"), "*.foo.example.com",
                   others) == ("*.foo.example.com",)
    assert isolate(("*",), None, others) == ("*",)  # the catch-all: Envoy picks the narrower
    assert isolate(("a.example.com",), None, [None]) == ("a.example.com",)
