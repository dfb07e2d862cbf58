"""`mesh run --manifests DIR` end to end: a real agent and Envoy, status as users read it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.echo import EchoIdentity, EchoServer
from tests.manifests import (
    docs,
    gateway,
    gateway_class,
    gateway_with_class,
    http_route,
    local_service,
)
from tests.meshrun import ROOT, MeshRun, condition
from tests.testbed import http_get, wait_until

pytestmark = pytest.mark.e2e
ADDRESS = "127.5.0.1"
GATEWAY = gateway_with_class(ADDRESS)
PREFIX = {"path": {"type": "PathPrefix", "value": "/"}}


def route(name: str, host: str, extra_match: dict[str, Any] | None = None) -> str:
    return docs(http_route(name, [host], matches=[{**PREFIX, **(extra_match or {})}]))


def service(port: int) -> str:
    return docs(*local_service("echo", [port], target_port=port))


def start(manifests: Path, state: Path) -> MeshRun:
    return MeshRun(manifests, state, node_id="e2e", log=manifests.parent / "agent.log")


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, MeshRun, EchoServer]]:
    echo = EchoServer("127.0.0.1", 0, EchoIdentity(pod="echo-1")).start()
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "gateway.yaml").write_text(GATEWAY)
    (manifests / "service.yaml").write_text(service(echo.port))
    (manifests / "a.yaml").write_text(route("a", "a.example"))
    agent = start(manifests, Path(f"/tmp/mesh-e2e-{os.getpid()}"))
    yield manifests, agent, echo
    log = agent.stop()
    echo.stop()
    assert "Traceback" not in log, log


def test_routes_served_and_status_programmed(
        setup: tuple[Path, MeshRun, EchoServer]) -> None:
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
        setup: tuple[Path, MeshRun, EchoServer]) -> None:
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


def test_pool_addresses_survive_a_restart(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "class.yaml").write_text(docs(gateway_class()))
    (manifests / "a.yaml").write_text(docs(gateway(None, name="a")))
    (manifests / "b.yaml").write_text(docs(gateway(None, name="b")))
    state = Path(f"/tmp/mesh-e2e-addr-{os.getpid()}")

    def address(agent: MeshRun, name: str) -> str | None:
        item = agent.items().get(("Gateway", name))
        addresses = (item or {}).get("status", {}).get("addresses") or []
        return addresses[0]["value"] if addresses else None

    agent = start(manifests, state)
    try:
        before = wait_until(lambda: address(agent, "b"), what="b's address")
        assert address(agent, "a") != before
    finally:
        agent.stop()
    # Without a record of the allocations, b would now get a's old address, the first free.
    (manifests / "a.yaml").unlink()
    agent = start(manifests, state)
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
    objects: list[dict[str, Any]] = [
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
        objects += local_service(name, [server.port], target_port=server.port)
    (manifests / "ingress.yaml").write_text(docs(*objects))
    agent = start(manifests, Path(f"/tmp/mesh-e2e-ing-{os.getpid()}"))
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
    objects: list[dict[str, Any]] = [
        gateway_class(),
        gateway(ADDRESS, *https, tls={"frontend": {
            "default": {"validation": validation},
            "perPort": [{"port": 9443, "tls": {"validation": {
                **validation, "mode": "AllowInsecureFallback"}}}]}}),
        http_route("secure", ["secure.example"],
                   rules=[{"backendRefs": [{"name": "echo", "port": 80}]}]),
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
         "metadata": {"name": "server-tls", "namespace": "default"},
         "data": {"tls.crt": base64.b64encode(server_cert).decode(),
                  "tls.key": base64.b64encode(server_key).decode()}},
    ]
    (manifests / "gateway.yaml").write_text(docs(*objects))
    (manifests / "service.yaml").write_text(service(echo.port))
    (manifests / "ca.yaml").write_text(trust(ca1))
    agent = start(manifests, Path(f"/tmp/mesh-e2e-mtls-{os.getpid()}"))

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
