"""Property tests: random mutations of valid manifests never crash the translator, every
object of ours gets a status, and a route the mutation did not touch keeps answering."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.echo import EchoServer
from mesh.sinks.envoy.translate import to_envoy
from mesh.store import kinds
from mesh.store.objects import KubeObject, ObjectKey, parse_object
from mesh.store.store import StoreSnapshot
from mesh.translate import DEFAULT_CONTROLLER, translate
from mesh.translate.status import ClassStatus, GatewayStatus
from tests.testbed import Harness, http_get, wait_until

GOLDEN = Path(__file__).parent / "golden" / "translate"
DOCS = [d for p in sorted(GOLDEN.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())
        if isinstance(d, dict)]

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=12),
    st.just("*"), st.just("/"), st.just("(unclosed"), st.just("*.example.com"),
    st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=5),
                                                              st.integers(), max_size=2))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _set(node: Any, path: tuple[Any, ...], value: Any, delete: bool) -> None:
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value


@st.composite
def mutated(draw: st.DrawFn) -> list[dict[str, Any]]:
    docs = copy.deepcopy(DOCS)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(docs) - 1))
        # Keep apiVersion/kind/name: an object without them is refused by the provider,
        # which has its own tests.
        paths = [p for p in _paths(docs[i]) if len(p) > 1 and p[0] not in (
            "apiVersion", "kind") and p[:2] != ("metadata", "name")]
        if not paths:
            continue
        path = draw(st.sampled_from(paths))
        _set(docs[i], path, draw(JUNK), delete=draw(st.booleans()))
    return docs


def _ours(snapshot: StoreSnapshot) -> list[Any]:
    classes = {o.name for o in snapshot.of_kind(kinds.GATEWAY_CLASS)
               if o.spec.get("controllerName") == DEFAULT_CONTROLLER}
    gateways = {(o.namespace, o.name) for o in snapshot.of_kind(kinds.GATEWAY)
                if isinstance(o.spec.get("gatewayClassName"), str)
                and o.spec["gatewayClassName"] in classes}
    out = [o for o in snapshot.of_kind(kinds.GATEWAY_CLASS) if o.name in classes]
    out += [o for o in snapshot.of_kind(kinds.GATEWAY) if (o.namespace, o.name) in gateways]
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_never_crash_and_everything_of_ours_has_a_status(
        docs: list[dict[str, Any]]) -> None:
    objects: dict[ObjectKey, KubeObject] = {}
    for d in docs:
        obj = parse_object(d)
        objects.setdefault(obj.key, obj)
    snapshot = StoreSnapshot(objects)
    translation = translate(snapshot)
    to_envoy(translation.ir)
    for obj in _ours(snapshot):
        status = translation.status.get(obj.key)
        assert status is not None, f"{obj.key} has no status"
        assert isinstance(status, ClassStatus | GatewayStatus) and status.conditions, \
            f"{obj.key} has no conditions"


CONTROL = """
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: control}
spec: {controllerName: mesh.dev/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: control, namespace: control}
spec:
  gatewayClassName: control
  addresses: [{type: IPAddress, value: 127.0.99.1}]
  listeners: [{name: http, port: 18999, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: control, namespace: control}
spec:
  parentRefs: [{name: control}]
  rules: [{backendRefs: [{name: echo, port: 80}]}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: control}
spec: {ports: [{name: http, port: 80}]}
"""


@pytest.fixture(scope="module")
def envoy_bed() -> Iterator[tuple[Harness, EchoServer]]:
    echo = EchoServer("127.0.0.1", 0).start()
    h = Harness()
    h.start_server()
    h.set_snapshot("node1", [])
    h.start_envoy()
    yield h, echo
    h.close()
    echo.stop()
    shutil.rmtree(h.dir, ignore_errors=True)


@pytest.mark.e2e
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mutated())
def test_mutations_leave_an_untouched_route_answering(
        envoy_bed: tuple[Harness, EchoServer], docs: list[dict[str, Any]]) -> None:
    h, echo = envoy_bed
    control = list(yaml.safe_load_all(CONTROL))
    control.append({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "echo-1", "namespace": "control",
                     "labels": {"kubernetes.io/service-name": "echo"}},
        "ports": [{"name": "http", "port": echo.port}],
        "endpoints": [{"addresses": ["127.0.0.1"]}]})
    objects: dict[ObjectKey, KubeObject] = {}
    for d in [*control, *docs]:
        obj = parse_object(d)
        objects.setdefault(obj.key, obj)
    translation = translate(StoreSnapshot(objects))
    h.set_snapshot("node1", to_envoy(translation.ir).resources)
    # Whatever Envoy makes of the mutated objects (accepts, or rejects some), the control
    # route, which nothing touched, answers.
    wait_until(lambda: http_get(18999, "/", address="127.0.99.1", timeout=1).status == 200,
               timeout=10, what="the control route")
    assert http_get(18999, "/", address="127.0.99.1").json()["pod"] == "echo"


def _gateway(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "Gateway")


def _route(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "HTTPRoute")


def _filter(docs: list[dict[str, Any]], f: dict[str, Any]) -> None:
    _route(docs)["spec"]["rules"][0].setdefault("filters", []).append(f)


# Values the CRDs' schemas refuse, each once found to crash the translator or the Envoy sink:
# (what, mutation, the object whose status says so, words its message must hold)
OUT_OF_RANGE: list[tuple[str, Any, str, str]] = [
    ("listener port", lambda d: _gateway(d)["spec"]["listeners"][0].update(port=-1),
     "Gateway", "listeners[].port must be between 1 and 65535"),
    ("listener port", lambda d: _gateway(d)["spec"]["listeners"][0].update(port=2**32),
     "Gateway", "listeners[].port must be between"),
    ("redirect port", lambda d: _filter(d, {"type": "RequestRedirect",
                                            "requestRedirect": {"port": -1}}),
     "HTTPRoute", "requestRedirect.port must be between"),
    ("weight", lambda d: _route(d)["spec"]["rules"][0]["backendRefs"][0].update(weight=2**40),
     "HTTPRoute", "backendRefs[].weight must be between 0 and 1000000"),
    ("retry attempts", lambda d: _route(d)["spec"]["rules"][0].update(retry={"attempts": -1}),
     "HTTPRoute", "retry.attempts must be between"),
    ("retry codes", lambda d: _route(d)["spec"]["rules"][0].update(
        retry={"attempts": 2, "codes": [-1]}), "HTTPRoute", "retry.codes must be between 400"),
    ("mirror percent", lambda d: _filter(d, {"type": "RequestMirror", "requestMirror": {
        "backendRef": {"name": "api", "port": 8080}, "percent": -5}}),
     "HTTPRoute", "requestMirror.percent must be between 0 and 100"),
    ("backend port", lambda d: _route(d)["spec"]["rules"][0]["backendRefs"][0].update(
        port=70000), "HTTPRoute", "backendRefs[].port must be between"),
]


@pytest.mark.parametrize("what, mutate, kind, words", OUT_OF_RANGE,
                         ids=[c[0] for c in OUT_OF_RANGE])
def test_out_of_range_values_get_a_status_not_a_crash(what: str, mutate: Any, kind: str,
                                                      words: str) -> None:
    docs = copy.deepcopy([d for d in yaml.safe_load_all(
        (GOLDEN / "http-basic.yaml").read_text()) if isinstance(d, dict)])
    mutate(docs)
    snapshot = StoreSnapshot.of(parse_object(d) for d in docs)
    translation = translate(snapshot)
    to_envoy(translation.ir)
    obj = snapshot.of_kind(kinds.GATEWAY if kind == "Gateway" else kinds.HTTP_ROUTE)[0]
    text = str(translation.status[obj.key].to_kubernetes())
    assert words in text, text


@pytest.mark.parametrize("selector", [{"matchLabels": ["a"]}, {"matchExpressions": ["a"]},
                                      {"matchExpressions": 5},
                                      {"matchExpressions": [{"key": 1, "operator": "In"}]}])
def test_a_selector_of_the_wrong_shape_selects_nothing(selector: dict[str, Any]) -> None:
    docs = copy.deepcopy([d for d in yaml.safe_load_all(
        (GOLDEN / "http-basic.yaml").read_text()) if isinstance(d, dict)])
    _gateway(docs)["spec"]["listeners"][0]["allowedRoutes"] = {
        "namespaces": {"from": "Selector", "selector": selector}}
    snapshot = StoreSnapshot.of(parse_object(d) for d in docs)
    translation = translate(snapshot)
    to_envoy(translation.ir)
    route = snapshot.of_kind(kinds.HTTP_ROUTE)[0]
    assert "NotAllowedByListeners" in str(translation.status[route.key].to_kubernetes())
