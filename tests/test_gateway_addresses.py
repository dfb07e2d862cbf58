"""Where a Gateway's addresses come from (`--gateway-addresses`): the pool, the nodes, or a
LoadBalancer Service; what the node's Envoy listens on, and what the status says."""

from __future__ import annotations

from typing import Any

from mesh.store import kinds
from mesh.store.objects import ObjectKey, parse_object
from mesh.store.store import Store
from mesh.translate import TranslatorConfig, translate
from mesh.translate.status import GatewayStatus

GW = "gateway.networking.k8s.io"
KEY = ObjectKey(GW, "Gateway", "default", "gw")


def objects(*extra: dict[str, Any], spec_addresses: list[dict[str, str]] | None = None,
            nodes: bool = True) -> Store:
    docs: list[dict[str, Any]] = [
        {"apiVersion": f"{GW}/v1", "kind": "GatewayClass", "metadata": {"name": "mesh"},
         "spec": {"controllerName": "mesh.dev/gateway-controller"}},
        {"apiVersion": f"{GW}/v1", "kind": "Gateway",
         "metadata": {"name": "gw", "namespace": "default"},
         "spec": {"gatewayClassName": "mesh", "addresses": spec_addresses or [],
                  "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}},
        *extra]
    if nodes:
        docs += [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                  "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                           {"type": "Hostname", "address": name}]}}
                 for name, ip in (("n1", "10.0.0.1"), ("n2", "10.0.0.2"))]
    store = Store()
    store.replace("t", [parse_object(d) for d in docs])
    return store


def run(store: Store, mode: str, pool: str = "127.0.100.0/24"
        ) -> tuple[list[str], dict[str, Any], list[str]]:
    """(status addresses, the Programmed condition, what the node listens on)."""
    t = translate(store.snapshot(), TranslatorConfig(node_name="n1", gateway_addresses=mode,
                                                     address_pool=pool))
    st = t.status[KEY]
    assert isinstance(st, GatewayStatus)
    k8s = st.to_kubernetes()
    programmed: dict[str, Any] = next(
        (c for c in k8s["conditions"] if c["type"] == "Programmed"), {})
    listens = sorted({li.address for li in t.ir.listeners if li.port == 80})
    return [a["value"] for a in k8s["addresses"]], programmed, listens


def lb_service(ingress: list[dict[str, str]] | None, name: str = "gw-lb") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"mesh.dev/gateway": "gw"}},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
            "status": {"loadBalancer": {"ingress": ingress or []}}}


def test_pool() -> None:
    addresses, programmed, listens = run(objects(), "pool")
    assert addresses == ["127.0.100.1"] and listens == ["127.0.100.1"]
    assert programmed == {}  # no problem of the translator's: the sinks' Programmed follows


def test_node_addresses() -> None:
    addresses, programmed, listens = run(objects(), "node")
    assert addresses == ["10.0.0.1", "10.0.0.2"]  # every node's, not the Hostname entries
    assert listens == ["10.0.0.1"]  # this node's own
    assert programmed == {}


def test_node_mode_without_this_nodes_node_object() -> None:
    addresses, programmed, listens = run(objects(nodes=False), "node")
    assert addresses == [] and listens == []
    assert programmed["status"] == "False" and programmed["reason"] == "AddressNotUsable"
    assert "has no Node object" in programmed["message"]


def test_loadbalancer_service_addresses() -> None:
    addresses, programmed, listens = run(objects(lb_service(
        [{"ip": "203.0.113.7"}, {"hostname": "gw.lb.example"}])), "loadbalancer")
    assert addresses == ["203.0.113.7", "gw.lb.example"]
    assert listens == ["10.0.0.1"]  # the load balancer sends to the nodes
    assert programmed == {}
    t = translate(objects(lb_service([{"hostname": "gw.lb.example"}])).snapshot(),
                  TranslatorConfig(node_name="n1", gateway_addresses="loadbalancer"))
    st = t.status[KEY]
    assert isinstance(st, GatewayStatus)
    assert st.to_kubernetes()["addresses"] == [{"type": "Hostname", "value": "gw.lb.example"}]


