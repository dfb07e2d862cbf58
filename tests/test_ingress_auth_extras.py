"""ingress-nginx's auth-url family, proxy-body-size and backend-protocol GRPCS / HTTPS
through a real agent (`mesh run --manifests`) and a real Envoy: a real HTTP auth service
(answering by the request's Authorization header), echo backends, a gRPC echo over TLS.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from mesh import grpcecho
from mesh.echo import EchoIdentity, EchoServer, TLSEchoServer
from tests.manifests import docs, ingress, local_service
from tests.meshrun import MeshRun
from tests.testbed import free_port, wait_until

pytestmark = pytest.mark.e2e
POOL = "127.5.7.0/24"  # not the other agent tests' addresses: they may run at once
NGINX = "nginx.ingress.kubernetes.io/"


class AuthService(ThreadingHTTPServer):
    """`Bearer good`: 200 with X-User and X-Groups; `Bearer bare`: 200 without them;
    `Bearer broken`: 500; anything else: 401 with WWW-Authenticate."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.seen.append({"method": self.command, "path": self.path,
                                    "headers": {k.lower(): v for k, v in self.headers.items()}})
                token = self.headers.get("authorization", "")
                if token == "Bearer good":
                    self.send_response(200)
                    self.send_header("X-User", "alice")
                    self.send_header("X-Groups", "admins")
                elif token == "Bearer bare":
                    self.send_response(200)
                elif token == "Bearer broken":
                    self.send_response(500)
                else:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Bearer realm="test"')
                body = b"auth says no" if token != "Bearer good" else b""
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


