"""ingress-nginx canaries through a real agent (`mesh run --manifests`) and a real Envoy: a
main and a canary echo backend, requests on a keep-alive connection, and where each lands.

Each step rewrites the canary Ingress, with a plain Ingress beside it for a host of the
step's own (step-N.example), and waits until that host answers: both are in the same route
table, so Envoy then runs the step's canary too.
"""

from __future__ import annotations

import http.client
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.echo import EchoIdentity, EchoServer
from tests.manifests import docs, ingress, local_service
from tests.meshrun import MeshRun
from tests.testbed import wait_until

pytestmark = pytest.mark.e2e
POOL = "127.5.3.0/24"  # not the other agent tests' addresses: they may run at once
HOST = "canary.example"
NGINX = "nginx.ingress.kubernetes.io/"


def _ingress(name: str, service: str, annotations: dict[str, str], created: str,
             host: str = HOST) -> dict[str, Any]:
    return ingress(name, host, service, annotations, created=created)


class Bed:
    def __init__(self, manifests: Path, agent: MeshRun, address: str) -> None:
        self.manifests = manifests
        self.agent = agent
        self.address = address
        self.conn = http.client.HTTPConnection(address, 80, timeout=5)
        self.step = 0

    def get(self, headers: dict[str, str] | None = None, host: str = HOST, path: str = "/"
            ) -> tuple[int, bytes]:
        for attempt in range(2):
            try:
                self.conn.request("GET", path, headers={"Host": host, **(headers or {})})
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (http.client.HTTPException, ConnectionError):
                # Envoy may close a connection when its listener changes: a new one.
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.address, 80, timeout=5)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def pod(self, headers: dict[str, str] | None = None) -> str:
        status, body = self.get(headers)
        assert status == 200, (status, body)
        return str(json.loads(body)["pod"])

    def count(self, n: int, headers: dict[str, str] | None = None) -> Counter[str]:
        return Counter(self.pod(headers) for _ in range(n))

    def canary(self, annotations: dict[str, str]) -> None:
        """Serve this canary Ingress, and wait until Envoy does."""
        self.step += 1
        probe = f"step-{self.step}.example"
        objects = [_ingress("shop-canary", "canary", {NGINX + "canary": "true", **annotations},
                         "2026-01-02T00:00:00Z"),
                _ingress("probe", "main", {}, "2026-01-02T00:00:00Z", host=probe)]
        (self.manifests / "canary.yaml").write_text(docs(*objects))
        wait_until(lambda: self.get(host=probe)[0] == 200, timeout=15,
                   what=f"step {self.step}'s configuration")


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    main = EchoServer("127.0.0.1", 0, EchoIdentity(pod="main-1")).start()
    canary = EchoServer("127.0.0.1", 0, EchoIdentity(pod="canary-1")).start()
    manifests = tmp_path_factory.mktemp("canary") / "manifests"
    manifests.mkdir()
    objects: list[dict[str, Any]] = [
        {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
         "metadata": {"name": "mesh"}, "spec": {"controller": "mesh.dev/ingress-controller"}},
        _ingress("shop", "main", {}, "2026-01-01T00:00:00Z")]
    for name, server in (("main", main), ("canary", canary)):
        objects += local_service(name, [server.port], target_port=server.port)
    (manifests / "main.yaml").write_text(docs(*objects))
    agent = MeshRun(manifests, Path(f"/tmp/mesh-e2e-canary-{os.getpid()}"), "--address-pool",
                    POOL, node_id="e2e-canary", fresh=True, log=manifests.parent / "agent.log")

    try:
        address = wait_until(lambda: agent.ingress_address("shop"), timeout=15,
                             what="the Ingress address")
        b = Bed(manifests, agent, address)
        wait_until(lambda: b.pod() == "main-1", timeout=15, what="the main Ingress serving")
        yield b
        b.conn.close()
    finally:
        log = agent.stop()
        main.stop()
        canary.stop()
        assert "Traceback" not in log, log


def test_weight_splits_within_five_percent(bed: Bed) -> None:
    bed.canary({NGINX + "canary-weight": "30"})
    counts = bed.count(1000)
    assert set(counts) == {"main-1", "canary-1"}
    assert 250 <= counts["canary-1"] <= 350, counts


def test_weight_total(bed: Bed) -> None:
    bed.canary({NGINX + "canary-weight": "1", NGINX + "canary-weight-total": "4"})
    counts = bed.count(1000)
    assert 200 <= counts["canary-1"] <= 300, counts


def test_weight_zero_and_hundred_are_exact(bed: Bed) -> None:
    bed.canary({NGINX + "canary-weight": "0"})
    assert bed.count(300) == Counter({"main-1": 300})
    bed.canary({NGINX + "canary-weight": "100"})
    assert bed.count(300) == Counter({"canary-1": 300})


def test_header_always_never_and_other_values(bed: Bed) -> None:
    bed.canary({NGINX + "canary-by-header": "X-Canary", NGINX + "canary-weight": "100"})
    assert bed.count(50, {"x-canary": "always"}) == Counter({"canary-1": 50})
    # never beats the weight (header before weight)
    assert bed.count(50, {"x-canary": "never"}) == Counter({"main-1": 50})
    # any other value falls through to the weight
    assert bed.count(50, {"x-canary": "sometimes"}) == Counter({"canary-1": 50})
    bed.canary({NGINX + "canary-by-header": "X-Canary", NGINX + "canary-weight": "0"})
    assert bed.count(50, {"x-canary": "always"}) == Counter({"canary-1": 50})
    assert bed.count(50, {"x-canary": "sometimes"}) == Counter({"main-1": 50})


