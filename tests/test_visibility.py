"""L7 visibility without a rule: a Service (or a namespace) annotated
`mesh.dev/l7-visibility: http`, or a Service (port) a TrafficPolicy's `l7Visibility: HTTP`
targets, has its HTTP ports' connections handed to the node's Envoy, on a chain whose one
route sends every request to the Service as the datapath would (the requests become flows);
its other ports stay in the kernel. (In the lab, end to end: tests/test_lab_demo.py.)"""

from __future__ import annotations

from typing import Any

from mesh import ir
from mesh.store.objects import parse_object
from mesh.store.store import Store
from mesh.translate import TranslatorConfig, translate
from mesh.translate.config import Translation
from mesh.translate.status import Condition, PolicyStatus

SHOP = "10.96.3.10"


def service(name: str, ip: str, annotations: dict[str, str] | None = None,
            namespace: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace,
                         "annotations": annotations or {}},
            "spec": {"clusterIP": ip, "selector": {"app": name}, "ports": [
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "metrics", "port": 9090, "appProtocol": "http"},
                {"name": "redis", "port": 6379}]}}


def namespace(name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "annotations": annotations or {}}}


def visibility_policy(name: str, value: str, *targets: dict[str, str],
                      namespace: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "mesh.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"targetRefs": list(targets), "l7Visibility": value}}


def proxied(*docs: dict[str, Any]) -> tuple[dict[tuple[str, int], int | None], ir.IR]:
    ports, result = translated(*docs)
    return ports, result.ir


def translated(*docs: dict[str, Any]) -> tuple[dict[tuple[str, int], int | None], Translation]:
    store = Store()
    store.replace("test", [parse_object(d) for d in docs])
    result = translate(store.snapshot(), TranslatorConfig())
    return {(f.address, f.port): f.proxy_port for f in result.ir.services
            if f.protocol == "TCP"}, result


def accepted(result: Translation, name: str) -> Condition:
    (status,) = [s for k, s in result.status.items()
                 if k.kind == "TrafficPolicy" and k.name == name]
    assert isinstance(status, PolicyStatus)
    (ancestor,) = status.ancestors
    c = ancestor.conditions.find("Accepted")
    assert c is not None
    return c


def test_an_annotated_service_has_its_http_ports_seen_by_envoy() -> None:
    ports, model = proxied(namespace("shop"),
                           service("shop", SHOP, {"mesh.dev/l7-visibility": "http"}))
    # the HTTP ports (by name, or by appProtocol) through the mesh listener; redis not
    assert ports == {(SHOP, 80): 15001, (SHOP, 9090): 15001, (SHOP, 6379): None}
    (mesh,) = [li for li in model.listeners if li.name == "mesh"]
    chains = {c.destination: c for c in mesh.chains}
    assert set(chains) == {(SHOP, 80), (SHOP, 9090)}
    table = next(t for t in model.route_tables if t.name == chains[(SHOP, 80)].route_table)
    ((route,),) = [vh.routes for vh in table.virtual_hosts]
    assert route.path == ir.StringMatch("Prefix", "/")
    assert isinstance(route.action, ir.Forward)
    (backend,) = route.action.backends
    assert backend.backend is not None and "shop" in backend.backend


def test_a_namespace_annotation_covers_its_services_unless_one_says_none() -> None:
    ports, _ = proxied(namespace("shop", {"mesh.dev/l7-visibility": "http"}),
                       service("shop", SHOP),
                       service("cart", "10.96.3.11", {"mesh.dev/l7-visibility": "none"}),
                       namespace("other"), service("other", "10.96.4.10", namespace="other"))
    assert ports[(SHOP, 80)] == 15001
    assert ports[("10.96.3.11", 80)] is None
    assert ports[("10.96.4.10", 80)] is None


def test_without_annotations_nothing_changes() -> None:
    ports, model = proxied(namespace("shop"), service("shop", SHOP))
    assert set(ports.values()) == {None}
    assert not [li for li in model.listeners if li.name == "mesh"]


def test_a_traffic_policy_turns_visibility_on_for_a_service_or_one_port() -> None:
    ports, result = translated(
        namespace("shop"), service("shop", SHOP), service("cart", "10.96.3.11"),
        visibility_policy("see-shop", "HTTP", {"kind": "Service", "name": "shop"}),
        visibility_policy("see-cart-metrics", "HTTP",
                          {"kind": "Service", "name": "cart", "sectionName": "metrics"}))
    assert ports == {(SHOP, 80): 15001, (SHOP, 9090): 15001, (SHOP, 6379): None,
                     ("10.96.3.11", 80): None, ("10.96.3.11", 9090): 15001,
                     ("10.96.3.11", 6379): None}
    c = accepted(result, "see-cart-metrics")
    assert c.status and c.message == "applies to Service shop/cart port metrics"


def test_a_policy_decides_before_the_annotations_and_its_port_before_its_service() -> None:
    ports, _ = proxied(
        namespace("shop", {"mesh.dev/l7-visibility": "http"}),
        service("shop", SHOP, {"mesh.dev/l7-visibility": "http"}),
        visibility_policy("hide-shop", "None", {"kind": "Service", "name": "shop"}),
        visibility_policy("see-shop-metrics", "HTTP",
                          {"kind": "Service", "name": "shop", "sectionName": "metrics"}))
    assert ports == {(SHOP, 80): None, (SHOP, 9090): 15001, (SHOP, 6379): None}


def test_a_visibility_policy_on_a_route_is_refused_with_its_reason() -> None:
    route = {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "shop"}
    ports, result = translated(namespace("shop"), service("shop", SHOP),
                               visibility_policy("on-a-route", "HTTP", route))
    assert set(ports.values()) == {None}
    c = accepted(result, "on-a-route")
    assert (c.status, c.reason) == (False, "Invalid")
    assert "applies to Services only" in c.message
