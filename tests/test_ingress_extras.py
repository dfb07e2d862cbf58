"""ingress-nginx's upstream-hash-by, mirror-target, default-backend (ingress_extras' annotations)
through a real agent (`mesh run --manifests`) and a real Envoy, against echo backends.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mesh import ir
from mesh.echo import EchoIdentity, EchoServer
from mesh.store.objects import parse_object
from mesh.translate import ingress_annotations
from tests.manifests import docs, ingress, local_service
from tests.meshrun import MeshRun
from tests.testbed import wait_until

pytestmark = pytest.mark.e2e
POOL = "127.5.12.0/24"  # not the other agent tests' addresses: they may run at once
NGINX = "nginx.ingress.kubernetes.io/"


class Recorder(ThreadingHTTPServer):
    """Answers 200 and keeps what it was sent: method, path, Host, body."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                server.seen.append({"method": self.command, "path": self.path,
                                    "host": self.headers.get("Host"), "body": body})
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


class Bed:
    def __init__(self, agent: MeshRun, address: str, mirror: Recorder) -> None:
        self.agent = agent
        self.address = address
        self.mirror = mirror

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

    def pod(self, host: str, path: str = "/", headers: dict[str, str] | None = None) -> str:
        status, _, body = self.request(host, path, headers=headers)
        assert status == 200, body
        return str(json.loads(body)["pod"])

    def warnings(self, name: str) -> list[str]:
        item = self.agent.items().get(("Ingress", name)) or {}
        return [str(e["message"]) for e in item.get("events") or ()]


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    root = tmp_path_factory.mktemp("extras")
    echoes = [EchoServer("127.0.0.1", 0, EchoIdentity(pod=f"app-{i}")).start()
              for i in range(1, 5)]
    mirror = Recorder()
    spare = EchoServer("127.0.0.1", 0, EchoIdentity(pod="spare-1")).start()
    manifests = root / "manifests"
    manifests.mkdir()
    objects: list[dict[str, Any]] = [
        {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
         "metadata": {"name": "mesh"}, "spec": {"controller": "mesh.dev/ingress-controller"}},
        ingress("open", "open.example", "app", {}),
        ingress("by-uri", "by-uri.example", "app", {NGINX + "upstream-hash-by": "$request_uri"}),
        ingress("by-header", "by-header.example", "app", {
            NGINX + "upstream-hash-by": "${http_x_user}"}),
        ingress("by-cookie", "by-cookie.example", "app", {
            NGINX + "upstream-hash-by": "$cookie_session"}),
        ingress("by-mix", "by-mix.example", "app", {
            NGINX + "upstream-hash-by": "$request_uri$host",
            NGINX + "upstream-hash-by-subset": "true"}),
        ingress("mirrored", "mirrored.example", "app", {
            NGINX + "mirror-target": "http://mirror.default.svc.cluster.local$request_uri"}),
        ingress("mirrored-host", "mirrored-host.example", "app", {
            NGINX + "mirror-target": "http://mirror.default.svc:80${request_uri}",
            NGINX + "mirror-host": "test.env.com", NGINX + "mirror-request-body": "off"}),
        ingress("mirror-url", "mirror-url.example", "app", {
            NGINX + "mirror-target": "https://test.env.com$request_uri"}),
        ingress("mirror-lost", "mirror-lost.example", "app", {
            NGINX + "mirror-target": "http://nowhere.default.svc$request_uri"}),
        ingress("fallback", "fallback.example", "empty", {NGINX + "default-backend": "spare"}),
        ingress("fallback-gone", "fallback-gone.example", "gone", {
            NGINX + "default-backend": "spare"}),
        ingress("fallback-unused", "fallback-unused.example", "app", {
            NGINX + "default-backend": "spare"}),
        ingress("fallback-lost", "fallback-lost.example", "empty", {
            NGINX + "default-backend": "nowhere"}),
        ingress("limited", "limited.example", "app", {NGINX + "limit-rpm": "2",
                                                       NGINX + "limit-burst-multiplier": "1"}),
    ]
    objects += local_service("app", [e.server_address[1] for e in echoes])
    objects += local_service("mirror", [mirror.port], target_port=mirror.port)
    objects += local_service("spare", [spare.server_address[1]])
    objects += local_service("empty", [])
    (manifests / "all.yaml").write_text(docs(*objects))
    agent = MeshRun(manifests, Path(f"/tmp/mesh-e2e-extras-{os.getpid()}"), "--address-pool",
                    POOL, node_id="e2e-extras", fresh=True, log=root / "agent.log")

    try:
        address = wait_until(lambda: agent.ingress_address("open"), timeout=15,
                             what="the Ingress address")
        b = Bed(agent, address, mirror)
        wait_until(lambda: b.request("open.example")[0] == 200, timeout=15,
                   what="the Ingresses serving")
        yield b
    finally:
        log = agent.stop(timeout=30)
        for s in (*echoes, spare):
            s.stop()
        mirror.shutdown()
        assert "Traceback" not in log, log


def _spread(pods: dict[str, set[str]]) -> set[str]:
    """Every key went to one pod; the pods the keys went to."""
    assert all(len(p) == 1 for p in pods.values()), pods
    return {p for ps in pods.values() for p in ps}


def local_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """This host's addresses (the test's connections come from one of them)."""
    out = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True,
                         check=True).stdout
    return {ipaddress.ip_interface(line.split()[3]).ip for line in out.splitlines()}