def test_header_value(bed: Bed) -> None:
    bed.canary({NGINX + "canary-by-header": "x-version",
                NGINX + "canary-by-header-value": "v2"})
    assert bed.count(20, {"x-version": "v2"}) == Counter({"canary-1": 20})
    # With a value, always and never are values like any other.
    for value in ("always", "never", "v3", "v2x"):
        assert bed.count(10, {"x-version": value}) == Counter({"main-1": 10}), value
    assert bed.count(10) == Counter({"main-1": 10})


def test_header_pattern(bed: Bed) -> None:
    bed.canary({NGINX + "canary-by-header": "x-track",
                NGINX + "canary-by-header-pattern": "beta|rc[0-9]+"})
    for value in ("beta", "1.0-beta", "rc7", "always"):
        expected = "main-1" if value == "always" else "canary-1"
        assert bed.count(10, {"x-track": value}) == Counter({expected: 10}), value
    assert bed.count(10, {"x-track": "stable"}) == Counter({"main-1": 10})


def test_cookie_and_precedence_header_cookie_weight(bed: Bed) -> None:
    bed.canary({NGINX + "canary-by-header": "x-canary", NGINX + "canary-by-cookie": "canary",
                NGINX + "canary-weight": "100"})
    h = "x-canary"

    def cookie(value: str) -> dict[str, str]:
        return {"Cookie": f"session=1; canary={value}; theme=dark"}

    # Cookie never beats the weight (100% canary).
    assert bed.count(30, cookie("never")) == Counter({"main-1": 30})
    assert bed.count(30, cookie("always")) == Counter({"canary-1": 30})
    assert bed.count(30, cookie("sometimes")) == Counter({"canary-1": 30})  # weight
    assert bed.count(30, {"Cookie": "canary=neverland"}) == Counter({"canary-1": 30})
    # The header beats the cookie, both ways; a header value that is neither falls
    # through to the cookie.
    assert bed.count(30, {h: "never", **cookie("always")}) == Counter({"main-1": 30})
    assert bed.count(30, {h: "always", **cookie("never")}) == Counter({"canary-1": 30})
    assert bed.count(30, {h: "other", **cookie("never")}) == Counter({"main-1": 30})


def test_canary_status_and_a_second_canary_is_ignored(bed: Bed) -> None:
    bed.canary({NGINX + "canary-weight": "0"})
    late = [_ingress("late-canary", "canary", {NGINX + "canary": "true",
                                               NGINX + "canary-weight": "100"},
                     "2026-01-03T00:00:00Z"),
            _ingress("late-probe", "main", {}, "2026-01-03T00:00:00Z", host="late.example")]
    (bed.manifests / "late.yaml").write_text(yaml.safe_dump_all(late))
    try:
        wait_until(lambda: bed.get(host="late.example")[0] == 200, timeout=15,
                   what="the late canary's configuration")
        # One canary per host and path, the oldest: the late one takes nothing.
        assert bed.count(100) == Counter({"main-1": 100})
        # It is ours all the same: it has the address.
        wait_until(lambda: bed.agent.items()[("Ingress", "late-canary")]["status"][
            "loadBalancer"]["ingress"] == [{"ip": bed.address}], timeout=15,
            what="the late canary's status")
    finally:
        (bed.manifests / "late.yaml").unlink()


def test_rewrite_target_and_redirect_in_envoy(bed: Bed) -> None:
    """Not canaries, but the regular expressions Envoy (RE2) must take as ingress-nginx's:
    a case-insensitive path from its start, rewrite-target's groups, the query kept."""
    rewrite = _ingress("rewrite", "main", {NGINX + "rewrite-target": "/$2"},
                       "2026-01-04T00:00:00Z", host="rewrite.example")
    rewrite["spec"]["rules"][0]["http"]["paths"][0].update(
        path="/api(/|$)(.*)", pathType="ImplementationSpecific")
    redirect = _ingress("redirect", "main", {NGINX + "force-ssl-redirect": "true"},
                        "2026-01-04T00:00:00Z", host="redirect.example")
    (bed.manifests / "rewrite.yaml").write_text(yaml.safe_dump_all([rewrite, redirect]))
    try:
        wait_until(lambda: bed.get(host="rewrite.example", path="/api")[0] == 200,
                   timeout=15, what="the rewrite Ingress")

        def seen(path: str) -> str:
            status, body = bed.get(host="rewrite.example", path=path)
            assert status == 200, (path, status, body)
            return str(json.loads(body)["path"])

        assert seen("/api/users/7?x=1") == "/users/7?x=1"
        assert seen("/API/users") == "/users"
        assert seen("/api") == "/"
        assert bed.get(host="rewrite.example", path="/apix")[0] == 404
        assert bed.get(host="rewrite.example", path="/v1/api/x")[0] == 404
        bed.conn.request("GET", "/a/b?c=d", headers={"Host": "redirect.example"})
        resp = bed.conn.getresponse()
        resp.read()
        assert (resp.status, resp.getheader("location")) == (
            308, "https://redirect.example/a/b?c=d")
    finally:
        (bed.manifests / "rewrite.yaml").unlink()
