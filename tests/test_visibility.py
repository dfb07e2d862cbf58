"""L7 visibility without a policy: a Service (or a namespace) annotated
`mesh.dev/l7-visibility: http` has its HTTP ports' connections handed to the node's Envoy, on
a chain whose one route sends every request to the Service as the datapath would (the
requests become flows); its other ports stay in the kernel. (In the lab, end to end:
tests/test_lab_demo.py.)"""

from __future__ import annotations

from typing import Any

from mesh import ir
from mesh.store.objects import parse_object
from mesh.store.store import Store
from mesh.translate import TranslatorConfig, translate

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


def proxied(*docs: dict[str, Any]) -> tuple[dict[tuple[str, int], int | None], ir.IR]:
    store = Store()
    store.replace("test", [parse_object(d) for d in docs])
    model = translate(store.snapshot(), TranslatorConfig()).ir
    return {(f.address, f.port): f.proxy_port for f in model.services
            if f.protocol == "TCP"}, model


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