def test_the_client_is_the_connections_peer_not_what_it_writes(bed: Bed) -> None:
    """An Ingress's listener is the edge: a client cannot dodge its per-client limit by
    writing X-Forwarded-For, and the backend gets the peer appended to that header, as
    from ingress-nginx (without use-forwarded-headers)."""
    statuses = [bed.request("limited.example", headers={"X-Forwarded-For": f"198.51.100.{i}"})[0]
                for i in range(1, 7)]
    assert 429 in statuses, statuses
    _, _, body = bed.request("open.example", headers={"X-Forwarded-For": "198.51.100.9"})
    seen = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
    forwarded = seen["x-forwarded-for"]
    forwarded = forwarded[0] if isinstance(forwarded, list) else forwarded
    written, peer = forwarded.replace(" ", "").split(",")
    assert written == "198.51.100.9", forwarded
    assert ipaddress.ip_address(peer) in local_addresses(), forwarded  # this host's address


def test_without_hashing_requests_spread(bed: Bed) -> None:
    assert len({bed.pod("open.example", "/same") for _ in range(40)}) > 1


def test_upstream_hash_by_request_uri(bed: Bed) -> None:
    pods: dict[str, set[str]] = {}
    for i in range(12):
        for _ in range(4):
            pods.setdefault(f"/p{i}?q={i}", set()).add(bed.pod("by-uri.example", f"/p{i}?q={i}"))
    assert len(_spread(pods)) > 1  # different keys, different endpoints


def test_upstream_hash_by_header(bed: Bed) -> None:
    pods: dict[str, set[str]] = {}
    for i in range(12):
        for n in range(4):
            # The path changes: only the header counts.
            pods.setdefault(f"u{i}", set()).add(bed.pod("by-header.example", f"/{n}", headers={
                "X-User": f"u{i}"}))
    assert len(_spread(pods)) > 1


def test_upstream_hash_by_cookie(bed: Bed) -> None:
    pods: dict[str, set[str]] = {}
    for i in range(12):
        for n in range(4):
            pods.setdefault(f"s{i}", set()).add(bed.pod("by-cookie.example", f"/{n}", headers={
                "Cookie": f"other={n}; session=s{i}"}))
    assert len(_spread(pods)) > 1


def test_upstream_hash_by_refused_balances_without_hashing(bed: Bed) -> None:
    assert len({bed.pod("by-mix.example", "/same") for _ in range(40)}) > 1
    warnings = bed.warnings("by-mix")
    assert any("upstream-hash-by" in w and "refused" in w for w in warnings), warnings
    assert any("upstream-hash-by-subset is not supported" in w for w in warnings), warnings


@pytest.mark.parametrize("value,policy", [
    ("$request_uri", ir.HashPolicy("Path")),
    ("${remote_addr}", ir.HashPolicy("SourceIP")),
    ("$http_x_user_id", ir.HashPolicy("Header", "x-user-id")),
    ("$cookie_SID", ir.HashPolicy("Cookie", "SID")),
    ("$request_uri$host", None), ("${request_uri}-text", None), ("$host", None),
    ("$http_", None), ("x" * 300, None)])
def test_upstream_hash_by_values(value: str, policy: ir.HashPolicy | None) -> None:
    s = ingress_annotations.parse(parse_object(ingress(
        "i", "h.example", "app", {NGINX + "upstream-hash-by": value})))
    assert s.extras.hash_policy == policy
    assert s.shapes_backend == (policy is not None)
    assert bool(s.warnings) == (policy is None)


def _mirrored(bed: Bed, n: int) -> list[dict[str, Any]]:
    wait_until(lambda: len(bed.mirror.seen) >= n, timeout=5, what="the mirrored requests")
    return bed.mirror.seen


def test_mirror_target(bed: Bed) -> None:
    bed.mirror.seen.clear()
    status, _, body = bed.request("mirrored.example", "/a/b?c=1", "POST", body=b"payload")
    assert status == 200 and json.loads(body)["pod"].startswith("app-"), body
    copy = _mirrored(bed, 1)[0]
    assert copy["method"] == "POST" and copy["path"] == "/a/b?c=1", copy
    assert copy["body"] == b"payload"
    # The target's host, not the request's with "-shadow" (Envoy's default).
    assert copy["host"] == "mirror.default.svc.cluster.local", copy


def test_mirror_host_and_request_body_off(bed: Bed) -> None:
    bed.mirror.seen.clear()
    assert bed.request("mirrored-host.example", "/x", "POST", body=b"data")[0] == 200
    copy = _mirrored(bed, 1)[0]
    assert copy["host"] == "test.env.com" and copy["path"] == "/x", copy
    assert copy["body"] == b"data"  # off is not supported: said so
    assert any("mirror-request-body" in w and "not supported" in w
               for w in bed.warnings("mirrored-host")), bed.warnings("mirrored-host")


@pytest.mark.parametrize("name", ["mirror-url", "mirror-lost"])
def test_mirror_target_refused_mirrors_nothing(bed: Bed, name: str) -> None:
    bed.mirror.seen.clear()
    assert bed.request(f"{name}.example", "/")[0] == 200
    assert any("mirror-target" in w for w in bed.warnings(name)), bed.warnings(name)
    assert bed.request("mirrored.example", "/after")[0] == 200
    assert [c["path"] for c in _mirrored(bed, 1)] == ["/after"]


@pytest.mark.parametrize("name", ["fallback", "fallback-gone"])
def test_default_backend_when_the_service_has_no_endpoints(bed: Bed, name: str) -> None:
    assert bed.pod(f"{name}.example", "/x") == "spare-1"


def test_default_backend_unused_while_the_service_has_endpoints(bed: Bed) -> None:
    assert bed.pod("fallback-unused.example").startswith("app-")


def test_default_backend_that_cannot_be_used(bed: Bed) -> None:
    assert bed.request("fallback-lost.example")[0] == 503
    assert any("default-backend" in w for w in bed.warnings("fallback-lost"))
