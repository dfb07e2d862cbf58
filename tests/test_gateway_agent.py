"""`mesh run --manifests DIR` end to end: a real agent and Envoy, status as users read it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.echo import EchoIdentity, EchoServer
from tests.testbed import http_get, wait_until

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
ADDRESS = "127.5.0.1"

GATEWAY = f"""
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
  listeners: [{{name: http, port: 8080, protocol: HTTP}}]
"""


def route(name: str, host: str, extra_match: dict[str, Any] | None = None) -> str:
    match: dict[str, Any] = {"path": {"type": "PathPrefix", "value": "/"}}
    match.update(extra_match or {})
    return yaml.safe_dump({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"parentRefs": [{"name": "gw"}], "hostnames": [host],
                 "rules": [{"matches": [match], "backendRefs": [{"name": "echo", "port": 80}]}]},
    })


def service(port: int) -> str:
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec: {{ports: [{{name: http, port: 80, targetPort: {port}}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo-1, namespace: default, labels: {{kubernetes.io/service-name: echo}}}}
ports: [{{name: http, port: {port}}}]
endpoints: [{{addresses: [127.0.0.1]}}]
"""


class Agent:
    def __init__(self, manifests: Path, state: Path) -> None:
        self.state = state
        self.log = manifests.parent / "agent.log"
        # A status file left by an earlier agent must not be read as this one's.
        (state / "status.json").unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "run", "--manifests", str(manifests),
             "--state-dir", str(state), "--node-id", "e2e"],
            stderr=self.log.open("wb"), cwd=ROOT)
        wait_until(lambda: b"node ready" in self.log.read_bytes(), timeout=30,
                   what="mesh run to be ready")

    def items(self) -> dict[tuple[str, str], dict[str, Any]]:
        try:
            doc = json.loads((self.state / "status.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {(i["kind"], i["metadata"]["name"]): i for i in doc["items"]}

    def file_errors(self) -> dict[str, str]:
        return dict(json.loads((self.state / "status.json").read_text())["fileErrors"])

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(15)
        return self.log.read_text()


def condition(item: dict[str, Any], type_: str) -> dict[str, Any]:
    conds = item["status"].get("conditions") or item["status"]["parents"][0]["conditions"]
    return next(c for c in conds if c["type"] == type_)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, Agent, EchoServer]]:
    echo = EchoServer("127.0.0.1", 0, EchoIdentity(pod="echo-1")).start()
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "gateway.yaml").write_text(GATEWAY)
    (manifests / "service.yaml").write_text(service(echo.port))
    (manifests / "a.yaml").write_text(route("a", "a.example"))
    agent = Agent(manifests, Path(f"/tmp/mesh-e2e-{os.getpid()}"))
    yield manifests, agent, echo
    log = agent.stop()
    echo.stop()
    assert "Traceback" not in log, log


def test_routes_served_and_status_programmed(
        setup: tuple[Path, Agent, EchoServer]) -> None:
    manifests, agent, _ = setup
    wait_until(lambda: http_get(8080, "/x", host="a.example", address=ADDRESS).status == 200,
               what="route a answering")
    wait_until(lambda: condition(agent.items()[("HTTPRoute", "a")], "Programmed")["status"]
               == "True", what="route a Programmed")
    gw = agent.items()[("Gateway", "gw")]
    assert gw["status"]["addresses"] == [{"type": "IPAddress", "value": ADDRESS}]
    assert condition(gw, "Programmed")["status"] == "True"
    assert gw["status"]["listeners"][0]["attachedRoutes"] == 1
    assert condition(agent.items()[("HTTPRoute", "a")], "Accepted")["observedGeneration"] == 1

    # An edit bumps the generation, and the new route serves.
    (manifests / "a.yaml").write_text(route("a", "a2.example"))
    wait_until(lambda: http_get(8080, "/", host="a2.example", address=ADDRESS).status == 200,
               what="the edited route")
    assert http_get(8080, "/", host="a.example", address=ADDRESS).status == 404
    wait_until(lambda: condition(agent.items()[("HTTPRoute", "a")], "Accepted")[
        "observedGeneration"] == 2, what="generation 2 in status")

    # A deleted file takes its objects away.
    (manifests / "a.yaml").unlink()
    wait_until(lambda: http_get(8080, "/", host="a2.example", address=ADDRESS).status == 404,
               what="the deleted route gone")
    wait_until(lambda: ("HTTPRoute", "a") not in agent.items(), what="route a out of status")


