"""TrafficPolicy attachment on the pure translator: precedence per feature, east-west (GAMMA)
scopes, and a memoized translation (routes reused) giving the same IR as a fresh one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mesh import ir
from mesh.store.store import StoreSnapshot
from mesh.translate import TranslationMemo, TranslatorConfig, translate
from tests.test_translate_golden import load

BASE = """
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: mesh}
spec: {controllerName: mesh.dev/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: ns}
spec:
  gatewayClassName: mesh
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: ns}
spec:
  parentRefs: [{name: gw}]
  rules:
  - name: special
    matches: [{path: {type: PathPrefix, value: /special}}]
    backendRefs: [{name: svc, port: 80}]
  - backendRefs: [{name: svc, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: east-west, namespace: ns}
spec:
  parentRefs: [{group: "", kind: Service, name: svc, port: 80}]
  rules:
  - backendRefs: [{name: svc, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: svc, namespace: ns}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: svc-1, namespace: ns, labels: {kubernetes.io/service-name: svc}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
"""


def policy(name: str, kind: str, target: str, section: str | None = None,
           **spec: Any) -> dict[str, Any]:
    group = "" if kind == "Service" else "gateway.networking.k8s.io"
    ref: dict[str, Any] = {"group": group, "kind": kind, "name": target}
    if section:
        ref["sectionName"] = section
    return {"apiVersion": "mesh.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"targetRefs": [ref], **spec}}


def snapshot(tmp: Path, *policies: dict[str, Any]) -> StoreSnapshot:
    (tmp / "in.yaml").write_text(BASE + "---\n" + yaml.safe_dump_all(policies))
    return load(tmp)


def routes(result: ir.IR, table_prefix: str) -> dict[str, ir.Route]:
    return {r.name: r for t in result.route_tables if t.name.startswith(table_prefix)
            for vh in t.virtual_hosts for r in vh.routes}


def forward(r: ir.Route) -> ir.Forward:
    assert isinstance(r.action, ir.Forward)
    return r.action


def attempts(r: ir.Route) -> int | None:
    retry = forward(r).retry
    return retry.attempts if retry is not None else None


def retries(n: int) -> dict[str, Any]:
    return {"retry": {"numRetries": n}}


def test_each_feature_decided_by_the_most_specific_policy(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        policy("gw", "Gateway", "gw", **retries(1), timeout={"http": {"requestTimeout": "9s"}}),
        policy("listener", "Gateway", "gw", "http", **retries(2)),
        policy("route", "HTTPRoute", "r", **retries(3)),
        policy("rule", "HTTPRoute", "r", "special", **retries(4)))
    got = routes(translate(snap, TranslatorConfig()).ir, "127.0.100.1:80")
    special, rest = got["ns/r/special/match0"], got["ns/r/rule1/match0"]
    assert attempts(special) == 4
    assert attempts(rest) == 3
    # The Gateway's timeout still applies: nothing more specific sets one.
    assert forward(special).timeout == forward(rest).timeout == 9.0


def test_east_west_scope_service_then_route(tmp_path: Path) -> None:
    limit = {"rateLimit": {"local": {"rules": [{"limit": {"requests": 7, "unit": "Second"}}]}}}
    snap = snapshot(tmp_path, policy("svc-port", "Service", "svc", "http", **limit),
                    policy("svc", "Service", "svc", **retries(1)),
                    policy("ew", "HTTPRoute", "east-west", **retries(5)))
    out = translate(snap, TranslatorConfig()).ir
    mesh = routes(out, "mesh/")
    (r,) = mesh.values()
    assert [x.requests for x in r.rate_limits] == [7]  # from the Service's port
    assert attempts(r) == 5  # the route's
    # North-south routes to the same Service are not in the Service's mesh scope.
    assert all(not x.rate_limits for x in routes(out, "127.0.100.1:80").values())


def test_backend_copies_survive_a_memoized_translation(tmp_path: Path) -> None:
    cb = {"circuitBreaker": {"maxParallelRequests": 5}}
    snap = snapshot(tmp_path, policy("cb", "HTTPRoute", "r", "special", **cb))
    memo = TranslationMemo()
    first = translate(snap, TranslatorConfig(), memo=memo).ir
    second = translate(snap, TranslatorConfig(), memo=memo).ir
    assert memo.hits >= 2  # the routes were reused, not translated again
    assert second == first
    names = {b.name for b in second.backends}
    assert "ns/svc/80|policy=ns/cb" in names
    copy = next(b for b in second.backends if b.name == "ns/svc/80|policy=ns/cb")
    assert copy.settings.circuit_breaker is not None
    assert copy.settings.circuit_breaker.max_requests == 5
    special = routes(second, "127.0.100.1:80")["ns/r/special/match0"]
    assert [w.backend for w in forward(special).backends] == ["ns/svc/80|policy=ns/cb"]
