"""ingress-nginx annotations whose behaviour is on the wire, through a real agent (`mesh run
--manifests --use-forwarded-headers`) and a real Envoy: what a client and the echo backends
see (headers, cookies, redirects, which backend answers).

Each test writes its Ingresses, with a plain Ingress for a host of its own beside them, and
waits until that host answers: all are in the same route table, so Envoy then serves the
test's Ingresses too.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.echo import EchoIdentity, EchoServer
from tests.manifests import docs, local_service
from tests.meshrun import MeshRun
from tests.testbed import wait_until

pytestmark = pytest.mark.e2e
POOL = "127.5.13.0/24"  # not the other agent tests' addresses: they may run at once
NGINX = "nginx.ingress.kubernetes.io/"


def ingress(name: str, host: str, annotations: dict[str, str] | None = None,
            paths: tuple[str, ...] = ("/",), service: str = "main",
            created: str = "2026-01-02T00:00:00Z") -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": "default",
                         "annotations": annotations or {}, "creationTimestamp": created},
            "spec": {"ingressClassName": "mesh", "rules": [{"host": host, "http": {"paths": [
                {"path": p, "pathType": "Prefix", "backend": {
                    "service": {"name": service, "port": {"number": 80}}}} for p in paths]}}]}}


class Response:
    def __init__(self, resp: http.client.HTTPResponse) -> None:
        self.status = resp.status
        self.headers = resp.getheaders()
        body = resp.read()
        try:
            self.json: dict[str, Any] = json.loads(body) if body else {}
        except ValueError:
            self.json = {}

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def pod(self) -> str:
        return str(self.json.get("pod"))

    def seen(self, name: str) -> list[str] | None:
        """A request header as the backend received it."""
        seen: list[str] | None = self.json.get("headers", {}).get(name)
        return seen


class Bed:
    def __init__(self, manifests: Path, address: str) -> None:
        self.manifests = manifests
        self.address = address
        self.step = 0

    def request(self, path: str, host: str, method: str = "GET",
                headers: dict[str, str] | None = None) -> Response:
        conn = http.client.HTTPConnection(self.address, 80, timeout=5)
        try:
            conn.request(method, path, headers={"Host": host, **(headers or {})})
            return Response(conn.getresponse())
        finally:
            conn.close()

    def serve(self, *ingresses: dict[str, Any]) -> None:
        """Serve these Ingresses (instead of the previous test's), and wait until Envoy does."""
        self.step += 1
        probe = f"probe-{self.step}.example"
        (self.manifests / "test.yaml").write_text(docs(
            *ingresses, ingress(f"probe-{self.step}", probe)))
        wait_until(lambda: self.request("/", probe).status == 200, timeout=15,
                   what=f"step {self.step}'s configuration")


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    main = EchoServer("127.0.0.1", 0, EchoIdentity(pod="main-1")).start()
    canary = EchoServer("127.0.0.1", 0, EchoIdentity(pod="canary-1")).start()
    manifests = tmp_path_factory.mktemp("wire") / "manifests"
    manifests.mkdir()
    objects: list[dict[str, Any]] = [
        {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
         "metadata": {"name": "mesh"}, "spec": {"controller": "mesh.dev/ingress-controller"}},
        ingress("first", "first.example", created="2026-01-01T00:00:00Z")]
    for name, server in (("main", main), ("canary", canary)):
        objects += local_service(name, [server.port], target_port=server.port)
    (manifests / "main.yaml").write_text(docs(*objects))
    agent = MeshRun(manifests, Path(f"/tmp/mesh-e2e-wire-{os.getpid()}"), "--address-pool",
                    POOL, "--use-forwarded-headers", node_id="e2e-wire", fresh=True,
                    log=manifests.parent / "agent.log")

    def ip() -> str | None:
        item = agent.items().get(("Ingress", "first"))
        lb = ((item or {}).get("status") or {}).get("loadBalancer", {}).get("ingress")
        return lb[0]["ip"] if lb else None

    try:
        address = wait_until(ip, timeout=15, what="the Ingress address")
        b = Bed(manifests, address)
        wait_until(lambda: b.request("/", "first.example").status == 200, timeout=15,
                   what="the first Ingress serving")
        yield b
    finally:
        log = agent.stop()
        main.stop()
        canary.stop()
        assert "Traceback" not in log, log


# -- allow and deny lists behind a load balancer (--use-forwarded-headers) ---------------------

def test_denylist_with_the_client_from_x_forwarded_for(bed: Bed) -> None:
    bed.serve(ingress("deny", "deny.example",
                      {NGINX + "denylist-source-range": "18.0.0.0/8, 56.0.0.1"}),
              ingress("both", "both.example",
                      {NGINX + "denylist-source-range": "10.1.0.0/16",
                       NGINX + "allowlist-source-range": "10.0.0.0/8, 127.0.0.0/8"}))

    def status(host: str, xff: str | None) -> int:
        return bed.request("/", host, headers={"X-Forwarded-For": xff} if xff else {}).status

    assert status("deny.example", "18.0.0.1") == 403
    assert status("deny.example", "56.0.0.1") == 403
    assert status("deny.example", "56.0.0.2") == 200
    assert status("deny.example", None) == 200  # the peer (127.0.0.1) when there is none
    # The last address is the one the load balancer wrote: a client's own goes first.
    assert status("deny.example", "18.0.0.1, 56.0.0.2") == 200
    assert status("deny.example", "56.0.0.2, 18.0.0.1") == 403
    # Denied first, then allowed.
    assert status("both.example", "10.1.2.3") == 403
    assert status("both.example", "10.2.0.1") == 200
    assert status("both.example", "192.0.2.1") == 403
    assert status("both.example", None) == 200


# -- redirects ---------------------------------------------------------------------------------

def test_force_ssl_redirect_drops_the_trailing_slash_as_nginx(bed: Bed) -> None:
    bed.serve(ingress("force", "force.example", {NGINX + "force-ssl-redirect": "true"}),
              ingress("keep", "keep.example", {NGINX + "force-ssl-redirect": "true",
                                               NGINX + "preserve-trailing-slash": "true"}))

    def location(path: str, host: str = "force.example",
                 headers: dict[str, str] | None = None) -> tuple[int, str | None]:
        r = bed.request(path, host, headers=headers)
        return r.status, r.header("location")

    assert location("/a/b/") == (308, "https://force.example/a/b")
    assert location("/") == (308, "https://force.example")
    assert location("/a/b") == (308, "https://force.example/a/b")
    assert location("/a/?q=1") == (308, "https://force.example/a/?q=1")
    assert location("/", "keep.example") == (308, "https://keep.example/")
    assert location("/a/", "keep.example") == (308, "https://keep.example/a/")
    # Behind a load balancer that ended TLS: served.
    r = bed.request("/a/", "force.example", headers={"X-Forwarded-Proto": "https"})
    assert (r.status, r.pod) == (200, "main-1")
    assert location("/a/", headers={"X-Forwarded-Proto": "http"}) == (
        308, "https://force.example/a")


# -- CORS --------------------------------------------------------------------------------------

def test_cors_any_origin_without_an_origin_and_preflights(bed: Bed) -> None:
    bed.serve(ingress("cors", "cors.example", {NGINX + "enable-cors": "true",
                                               NGINX + "cors-allow-methods": "POST, GET",
                                               NGINX + "cors-max-age": "200",
                                               NGINX + "limit-rps": "1"}))
    for headers in ({}, {"Origin": "https://any.example"}):
        r = bed.request("/", "cors.example", headers=headers)
        assert (r.status, r.pod) == (200, "main-1")
        assert r.header("access-control-allow-origin") == "*"
        assert r.header("access-control-allow-credentials") == "true"
        assert r.header("access-control-allow-methods") == "POST, GET"
        assert r.header("access-control-max-age") == "200"
    # Every OPTIONS request is answered here, before the limit (1 a second).
    for _ in range(5):
        r = bed.request("/x", "cors.example", method="OPTIONS",
                        headers={"Origin": "http://origin.example",
                                 "Access-Control-Request-Method": "GET"})
        assert (r.status, r.json) == (204, {})
        assert r.header("access-control-allow-origin") == "*"
        assert r.header("access-control-allow-methods") == "POST, GET"


def test_cors_origin_list_wildcard_is_one_label(bed: Bed) -> None:
    bed.serve(ingress("cors", "cors.example", {
        NGINX + "enable-cors": "true", NGINX + "cors-allow-credentials": "false",
        NGINX + "cors-allow-origin": "http://*.origin.example, https://Exact.example:8443, "
                                     "not-an-origin"}))

    def allowed(origin: str) -> str | None:
        r = bed.request("/", "cors.example", headers={"Origin": origin})
        assert r.status == 200
        assert r.header("access-control-allow-credentials") is None
        return r.header("access-control-allow-origin")

    assert allowed("http://foo.origin.example") == "http://foo.origin.example"
    assert allowed("http://bar-foo.origin.example") == "http://bar-foo.origin.example"
    assert allowed("http://a.b.origin.example") is None  # one label, as nginx
    assert allowed("http://origin.example") is None
    assert allowed("https://foo.origin.example") is None
    assert allowed("https://exact.example:8443") == "https://exact.example:8443"
    assert allowed("https://exact.example") is None
    assert bed.request("/", "cors.example").header("access-control-allow-origin") is None


# -- session affinity --------------------------------------------------------------------------

def _cookie(r: Response, name: str) -> tuple[str, dict[str, str]]:
    """The value of a Set-Cookie `name`, and its attributes (lowercase names)."""
    line = next(v for v in r.all("set-cookie") if v.startswith(name + "="))
    first, *attrs = [p.strip() for p in line.split(";")]
    return first.split("=", 1)[1], {a.partition("=")[0].lower(): a.partition("=")[2]
                                    for a in attrs}


def test_session_cookie_attributes(bed: Bed) -> None:
    bed.serve(
        ingress("both", "both.example", {
            NGINX + "affinity": "cookie", NGINX + "session-cookie-name": "SERVERID",
            NGINX + "session-cookie-expires": "3600", NGINX + "session-cookie-max-age": "60",
            NGINX + "session-cookie-domain": "foo.bar",
            NGINX + "session-cookie-samesite": "Lax", NGINX + "session-cookie-secure": "true"},
            paths=("/bar",)),
        ingress("expires", "expires.example", {
            NGINX + "affinity": "cookie", NGINX + "session-cookie-expires": "120"}))
    r = bed.request("/bar/x", "both.example")
    value, attrs = _cookie(r, "SERVERID")
    assert value and attrs["path"] == "/bar" and attrs["max-age"] == "60"
    assert (attrs["domain"], attrs["samesite"]) == ("foo.bar", "Lax")
    assert "secure" in attrs and "httponly" in attrs
    expires = datetime.datetime.strptime(attrs["expires"], "%a, %d-%b-%y %H:%M:%S GMT")
    left = expires.replace(tzinfo=datetime.UTC) - datetime.datetime.now(datetime.UTC)
    assert 3590 <= left.total_seconds() <= 3601, attrs["expires"]
    # expires alone: Expires and no Max-Age, as ingress-nginx; not Secure over HTTP.
    _, attrs = _cookie(bed.request("/", "expires.example"), "INGRESSCOOKIE")
    assert "expires" in attrs and "max-age" not in attrs and "secure" not in attrs
    assert "domain" not in attrs
    # A client with the cookie is not given another.
    r = bed.request("/bar", "both.example", headers={"Cookie": f"SERVERID={value}"})
    assert r.status == 200 and not r.all("set-cookie")


def test_canary_affinity_sticky_and_legacy(bed: Bed) -> None:
    def serve(behavior: str) -> None:
        bed.serve(ingress("main", "aff.example", {NGINX + "affinity": "cookie",
                                                   NGINX + "session-cookie-name": "aff"}),
                  ingress("main-canary", "aff.example", {
                      NGINX + "canary": "true", NGINX + "canary-by-header": "ForceCanary",
                      NGINX + "canary-by-header-value": "yes",
                      NGINX + "affinity-canary-behavior": behavior}, service="canary",
                      created="2026-01-03T00:00:00Z"))

    def get(headers: dict[str, str]) -> Response:
        r = bed.request("/", "aff.example", headers=headers)
        assert r.status == 200
        return r

    serve("sticky")
    first = get({"ForceCanary": "yes"})
    assert first.pod == "canary-1"
    aff, _ = _cookie(first, "aff")
    # The canary served it: it stays there, without the header.
    assert {get({"Cookie": f"aff={aff}"}).pod for _ in range(20)} == {"canary-1"}
    # A client stuck to the main backend stays there, the header or not.
    plain = get({})
    assert plain.pod == "main-1"
    main_aff, _ = _cookie(plain, "aff")
    assert {get({"Cookie": f"aff={main_aff}", "ForceCanary": "yes"}).pod
            for _ in range(20)} == {"main-1"}

    serve("legacy")
    first = get({"ForceCanary": "yes"})
    assert first.pod == "canary-1"
    aff, _ = _cookie(first, "aff")
    # Legacy: the canary's client goes by the rules again (here: to the main backend).
    assert {get({"Cookie": f"aff={aff}"}).pod for _ in range(20)} == {"main-1"}
    assert {get({"Cookie": f"aff={main_aff}", "ForceCanary": "yes"}).pod
            for _ in range(20)} == {"main-1"}


# -- redirects to a URL, app-root, more names, headers to the backend --------------------------

def test_redirects_app_root_aliases_and_www(bed: Bed) -> None:
    bed.serve(
        ingress("perm", "perm.example", {NGINX + "permanent-redirect":
                                         "https://new.example/landing?from=perm",
                                         NGINX + "force-ssl-redirect": "true",
                                         NGINX + "allowlist-source-range": "192.0.2.0/24"}),
        ingress("temp", "temp.example", {NGINX + "temporal-redirect": "http://t.example",
                                         NGINX + "temporal-redirect-code": "307",
                                         NGINX + "permanent-redirect": "http://ignored.example"}),
        ingress("app", "app.example", {NGINX + "app-root": "/app1",
                                       NGINX + "server-alias": "alias.example, *.wild.example",
                                       NGINX + "from-to-www-redirect": "true"}),
        ingress("www", "www.both.example", {NGINX + "from-to-www-redirect": "true"}))

    def answer(path: str, host: str) -> tuple[int, str | None]:
        r = bed.request(path, host)
        return r.status, r.header("location")

    # Before the redirect to HTTPS and the allow list, as nginx's `return`.
    assert answer("/x?y=1", "perm.example") == (301, "https://new.example/landing?from=perm")
    assert answer("/", "temp.example") == (307, "http://t.example")
    # app-root: `/` alone, the query dropped, the host (and port) kept.
    assert answer("/", "app.example") == (302, "http://app.example/app1")
    assert answer("/?a=b", "app.example") == (302, "http://app.example/app1")
    assert answer("/", "app.example:80") == (302, "http://app.example:80/app1")
    r = bed.request("/other", "app.example")
    assert (r.status, r.json["host"]) == (200, "app.example")
    # server-alias: the same paths for other names, the Host kept.
    for host in ("alias.example", "a.wild.example"):
        r = bed.request("/other", host)
        assert (r.status, r.pod, r.json["host"]) == (200, "main-1", host)
    assert answer("/", "alias.example") == (302, "http://alias.example/app1")
    assert bed.request("/", "unknown.example").status == 404
    # from-to-www-redirect, both ways; a trailing slash dropped.
    assert answer("/p/", "www.app.example") == (308, "http://app.example/p")
    assert answer("/p?q=1", "www.app.example") == (308, "http://app.example/p?q=1")
    assert answer("/p", "both.example") == (308, "http://www.both.example/p")
    assert bed.request("/p", "www.both.example").status == 200


def test_headers_to_the_backend(bed: Bed) -> None:
    bed.serve(
        ingress("prefix", "prefix.example", {NGINX + "rewrite-target": "/rewritten",
                                             NGINX + "x-forwarded-prefix": "/api"}),
        ingress("empty", "empty.example", {NGINX + "rewrite-target": "/rewritten",
                                           NGINX + "x-forwarded-prefix": ""}),
        ingress("conn", "conn.example", {NGINX + "connection-proxy-header": "keep-alive",
                                         NGINX + "upstream-vhost":
                                         "$service_name.$namespace.svc:$service_port"}))
    r = bed.request("/x", "prefix.example", headers={"X-Forwarded-Prefix": "/client"})
    assert (r.status, r.json["path"], r.seen("X-Forwarded-Prefix")) == (
        200, "/rewritten", ["/api"])
    r = bed.request("/x", "empty.example")
    assert (r.status, r.seen("X-Forwarded-Prefix")) == (200, None)
    r = bed.request("/", "conn.example")
    assert (r.status, r.seen("Connection")) == (200, ["keep-alive"])
    assert r.json["host"] == "main.default.svc:80"