def test_envoy_rejection_reaches_status_and_nothing_else_breaks(
        setup: tuple[Path, Agent, EchoServer]) -> None:
    manifests, agent, _ = setup
    wait_until(lambda: http_get(8080, "/", host="a.example", address=ADDRESS).status == 200,
               what="route a answering")
    # Valid for the API's schema, refused by Envoy's regex engine.
    bad = {"headers": [{"type": "RegularExpression", "name": "x", "value": "(unclosed"}]}
    (manifests / "b.yaml").write_text(route("b", "b.example", bad))

    def programmed_b() -> dict[str, Any] | None:
        item = agent.items().get(("HTTPRoute", "b"))
        if item is None or "status" not in item:
            return None
        c = condition(item, "Programmed")
        return c if c["reason"] == "Invalid" else None

    c = wait_until(programmed_b, what="route b's Programmed condition to report the NACK")
    assert c["status"] == "False"
    assert "Envoy rejected route" in c["message"] and "unclosed" in c["message"], c
    # Route a shares that route table, and Envoy keeps its last good version: a answers.
    assert http_get(8080, "/", host="a.example", address=ADDRESS).json()["pod"] == "echo-1"

    # A file that does not parse is reported and loses nothing.
    (manifests / "service.yaml").write_text("kind: Service\nspec: [unclosed\n")
    wait_until(lambda: any("service.yaml" in f for f in agent.file_errors()),
               what="the file error in status")
    assert ("Service", "echo") in agent.items()
    assert http_get(8080, "/", host="a.example", address=ADDRESS).status == 200

    table = subprocess.run([sys.executable, "-m", "mesh.cli", "status", "--state-dir",
                            str(agent.state)], capture_output=True, text=True, check=True,
                           cwd=ROOT).stdout
    assert "file rejected" in table and "service.yaml" in table
    assert "Envoy rejected route" in table


def _pool_gateway(name: str) -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: default}}
spec:
  gatewayClassName: mesh
  listeners: [{{name: http, port: 8080, protocol: HTTP}}]