class GrpcTLS:
    """The gRPC echo over TLS, in a process of its own: grpc's asyncio server on a second
    event loop of the test process (the testbed runs one) can hang in stop()."""

    SCRIPT = """
import asyncio, sys
import grpc
from mesh import grpcecho

async def main() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpcecho.handler("grpcs-1", "default"),))
    key, cert = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
    server.add_secure_port(f"127.0.0.1:{sys.argv[1]}", grpc.ssl_server_credentials([(key, cert)]))
    await server.start()
    await server.wait_for_termination()

asyncio.run(main())
"""

    def __init__(self, cert: bytes, key: bytes) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="grpcs-"))
        (self.dir / "tls.key").write_bytes(key)
        (self.dir / "tls.crt").write_bytes(cert)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT, str(self.port), str(self.dir / "tls.key"),
             str(self.dir / "tls.crt")], cwd=Path(__file__).resolve().parent.parent)

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, timeout=20, what="the gRPC TLS echo")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Bed:
    def __init__(self, agent: MeshRun, address: str, auth: AuthService) -> None:
        self.agent = agent
        self.address = address
        self.auth = auth

    def request(self, host: str, path: str = "/", method: str = "GET",
                headers: dict[str, str] | None = None, body: bytes | None = None
                ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.address, 80, timeout=5)
        try:
            conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def warnings(self, name: str) -> list[str]:
        item = self.agent.items().get(("Ingress", name)) or {}
        return [str(e["message"]) for e in item.get("events") or ()]


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    root = tmp_path_factory.mktemp("authx")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=backend.default.svc", "-keyout", str(root / "key.pem"),
                    "-out", str(root / "cert.pem")], check=True, capture_output=True)
    cert, key = (root / "cert.pem").read_bytes(), (root / "key.pem").read_bytes()
    echo = EchoServer("127.0.0.1", 0, EchoIdentity(pod="app-1")).start()
    tls_echo = TLSEchoServer("127.0.0.1", 0, EchoIdentity(pod="tls-1"), str(root / "cert.pem"),
                             str(root / "key.pem")).start()
    grpcs = GrpcTLS(cert, key)
    auth = AuthService()
    manifests = root / "manifests"
    manifests.mkdir()
    objects: list[dict[str, Any]] = [
        {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
         "metadata": {"name": "mesh"}, "spec": {"controller": "mesh.dev/ingress-controller"}},
        ingress("open", "open.example", "app", {}),
        ingress("guarded", "guarded.example", "app", {
            NGINX + "auth-url": "http://auth.default.svc.cluster.local/oauth2/auth?from=mesh",
            NGINX + "auth-response-headers": "X-User, X-Groups",
            NGINX + "auth-cache-key": "$cookie_session"}),
        ingress("redirected", "redirected.example", "app", {
            NGINX + "auth-url": "http://auth.default.svc/check",
            NGINX + "auth-request-redirect": "https://login.example/back%20here"}),
        ingress("signin", "signin.example", "app", {
            NGINX + "auth-url": "http://auth.default.svc/check",
            NGINX + "auth-signin": "https://login.example/oauth2/start"}),
        ingress("signin-vars", "signin-vars.example", "app", {
            NGINX + "auth-url": "http://auth.default.svc/check",
            NGINX + "auth-signin": "https://$host/oauth2/start?rd=$escaped_request_uri"}),
        ingress("signin-param", "signin-param.example", "app", {
            NGINX + "auth-url": "http://auth.default.svc/check",
            NGINX + "auth-signin": "https://login.example/start?client=web",
            NGINX + "auth-signin-redirect-param": "return_to"}),
        ingress("signin-bad", "signin-bad.example", "app", {
            NGINX + "auth-url": "http://auth.default.svc/check",
            NGINX + "auth-signin": "https://login.example/$arg_next"}),
        ingress("lost", "lost.example", "app", {
            NGINX + "auth-url": "http://nowhere.default.svc.cluster.local/auth"}),
        ingress("external", "external.example", "app", {
            NGINX + "auth-url": "https://auth.example.com/oauth2/auth"}),
        ingress("basic", "basic.example", "app", {
            NGINX + "auth-type": "basic", NGINX + "auth-secret": "htpasswd"}),
        ingress("snippet", "snippet.example", "app", {
            NGINX + "auth-url": "http://auth.default.svc/check",
            NGINX + "auth-snippet": "proxy_set_header Foo bar;"}),
        ingress("small", "small.example", "app", {NGINX + "proxy-body-size": "1k"}),
        ingress("huge", "huge.example", "app", {NGINX + "proxy-body-size": "1g"}),
        ingress("https", "https.example", "tls", {NGINX + "backend-protocol": "HTTPS"}),
        ingress("grpcs", "grpcs.example", "grpcs", {NGINX + "backend-protocol": "GRPCS"}),
    ]
    for name, port in (("app", echo.port), ("auth", auth.port), ("tls", tls_echo.port),
                       ("grpcs", grpcs.port)):
        objects += local_service(name, [port], target_port=port)
    (manifests / "all.yaml").write_text(docs(*objects))
    agent = MeshRun(manifests, Path(f"/tmp/mesh-e2e-authx-{os.getpid()}"), "--address-pool",
                    POOL, node_id="e2e-authx", fresh=True, log=root / "agent.log")

    try:
        address = wait_until(lambda: agent.ingress_address("open"), timeout=15,
                             what="the Ingress address")
        b = Bed(agent, address, auth)
        wait_until(lambda: b.request("open.example")[0] == 200, timeout=15,
                   what="the Ingresses serving")
        yield b
    finally:
        log = agent.stop(timeout=30)
        for s in (echo, tls_echo):
            s.stop()
        grpcs.stop()
        auth.shutdown()
        assert "Traceback" not in log, log


def test_auth_url_refuses_with_the_services_answer(bed: Bed) -> None:
    status, headers, body = bed.request("guarded.example", "/app?q=1")
    assert status == 401
    assert headers.get("www-authenticate") == 'Bearer realm="test"'
    assert body == b"auth says no"


def test_auth_url_lets_in_with_the_response_headers(bed: Bed) -> None:
    bed.auth.seen.clear()
    status, _, body = bed.request("guarded.example", "/app/x?q=1&r=2", headers={
        "Authorization": "Bearer good", "X-User": "mallory"})
    assert status == 200, body
    echoed = json.loads(body)
    got = {k.lower(): v for k, v in echoed["headers"].items()} \
        if isinstance(echoed["headers"], dict) else \
        {k.lower(): v for k, v in echoed["headers"]}
    assert got["x-user"] in ("alice", ["alice"]), got
    assert got["x-groups"] in ("admins", ["admins"]), got
    # What the service was asked: its own path and query, the request's in X-Original-URL.
    check = bed.auth.seen[-1]
    assert check["path"].startswith("/oauth2/auth?from=mesh&"), check
    assert check["headers"]["x-original-url"] == "http://guarded.example/app/x?q=1&r=2"
    assert check["headers"]["x-original-method"] == "GET"
    assert check["headers"]["x-auth-request-redirect"] == "/app/x?q=1&r=2"
    assert check["headers"]["authorization"] == "Bearer good"
    assert any("auth-cache-key is not supported" in w for w in bed.warnings("guarded"))


