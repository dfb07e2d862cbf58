"""What is generated for Gateways: the translator's phase (which Gateways get a Service,
with what), and the leader's writer against the real API server (the run's shared control
plane), with the agent's token and RBAC: the Service and its EndpointSlice as `kubectl`
shows them, an annotation dropped from the Gateway dropped from the Service, a mode change
that needs the Service made again, a Service no longer wanted deleted, and what an earlier
leader left behind pruned by the next one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mesh import ir
from mesh.kube.client import connect
from mesh.kube.infrastructure import GatewayServiceWriter
from mesh.lab.controlplane import ControlPlane
from mesh.store.objects import parse_object
from mesh.store.store import Store
from mesh.translate import TranslatorConfig, translate
from tests import manifests
from tests.test_kubernetes_real import agent_namespace, apply, install_crds

NAMESPACE = "real-infra"


def _translate(mode: str, *docs: dict[str, Any]) -> tuple[ir.GatewayService, ...]:
    store = Store()
    store.replace("test", [parse_object(d) for d in docs])
    cfg = TranslatorConfig(address_pool="10.99.0.0/24", gateway_addresses=mode)
    return translate(store.snapshot(), cfg).ir.gateway_services


NODE = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"},
                                 {"type": "Hostname", "address": "n1"}]}}


def _gateway(**spec: Any) -> dict[str, Any]:
    return manifests.gateway(None, manifests.listener("http", 80),
                             manifests.listener("dns", 53, "UDP"),
                             manifests.listener("bad", 81, "SCTP"), **spec)


def test_each_gateway_gets_a_service_with_its_infrastructure_labels_and_ports() -> None:
    infra = {"labels": {"team": "a", "mesh.dev/gateway": "not-theirs"},
             "annotations": {"lb.example/kind": "internal"}}
    [gs] = _translate("pool", manifests.gateway_class(), _gateway(infrastructure=infra), NODE)
    assert gs.name == "mesh-gateway-gw" and gs.namespace == "default"
    assert dict(gs.labels) == {"team": "a", "mesh.dev/gateway": "gw",  # ours win
                               "gateway.networking.k8s.io/gateway-name": "gw",
                               "app.kubernetes.io/managed-by": "mesh.dev-gateway-controller"}
    assert dict(gs.annotations) == {"lb.example/kind": "internal"}
    # The valid listeners' ports, by transport; the SCTP listener is not served.
    assert [(p.name, p.port, p.protocol) for p in gs.ports] == [("udp-53", 53, "UDP"),
                                                                ("tcp-80", 80, "TCP")]
    assert gs.load_balancer_class == "mesh.dev/gateway-pool"
    assert gs.ingress == gs.endpoints and len(gs.ingress) == 1
    assert gs.ingress[0].startswith("10.99.0.")
    # loadbalancer mode: no class (the cloud's balancer takes it), endpoints are the nodes.
    [lb] = _translate("loadbalancer", manifests.gateway_class(), _gateway(), NODE)
    assert lb.load_balancer_class is None and lb.ingress == () and \
        lb.endpoints == ("192.0.2.10",)
    # node mode, and a Gateway with its own addresses: nothing is generated.
    assert _translate("node", manifests.gateway_class(), _gateway(), NODE) == ()
    static = manifests.gateway("10.99.0.9")
    assert _translate("pool", manifests.gateway_class(), static, NODE) == ()


def _service(name: str, *, labels: dict[str, str] | None = None,
             annotations: dict[str, str] | None = None, lb_class: str | None = "mesh.dev/x",
             uid: str = "") -> ir.GatewayService:
    return ir.GatewayService(
        namespace=NAMESPACE, name=f"mesh-gateway-{name}", gateway=name, gateway_uid=uid,
        labels=tuple(sorted({**(labels or {}),
                             "app.kubernetes.io/managed-by": "mesh.dev-gateway-controller",
                             "gateway.networking.k8s.io/gateway-name": name}.items())),
        annotations=tuple(sorted((annotations or {}).items())),
        ports=(ir.GatewayServicePort("tcp-80", 80, "TCP"),
               ir.GatewayServicePort("udp-53", 53, "UDP")),
        load_balancer_class=lb_class, ingress=("172.31.9.7",) if lb_class else (),
        endpoints=("172.31.9.7",))


@pytest.fixture(scope="module")
def kubeconfig(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Path]:
    install_crds(control_plane)
    path = tmp_path_factory.mktemp("infra") / "kubeconfig"
    with agent_namespace(control_plane, NAMESPACE, path) as config:
        yield config


def _get(cp: ControlPlane, kind: str, name: str) -> dict[str, Any] | None:
    done = cp.kubectl("get", kind, name, "-n", NAMESPACE, "-o", "json", check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


async def _reconcile(kubeconfig: Path, desired: list[ir.GatewayService],
                     writer: GatewayServiceWriter | None = None) -> GatewayServiceWriter:
    async with connect(str(kubeconfig)) as http:
        w = writer or GatewayServiceWriter(http.call, http.apply, lambda: True, None,
                                           "mesh.dev-gateway-controller")
        w.call, w.server_apply = http.call, http.apply
        await w.reconcile({(g.namespace, g.name): g for g in desired})
        return w


@pytest.mark.e2e
def test_the_leader_keeps_the_generated_services_in_the_cluster(
        control_plane: ControlPlane, kubeconfig: Path) -> None:
    cp = control_plane
    apply(cp, manifests.gateway(None, name="edge", namespace=NAMESPACE))
    uid = json.loads(cp.kubectl("get", "gateway", "edge", "-n", NAMESPACE, "-o",
                                "json").stdout)["metadata"]["uid"]
    edge = _service("edge", labels={"team": "a"}, annotations={"a": "1", "b": "2"}, uid=uid)
    writer = asyncio.run(_reconcile(kubeconfig, [edge]))
    svc = _get(cp, "service", "mesh-gateway-edge")
    assert svc is not None
    assert svc["spec"]["type"] == "LoadBalancer" and \
        svc["spec"]["loadBalancerClass"] == "mesh.dev/x"
    assert svc["metadata"]["labels"]["team"] == "a"
    assert svc["metadata"]["annotations"] == {"a": "1", "b": "2"}
    assert svc["metadata"]["ownerReferences"][0]["uid"] == uid
    assert svc["status"]["loadBalancer"]["ingress"] == [{"ip": "172.31.9.7", "ipMode": "VIP"}]
    assert {(p["name"], p["port"], p["protocol"]) for p in svc["spec"]["ports"]} == {
        ("tcp-80", 80, "TCP"), ("udp-53", 53, "UDP")}
    # kubectl's EXTERNAL-IP column: what a user looks at.
    table = cp.kubectl("get", "service", "mesh-gateway-edge", "-n", NAMESPACE).stdout
    assert "172.31.9.7" in table, table
    eps = _get(cp, "endpointslice", "mesh-gateway-edge")
    assert eps is not None and eps["endpoints"][0]["addresses"] == ["172.31.9.7"]
    assert eps["metadata"]["labels"]["kubernetes.io/service-name"] == "mesh-gateway-edge"

    # Unchanged: nothing written. An annotation gone from the Gateway: gone from the Service.
    writes = writer.writes
    asyncio.run(_reconcile(kubeconfig, [edge], writer))
    assert writer.writes == writes
    asyncio.run(_reconcile(kubeconfig, [replace(edge, annotations=(("a", "1"),))], writer))
    svc = _get(cp, "service", "mesh-gateway-edge")
    assert svc is not None and svc["metadata"]["annotations"] == {"a": "1"}

    # The mode changed: the class cannot, so the Service is made again without it.
    lb = replace(edge, load_balancer_class=None, ingress=())
    asyncio.run(_reconcile(kubeconfig, [lb], writer))
    svc = _get(cp, "service", "mesh-gateway-edge")
    assert svc is not None and "loadBalancerClass" not in svc["spec"]

    # No longer wanted: the Service and its EndpointSlice are deleted.
    asyncio.run(_reconcile(kubeconfig, [], writer))
    assert _get(cp, "service", "mesh-gateway-edge") is None
    assert _get(cp, "endpointslice", "mesh-gateway-edge") is None


@pytest.mark.e2e
def test_a_new_leader_prunes_what_an_earlier_one_left(control_plane: ControlPlane,
                                                      kubeconfig: Path) -> None:
    left = _service("gone")  # no owner: as a Gateway deleted while no one led
    keep = _service("kept")
    asyncio.run(_reconcile(kubeconfig, [left, keep]))
    assert _get(control_plane, "service", "mesh-gateway-gone") is not None
    # Another agent takes the lead, and only one of them is still wanted.
    asyncio.run(_reconcile(kubeconfig, [keep]))
    assert _get(control_plane, "service", "mesh-gateway-gone") is None
    assert _get(control_plane, "endpointslice", "mesh-gateway-gone") is None
    assert _get(control_plane, "service", "mesh-gateway-kept") is not None