def test_loadbalancer_not_there_yet() -> None:
    addresses, programmed, listens = run(objects(lb_service(None)), "loadbalancer")
    assert addresses == [] and listens == ["10.0.0.1"]  # served meanwhile
    assert programmed["reason"] == "AddressNotAssigned"
    assert programmed["message"] == \
        "waiting for Service default/gw-lb (type LoadBalancer) to be given an address"
    cluster_ip = {**lb_service(None), "spec": {"type": "ClusterIP", "ports": [{"port": 80}]}}
    _, wrong, _ = run(objects(cluster_ip), "loadbalancer")
    assert wrong["message"] == "Service default/gw-lb (labelled mesh.dev/gateway=gw) is not " \
        "of type LoadBalancer"
    _, missing, _ = run(objects(), "loadbalancer")
    assert missing["message"] == "no LoadBalancer Service labelled mesh.dev/gateway=gw in default"


def test_the_load_balancers_address_arriving_changes_the_status() -> None:
    store = objects(lb_service(None))
    assert run(store, "loadbalancer")[0] == []
    store.replace("lb", [parse_object(lb_service([{"ip": "203.0.113.9"}], name="gw-lb2"))])
    assert run(store, "loadbalancer")[0] == ["203.0.113.9"]


def test_static_addresses_win_in_every_mode() -> None:
    for mode in ("pool", "node", "loadbalancer"):
        addresses, _, listens = run(objects(spec_addresses=[
            {"type": "IPAddress", "value": "10.0.0.1"}]), mode)
        assert addresses == ["10.0.0.1"] and listens == ["10.0.0.1"], mode


def test_static_addresses_of_other_nodes_are_served_there() -> None:
    """Each node's Envoy serves the static addresses it has; another Node's address is
    served by that node (listed in the status, not AddressNotUsable); an address no Node has
    is not usable, and says so."""
    both = [{"type": "IPAddress", "value": "10.0.0.1"}, {"type": "IPAddress", "value": "10.0.0.2"}]
    for mode in ("pool", "node", "loadbalancer"):
        addresses, programmed, listens = run(objects(spec_addresses=both), mode)
        assert addresses == ["10.0.0.1", "10.0.0.2"] and listens == ["10.0.0.1"], mode
        assert programmed == {}, mode
    foreign = [*both, {"type": "IPAddress", "value": "192.0.2.9"}]
    addresses, programmed, listens = run(objects(spec_addresses=foreign), "pool")
    assert addresses == ["10.0.0.1", "10.0.0.2"] and listens == ["10.0.0.1"]
    assert programmed["reason"] == "AddressNotUsable" and "192.0.2.9" in programmed["message"]
    assert "10.0.0.2" not in programmed["message"]


def test_a_pool_address_the_status_writer_published_is_kept_on_every_node() -> None:
    """On a cluster each node allocates from the pool on its own; the address the leader
    wrote into the Gateway's status wins over the order this node saw the Gateways in, so
    every node serves the Gateway where the status says."""
    store = objects()
    gw = next(o for o in store.snapshot().of_kind(kinds.GATEWAY))
    body = {**gw.body, "status": {"addresses": [{"type": "IPAddress", "value": "127.0.100.9"}]}}
    store.replace("t", [*(o for o in store.snapshot() if o.key != KEY), parse_object(body)])
    addresses, _, listens = run(store, "pool")
    assert addresses == ["127.0.100.9"] and listens == ["127.0.100.9"]
    # An address outside the pool in the status is not taken for one.
    body["status"] = {"addresses": [{"type": "IPAddress", "value": "10.9.9.9"}]}
    store.replace("t", [*(o for o in store.snapshot() if o.key != KEY), parse_object(body)])
    assert run(store, "pool")[0] == ["127.0.100.1"]


def test_a_static_address_of_the_pool_is_usable() -> None:
    """The pool is served by every node (in the lab it is routed to them): a Gateway may
    ask for one of its addresses."""
    asked = objects(spec_addresses=[{"type": "IPAddress", "value": "172.31.0.42"}])
    addresses, programmed, listens = run(asked, "node", pool="172.31.0.0/24")
    assert addresses == ["172.31.0.42"] and listens == ["172.31.0.42"]
    assert programmed == {}
    _, elsewhere, _ = run(asked, "node", pool="172.31.1.0/24")  # not this pool's
    assert elsewhere["reason"] == "AddressNotUsable"


def test_a_bad_mode_is_refused() -> None:
    try:
        TranslatorConfig(gateway_addresses="dhcp")
    except ValueError as e:
        assert "pool, node, loadbalancer" in str(e)
    else:
        raise AssertionError("accepted")