def test_auth_response_headers_cannot_be_forged(bed: Bed) -> None:
    status, _, body = bed.request("guarded.example", "/", headers={
        "Authorization": "Bearer bare", "X-User": "mallory", "X-Groups": "admins"})
    assert status == 200, body
    text = body.decode().lower()
    assert "mallory" not in text and "x-groups" not in text, text


def test_auth_service_failure_is_500(bed: Bed) -> None:
    assert bed.request("guarded.example", "/", headers={
        "Authorization": "Bearer broken"})[0] == 500


def test_auth_request_redirect(bed: Bed) -> None:
    bed.auth.seen.clear()
    assert bed.request("redirected.example", "/a", headers={
        "Authorization": "Bearer good"})[0] == 200
    check = bed.auth.seen[-1]
    assert check["path"].startswith("/check?mesh-original-path=/a"), check
    assert check["headers"]["x-auth-request-redirect"] == "https://login.example/back%20here"


@pytest.mark.parametrize("name", ["lost", "external", "basic", "snippet"])
def test_what_cannot_be_done_fails_closed(bed: Bed, name: str) -> None:
    assert bed.request(f"{name}.example", "/", headers={
        "Authorization": "Bearer good"})[0] == 500
    assert bed.warnings(name), name
    assert bed.request("open.example")[0] == 200


def test_proxy_body_size(bed: Bed) -> None:
    assert bed.request("small.example", "/", "POST", body=b"x" * 1000)[0] == 200
    assert bed.request("small.example", "/", "POST", body=b"x" * 2000)[0] == 413
    # Above what is held in memory: not enforced, and said so.
    assert bed.request("huge.example", "/", "POST", body=b"x" * 2000)[0] == 200
    assert any("not enforced" in w for w in bed.warnings("huge"))


def test_backend_protocol_https(bed: Bed) -> None:
    status, _, body = bed.request("https.example", "/")
    assert status == 200, body
    assert json.loads(body)["pod"] == "tls-1"


def test_backend_protocol_grpcs(bed: Bed) -> None:
    code, resp = grpcecho.call(f"{bed.address}:80", "Echo", authority="grpcs.example")
    assert code == grpc.StatusCode.OK, code
    assert resp.assertions.context.pod == "grpcs-1"


def test_auth_signin_redirects_a_401(bed: Bed) -> None:
    status, headers, body = bed.request("signin.example", "/app/x%20y?q=1&r=/2")
    assert status == 302, (status, body)
    # The request's URL as nginx puts it: scheme and Host as they are, the path and query
    # escaped as set_escape_uri does.
    assert headers["location"] == ("https://login.example/oauth2/start?rd=http://"
                                   "signin.example%2Fapp%2Fx%2520y%3Fq%3D1%26r%3D%2F2"), headers
    assert body == b""
    # The service's 200 lets the request on; its 500 stays 500; the backend's own 401 is no
    # refusal of the service and reaches the client.
    assert bed.request("signin.example", "/", headers={"Authorization": "Bearer good"}
                       )[0] == 200
    assert bed.request("signin.example", "/", headers={"Authorization": "Bearer broken"}
                       )[0] == 500
    status, headers, _ = bed.request("signin.example", "/status/401", headers={
        "Authorization": "Bearer good"})
    assert status == 401 and "location" not in headers


def test_auth_signin_variables_and_parameter(bed: Bed) -> None:
    status, headers, _ = bed.request("signin-vars.example:8080", "/a?b=c")
    assert status == 302
    assert headers["location"] == "https://signin-vars.example/oauth2/start?rd=%2Fa%3Fb%3Dc"
    status, headers, _ = bed.request("signin-param.example", "/a")
    assert status == 302
    assert headers["location"] == ("https://login.example/start?client=web&return_to="
                                   "http://signin-param.example%2Fa")


def test_auth_signin_that_cannot_be_used_keeps_the_401(bed: Bed) -> None:
    status, headers, _ = bed.request("signin-bad.example", "/")
    assert status == 401 and "location" not in headers
    assert any("$arg_next" in w for w in bed.warnings("signin-bad"))