"""


def test_pool_addresses_survive_a_restart(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "class.yaml").write_text(GATEWAY.split("---")[0])
    (manifests / "a.yaml").write_text(_pool_gateway("a"))
    (manifests / "b.yaml").write_text(_pool_gateway("b"))
    state = Path(f"/tmp/mesh-e2e-addr-{os.getpid()}")

    def address(agent: Agent, name: str) -> str | None:
        item = agent.items().get(("Gateway", name))
        addresses = (item or {}).get("status", {}).get("addresses") or []
        return addresses[0]["value"] if addresses else None

    agent = Agent(manifests, state)
    try:
        before = wait_until(lambda: address(agent, "b"), what="b's address")
        assert address(agent, "a") != before
    finally:
        agent.stop()
    # Without a record of the allocations, b would now get a's old address, the first free.
    (manifests / "a.yaml").unlink()
    agent = Agent(manifests, state)
    try:
        assert wait_until(lambda: address(agent, "b"), what="b's address") == before
        assert oct((state / "addresses.json").stat().st_mode & 0o777) == "0o600"
    finally:
        agent.stop()


def test_ingress_served_over_http_and_https(tmp_path: Path) -> None:
    import base64
    import http.client
    import socket
    import ssl

    from tests.conformance.certs import self_signed

    cert, key = self_signed(["shop.example"], "shop")
    echo = EchoServer("127.0.0.1", 0, EchoIdentity(pod="shop-1")).start()
    fallback = EchoServer("127.0.0.1", 0, EchoIdentity(pod="fallback-1")).start()
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    docs: list[dict[str, Any]] = [
        {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
         "metadata": {"name": "mesh", "annotations": {
             "ingressclass.kubernetes.io/is-default-class": "true"}},
         "spec": {"controller": "mesh.dev/ingress-controller"}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
         "metadata": {"name": "shop", "namespace": "default"},
         "spec": {"defaultBackend": {"service": {"name": "fallback", "port": {"number": 80}}},
                  "tls": [{"hosts": ["shop.example"], "secretName": "shop-tls"}],
                  "rules": [{"host": "shop.example", "http": {"paths": [
                      {"path": "/cart", "pathType": "Prefix", "backend": {
                          "service": {"name": "shop", "port": {"name": "http"}}}}]}}]}},
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
         "metadata": {"name": "shop-tls", "namespace": "default"},
         "data": {"tls.crt": base64.b64encode(cert).decode(),
                  "tls.key": base64.b64encode(key).decode()}},
    ]
    for name, server in (("shop", echo), ("fallback", fallback)):
        docs += [
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": name, "namespace": "default"},
             "spec": {"ports": [{"name": "http", "port": 80, "targetPort": server.port}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": f"{name}-1", "namespace": "default",
                          "labels": {"kubernetes.io/service-name": name}},
             "ports": [{"name": "http", "port": server.port}],
             "endpoints": [{"addresses": ["127.0.0.1"]}]}]
    (manifests / "ingress.yaml").write_text(yaml.safe_dump_all(docs))
    agent = Agent(manifests, Path(f"/tmp/mesh-e2e-ing-{os.getpid()}"))
    try:
        def ip() -> str | None:
            item = agent.items().get(("Ingress", "shop"))
            lb = ((item or {}).get("status") or {}).get("loadBalancer", {}).get("ingress")
            return lb[0]["ip"] if lb else None

        address = wait_until(ip, what="the Ingress address")
        wait_until(lambda: http_get(80, "/cart/1", host="shop.example", address=address)
                   .status == 200, what="the Ingress rule answering")
        assert http_get(80, "/cart/1", host="shop.example", address=address).json()[
            "pod"] == "shop-1"
        # No rule matches: the default backend answers, on any host.
        assert http_get(80, "/other", host="shop.example", address=address).json()[
            "pod"] == "fallback-1"
        assert http_get(80, "/", host="elsewhere", address=address).json()[
            "pod"] == "fallback-1"

        ctx = ssl.create_default_context(cadata=cert.decode())

        def https_pod() -> str:
            sock = socket.create_connection((address, 443), timeout=5)
            conn = http.client.HTTPSConnection(address, 443, context=ctx)
            conn.sock = ctx.wrap_socket(sock, server_hostname="shop.example")
            conn.request("GET", "/cart/2", headers={"Host": "shop.example"})
            pod = str(json.loads(conn.getresponse().read())["pod"])
            conn.close()
            return pod

        assert wait_until(https_pod, what="HTTPS through the Ingress") == "shop-1"
    finally:
        agent.stop()
        echo.stop()
        fallback.stop()


def test_client_certificates_checked_at_the_gateway(tmp_path: Path) -> None:
    """Gateway spec.tls.frontend: a port that requires a valid client certificate, a port
    with AllowInsecureFallback, and a CA rotation that takes effect without a restart."""
    import base64
    import http.client
    import socket
    import ssl

    from tests.conformance.certs import client_certificate, self_signed

    server_cert, server_key = self_signed(["secure.example"], "server")
    ca1, cert1, key1 = client_certificate("client-one")
    ca2, cert2, key2 = client_certificate("client-two")
    files = {}
    for name, cert, key in (("one", cert1, key1), ("two", cert2, key2)):
        (tmp_path / f"{name}.crt").write_bytes(cert)
        (tmp_path / f"{name}.key").write_bytes(key)
        files[name] = (tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
    echo = EchoServer("127.0.0.1", 0, EchoIdentity(pod="secure-1")).start()
    manifests = tmp_path / "manifests"
    manifests.mkdir()

    def trust(ca: bytes) -> str:
        return yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                               "metadata": {"name": "clients-ca", "namespace": "default"},
                               "data": {"ca.crt": ca.decode()}})

    https = [{"name": f"https-{port}", "port": port, "protocol": "HTTPS",
              "tls": {"certificateRefs": [{"name": "server-tls"}]}} for port in (8443, 9443)]
    validation = {"caCertificateRefs": [{"group": "", "kind": "ConfigMap",
                                         "name": "clients-ca"}]}
    docs: list[dict[str, Any]] = [
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
         "metadata": {"name": "mesh"}, "spec": {"controllerName": "mesh.dev/gateway-controller"}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "gw", "namespace": "default"},
         "spec": {"gatewayClassName": "mesh",
                  "addresses": [{"type": "IPAddress", "value": ADDRESS}],
                  "tls": {"frontend": {
                      "default": {"validation": validation},
                      "perPort": [{"port": 9443, "tls": {"validation": {
                          **validation, "mode": "AllowInsecureFallback"}}}]}},
                  "listeners": https}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
         "metadata": {"name": "secure", "namespace": "default"},
         "spec": {"parentRefs": [{"name": "gw"}], "hostnames": ["secure.example"],
                  "rules": [{"backendRefs": [{"name": "echo", "port": 80}]}]}},
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
         "metadata": {"name": "server-tls", "namespace": "default"},
         "data": {"tls.crt": base64.b64encode(server_cert).decode(),
                  "tls.key": base64.b64encode(server_key).decode()}},
    ]
    (manifests / "gateway.yaml").write_text(yaml.safe_dump_all(docs))
    (manifests / "service.yaml").write_text(service(echo.port))
    (manifests / "ca.yaml").write_text(trust(ca1))
    agent = Agent(manifests, Path(f"/tmp/mesh-e2e-mtls-{os.getpid()}"))

    def get(port: int, client: str | None) -> int | str:
        """The answer's status, or the error that stopped the request."""
        ctx = ssl.create_default_context(cadata=server_cert.decode())
        if client is not None:
            ctx.load_cert_chain(*files[client])
        try:
            sock = socket.create_connection((ADDRESS, port), timeout=5)
            conn = http.client.HTTPSConnection(ADDRESS, port, context=ctx, timeout=5)
            conn.sock = ctx.wrap_socket(sock, server_hostname="secure.example")
            conn.request("GET", "/", headers={"Host": "secure.example"})
            status = conn.getresponse().status
            conn.close()
            return status
        except (OSError, http.client.HTTPException) as e:
            return type(e).__name__

    try:
        wait_until(lambda: get(8443, "one") == 200, what="mTLS with the trusted client")
        assert get(8443, "two") != 200  # signed by a CA the Gateway does not trust
        assert get(8443, None) != 200  # no certificate at all
        for client in ("one", "two", None):  # AllowInsecureFallback lets everyone in
            assert get(9443, client) == 200, client
        gw = agent.items()[("Gateway", "gw")]
        assert condition(gw, "InsecureFrontendValidationMode")["reason"] == \
            "ConfigurationChanged"

        # Rotate the CA: the other client gets in, the first one no longer does.
        (manifests / "ca.yaml").write_text(trust(ca2))
        wait_until(lambda: get(8443, "two") == 200, what="the rotated CA in force")
        assert get(8443, "one") != 200

        # A CA reference that does not resolve: the listener is not served at all (no
        # silent fallback to no validation), and its status says why.
        (manifests / "ca.yaml").unlink()

        def listener_status() -> dict[str, Any] | None:
            item = agent.items().get(("Gateway", "gw"))
            lis = {x["name"]: x for x in (item or {}).get("status", {}).get("listeners", [])}
            li = lis.get("https-8443")
            accepted = next((c for c in (li or {}).get("conditions", [])
                             if c["type"] == "Accepted"), None)
            return li if accepted and accepted["status"] == "False" else None

        li = wait_until(listener_status, what="the listener to be rejected")
        reasons = {c["type"]: c["reason"] for c in li["conditions"]}
        assert reasons["ResolvedRefs"] == "InvalidCACertificateRef"
        assert reasons["Accepted"] == "NoValidCACertificate"
        wait_until(lambda: get(8443, "two") != 200, what="the listener to stop serving")
    finally:
        log = agent.stop()
        echo.stop()
    assert "Traceback" not in log, log
