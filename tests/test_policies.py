"""TrafficPolicies end to end: a real agent and Envoy, real echo backends, real traffic.

Local rate limits (429 with retry-after and x-ratelimit-* headers, recovery after the window,
per header value, a limit change that keeps connections), retries turning a flaky backend's
errors into successes, 504 on a request timeout, 503 on circuit-breaker overflow, an ejected
endpoint receiving no traffic, sticky sessions, and an invalid or conflicting policy reported
while the rest keeps working.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.echo import EchoIdentity, EchoServer
from tests.manifests import docs, gateway_with_class, http_route, listener, local_service
from tests.meshrun import MeshRun
from tests.testbed import Reply, free_port, wait_until

pytestmark = pytest.mark.e2e
ADDRESS = "127.5.4.1"
PORT = 8080


def ancestor_condition(agent: MeshRun, name: str) -> dict[str, Any] | None:
    st = agent.status("TrafficPolicy", name)
    if not st or not st.get("ancestors"):
        return None
    found: dict[str, Any] = next(c for c in st["ancestors"][0]["conditions"]
                                 if c["type"] == "Accepted")
    return found


def service(name: str, ports: list[int]) -> str:
    """A Service whose endpoints are local ports, one EndpointSlice each."""
    return docs(*local_service(name, ports))


def route(name: str, host: str, backend: str, rules: list[dict[str, Any]] | None = None) -> str:
    return docs(http_route(name, [host], backend, rules=rules))


def policy(name: str, target_route: str, **spec: Any) -> str:
    return docs({
        "apiVersion": "mesh.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                 "name": target_route}], **spec}})


GATEWAY = gateway_with_class(ADDRESS, listener("http", PORT))


def get(host: str, path: str = "/", headers: dict[str, str] | None = None,
        timeout: float = 5.0) -> Reply:
    conn = http.client.HTTPConnection(ADDRESS, PORT, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host, **(headers or {})})
        resp = conn.getresponse()
        return Reply(resp.status, resp.read().decode(),
                     {k.lower(): v for k, v in resp.getheaders()})
    finally:
        conn.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, MeshRun,
                                                                   list[EchoServer], int]]:
    tmp = tmp_path_factory.mktemp("policies")
    echoes = [EchoServer("127.0.0.1", 0, EchoIdentity(pod=f"echo-{i}")).start()
              for i in range(2)]
    dead = free_port()  # an endpoint nothing listens on
    manifests = tmp / "manifests"
    manifests.mkdir()
    (manifests / "gateway.yaml").write_text(GATEWAY)
    (manifests / "services.yaml").write_text(
        service("one", [echoes[0].port]) + "\n---\n" +
        service("pair", [echoes[0].port, echoes[1].port]) + "\n---\n" +
        service("half-dead", [echoes[0].port, dead]))
    agent = MeshRun(manifests, Path(f"/tmp/mesh-policies-{os.getpid()}"))
    yield manifests, agent, echoes, dead
    log = agent.stop()
    for e in echoes:
        e.stop()
    assert "Traceback" not in log, log


def served(host: str, path: str = "/") -> bool:
    return get(host, path).status != 404


def test_local_limit_refuses_with_429_then_recovers(lab: Any) -> None:
    manifests, agent, _, _ = lab
    (manifests / "rl.yaml").write_text(route("rl", "rl.example", "one") + "\n---\n" + policy(
        "rl", "rl", rateLimit={"local": {"rules": [{"limit": {"requests": 3, "unit": "Second"}}]}}))
    wait_until(lambda: get("rl.example").status == 429, timeout=15, what="the limit to apply")
    time.sleep(1.1)  # a full window: the bucket is full again
    replies = [get("rl.example") for _ in range(4)]
    assert [r.status for r in replies] == [200, 200, 200, 429]
    refused = replies[-1]
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["x-ratelimit-limit"].startswith("3")
    assert refused.headers["x-ratelimit-remaining"] == "0"
    time.sleep(1.1)
    assert get("rl.example").status == 200
    cond = ancestor_condition(agent, "rl")
    assert cond is not None and cond["status"] == "True", cond


def test_local_limit_per_header_value(lab: Any) -> None:
    manifests, _, _, _ = lab
    (manifests / "user.yaml").write_text(route("user", "user.example", "one") + "\n---\n" + policy(
        "user", "user", rateLimit={"local": {"rules": [{
            "clientSelectors": [{"headers": [{"name": "x-user", "type": "Distinct"}]}],
            "limit": {"requests": 2, "unit": "Minute"}}]}}))
    wait_until(lambda: served("user.example"), what="the route")
    wait_until(lambda: get("user.example", headers={"x-user": "probe"}).status == 429,
               what="the limit to apply")
    assert [get("user.example", headers={"x-user": "alice"}).status for _ in range(3)] == \
        [200, 200, 429]
    assert get("user.example", headers={"x-user": "bob"}).status == 200  # a bucket of its own
    assert get("user.example").status == 200  # no header: the limit does not apply


def test_limit_change_keeps_connections(lab: Any) -> None:
    manifests, _, _, _ = lab
    path = manifests / "keep.yaml"

    def write(requests: int) -> None:
        path.write_text(route("keep", "keep.example", "one") + "\n---\n" + policy(
            "keep", "keep", rateLimit={"local": {"rules": [
                {"limit": {"requests": requests, "unit": "Hour"}}]}}))

    write(1000)
    wait_until(lambda: get("keep.example").headers.get("x-ratelimit-limit", "").startswith(
        "1000"), what="the first limit")
    conn = http.client.HTTPConnection(ADDRESS, PORT, timeout=5)
    conn.request("GET", "/", headers={"Host": "keep.example"})
    conn.getresponse().read()
    write(2000)

    def changed() -> bool:
        # The same connection, still open after the change.
        conn.request("GET", "/", headers={"Host": "keep.example"})
        resp = conn.getresponse()
        resp.read()
        return (resp.getheader("x-ratelimit-limit") or "").startswith("2000")

    wait_until(changed, what="the new limit on the same connection")
    conn.close()


def test_retries_turn_a_flaky_backends_errors_into_successes(lab: Any) -> None:
    manifests, _, _, _ = lab
    (manifests / "retry.yaml").write_text(
        route("retry", "retry.example", "one") + "\n---\n" +
        route("noretry", "noretry.example", "one") + "\n---\n" + policy(
            "retry", "retry", retry={"numRetries": 3, "retryOn": {"triggers": ["5xx"]},
                                     "perRetry": {"backOff": {"baseInterval": "10ms"}}}))
    wait_until(lambda: served("retry.example") and served("noretry.example"),
               what="the routes")
    wait_until(lambda: get("retry.example", f"/?responseCode=503&succeedAfter=1&uuid="
                       f"{uuid.uuid4()}").status == 200, what="the retry policy to apply")
    flaky = f"/?responseCode=503&succeedAfter=2&uuid={uuid.uuid4()}"
    assert get("retry.example", flaky).status == 200  # two failures retried away
    assert get("noretry.example", f"/?responseCode=503&succeedAfter=2&uuid={uuid.uuid4()}"
               ).status == 503


def test_request_timeout_answers_504(lab: Any) -> None:
    manifests, _, _, _ = lab
    (manifests / "slow.yaml").write_text(route("slow", "slow.example", "one") + "\n---\n" + policy(
        "slow", "slow", timeout={"http": {"requestTimeout": "300ms"}}))
    wait_until(lambda: get("slow.example", "/?delay=2s").status == 504, timeout=15,
               what="the timeout to apply")
    started = time.monotonic()
    assert get("slow.example", "/?delay=2s").status == 504
    assert time.monotonic() - started < 1.5
    assert get("slow.example", "/?delay=10ms").status == 200


def test_circuit_breaker_overflow_answers_503(lab: Any) -> None:
    manifests, _, _, _ = lab
    (manifests / "cb.yaml").write_text(route("cb", "cb.example", "one") + "\n---\n" + policy(
        "cb", "cb", circuitBreaker={"maxParallelRequests": 1, "maxPendingRequests": 1,
                                    "maxConnections": 1}))
    wait_until(lambda: served("cb.example"), what="the route")

    def overflow() -> bool:
        # One request active, one waiting (pending): the third overflows at once.
        slow: list[Reply] = []
        threads = [threading.Thread(target=lambda: slow.append(get("cb.example", "/?delay=1s")))
                   for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.3)
        third = get("cb.example")
        for t in threads:
            t.join()
        return sorted(r.status for r in slow) == [200, 200] and third.status == 503 and \
            third.headers.get("x-envoy-overloaded") == "true"

    wait_until(overflow, timeout=20, interval=0.2, what="a 503 on overflow")


def test_ejected_endpoint_receives_no_traffic(lab: Any) -> None:
    manifests, _, _, _ = lab
    (manifests / "eject.yaml").write_text(
        route("eject", "eject.example", "half-dead") + "\n---\n" + policy(
            "eject", "eject", healthCheck={"passive": {
                "consecutive5XxErrors": 2, "interval": "1s", "baseEjectionTime": "60s",
                "maxEjectionPercent": 50}}))
    wait_until(lambda: served("eject.example"), what="the route")
    # The dead endpoint fails twice in a row, then it is ejected: no request reaches it.
    wait_until(lambda: all(get("eject.example").status == 200 for _ in range(20)),
               timeout=20, what="the dead endpoint to be ejected")
    assert all(get("eject.example").status == 200 for _ in range(50))


def test_sticky_sessions_by_cookie(lab: Any) -> None:
    manifests, _, _, _ = lab
    (manifests / "sticky.yaml").write_text(
        route("sticky", "sticky.example", "pair") + "\n---\n" + policy(
            "sticky", "sticky", sessionPersistence={"type": "Cookie", "sessionName": "sid"}))
    wait_until(lambda: "set-cookie" in get("sticky.example").headers, what="the session cookie")
    first = get("sticky.example")
    cookie = first.headers["set-cookie"].split(";")[0]
    pod = first.json()["pod"]
    assert cookie.startswith("sid=")
    assert {get("sticky.example", headers={"cookie": cookie}).json()["pod"]
            for _ in range(20)} == {pod}
    # Without the cookie both endpoints serve.
    assert len({get("sticky.example").json()["pod"] for _ in range(20)}) == 2


def test_invalid_and_conflicting_policies_are_reported_and_the_rest_works(lab: Any) -> None:
    manifests, agent, _, _ = lab
    (manifests / "bad.yaml").write_text(
        route("bad", "bad.example", "one") + "\n---\n" +
        policy("bad-invalid", "bad", retry={"numRetries": 99}) + "\n---\n" +
        policy("bad-missing", "nosuchroute", retry={"numRetries": 1}) + "\n---\n" +
        policy("bad-older", "bad", timeout={"http": {"requestTimeout": "5s"}}))
    wait_until(lambda: ancestor_condition(agent, "bad-older") is not None, what="status")
    (manifests / "bad2.yaml").write_text(
        policy("bad-younger", "bad", timeout={"http": {"requestTimeout": "1s"}}))
    wait_until(lambda: ancestor_condition(agent, "bad-younger") is not None, what="status")
    invalid = ancestor_condition(agent, "bad-invalid")
    assert invalid is not None and invalid["reason"] == "Invalid"
    assert "numRetries" in invalid["message"]
    missing = ancestor_condition(agent, "bad-missing")
    assert missing is not None and missing["reason"] == "TargetNotFound"
    younger = ancestor_condition(agent, "bad-younger")
    assert younger is not None and younger["reason"] == "Conflicted"
    assert "bad-older" in younger["message"]
    assert ancestor_condition(agent, "bad-older")["status"] == "True"  # type: ignore[index]
    # The older policy's 5 s timeout applies, not the younger's 1 s; other routes serve.
    assert get("bad.example", "/?delay=1500ms").status == 200
    assert get("rl.example").status in (200, 429)
    route_status = agent.status("HTTPRoute", "bad")
    assert route_status is not None
    affected = [c for c in route_status["parents"][0]["conditions"]
                if c["type"] == "mesh.dev/TrafficPolicyAffected"]
    assert affected and "bad-older" in affected[0]["message"]



def pods_over(host: str, n: int, headers: dict[str, str] | None = None) -> dict[str, int]:
    """Which pod answered each of `n` requests on one keep-alive connection."""
    conn = http.client.HTTPConnection(ADDRESS, PORT, timeout=5)
    counts: dict[str, int] = {}
    try:
        for _ in range(n):
            conn.request("GET", "/", headers={"Host": host, **(headers or {})})
            resp = conn.getresponse()
            pod = json.loads(resp.read())["pod"]
            counts[pod] = counts.get(pod, 0) + 1
    finally:
        conn.close()
    return counts


def test_canary_weights_and_matches(lab: Any) -> None:
    manifests, _, echoes, _ = lab
    (manifests / "canary-svc.yaml").write_text(
        service("v1", [echoes[0].port]) + "\n---\n" + service("v2", [echoes[1].port]))

    def canary(name: str, w1: int, w2: int) -> str:
        return route(name, f"{name}.example", "v1", rules=[
            {"matches": [{"headers": [{"name": "x-canary", "value": "yes"}]}],
             "backendRefs": [{"name": "v2", "port": 80}]},
            {"matches": [{"headers": [{"type": "RegularExpression", "name": "cookie",
                                       "value": r"(.*;\s*)?canary=always(;.*)?"}]}],
             "backendRefs": [{"name": "v2", "port": 80}]},
            {"backendRefs": [{"name": "v1", "port": 80, "weight": w1},
                             {"name": "v2", "port": 80, "weight": w2}]}])

    (manifests / "canary.yaml").write_text("\n---\n".join([
        canary("split", 70, 30), canary("none", 100, 0), canary("all", 0, 100)]))
    wait_until(lambda: all(served(f"{n}.example") for n in ("split", "none", "all")),
               what="the routes")
    wait_until(lambda: pods_over("all.example", 5) == {"echo-1": 5}, what="the canary")
    split = pods_over("split.example", 1000)
    assert abs(split.get("echo-1", 0) - 300) <= 50, split  # 30% within +-5 points
    assert pods_over("none.example", 200) == {"echo-0": 200}
    assert pods_over("all.example", 200) == {"echo-1": 200}
    assert pods_over("none.example", 50, {"x-canary": "yes"}) == {"echo-1": 50}
    assert pods_over("none.example", 50, {"cookie": "a=1; canary=always"}) == {"echo-1": 50}
    assert pods_over("none.example", 50, {"cookie": "canary=never"}) == {"echo-0": 50}


def test_active_health_check_keeps_traffic_off_a_dead_endpoint(lab: Any) -> None:
    manifests, _, _, _ = lab
    (manifests / "hc.yaml").write_text(
        route("hc", "hc.example", "half-dead") + "\n---\n" + docs({
            "apiVersion": "mesh.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "hc", "namespace": "default"},
            "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "half-dead"}],
                     "healthCheck": {"active": {"type": "HTTP", "interval": "1s",
                                                "timeout": "500ms", "unhealthyThreshold": 1,
                                                "http": {"path": "/healthz"}}}}}))
    wait_until(lambda: served("hc.example"), what="the route")
    # No request of ours fails: the dead endpoint is out before it takes any.
    wait_until(lambda: all(get("hc.example").status == 200 for _ in range(20)), timeout=20,
               what="the dead endpoint to be found unhealthy")
    assert all(get("hc.example").status == 200 for _ in range(50))


def test_consistent_hash_by_header_and_shadow_limits(lab: Any) -> None:
    manifests, _, _, _ = lab
    (manifests / "hash.yaml").write_text(
        route("hash", "hash.example", "pair") + "\n---\n" + policy(
            "hash", "hash",
            loadBalancer={"type": "ConsistentHash",
                          "consistentHash": {"type": "Header", "header": {"name": "x-user"}}},
            rateLimit={"local": {"rules": [{"limit": {"requests": 1, "unit": "Hour"},
                                            "shadowMode": True}]}}))
    wait_until(lambda: served("hash.example"), what="the route")
    wait_until(lambda: len(pods_over("hash.example", 10, {"x-user": "a"})) == 1,
               what="hashing by x-user")
    # Each user always lands on one pod; the users spread over both.
    by_user = {}
    for user in (f"user-{i}" for i in range(16)):
        seen = pods_over("hash.example", 10, {"x-user": user})
        assert len(seen) == 1, (user, seen)
        by_user[user] = next(iter(seen))
    assert set(by_user.values()) == {"echo-0", "echo-1"}
    # The shadow limit (1 an hour) counted all of those and refused none.
    assert get("hash.example").status == 200


def test_session_persistence_by_header(lab: Any) -> None:
    manifests, _, _, _ = lab
    (manifests / "hsession.yaml").write_text(
        route("hsession", "hsession.example", "pair") + "\n---\n" + policy(
            "hsession", "hsession",
            sessionPersistence={"type": "Header", "sessionName": "X-Session"}))
    wait_until(lambda: "x-session" in get("hsession.example").headers, what="the session header")
    first = get("hsession.example")
    token, pod = first.headers["x-session"], first.json()["pod"]
    assert {get("hsession.example", headers={"x-session": token}).json()["pod"]
            for _ in range(20)} == {pod}
