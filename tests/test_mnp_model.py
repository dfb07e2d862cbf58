"""MeshNetworkPolicy compiled for the datapath and the node's Envoy: peers by endpoints,
namespaces, CIDRs and entities; L7 ports marked for the proxy and grouped by client for
Envoy's filter chains; toFQDNs rules (the DNS proxy's entries, the names' patterns); what
fails closed (L7 on egress, a refused policy) and the status that says so. The lab runs the
same rules with real requests (tests/test_netpol_lab.py)."""

from __future__ import annotations

from typing import Any

from mesh import ir
from mesh.datapath.policy import policy_keys
from mesh.policy import datapath_verdict as dv
from mesh.policy import identities as ids
from mesh.policy.meshnetworkpolicy import fqdn_regex
from mesh.store.objects import parse_object
from mesh.store.store import Store
from mesh.translate.identities import identity_table
from mesh.translate.network_policy import (
    DNS_PROXY_PORT,
    POLICY_PORT,
    mesh_network_policy_statuses,
    translate_network_policies,
)
from mesh.translate.policy_listener import policy_listener

PODS = {"shop/server": "10.244.1.10", "shop/a": "10.244.1.11", "shop/b": "10.244.2.11",
        "ops/c": "10.244.2.12"}


def snapshot(*policies: dict[str, Any]) -> Any:
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}}
        for ns in ("shop", "ops")]
    table = ids.IdentityTable({})
    for pod_id, ip in PODS.items():
        ns, name = pod_id.split("/")
        objects.append({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
                        "spec": {"containers": [{"name": "c", "ports": [
                            {"name": "http", "containerPort": 3000}]}]},
                        "status": {"phase": "Running", "podIP": ip}})
        key = ids.identity_labels(ns, {"app": name}, {"kubernetes.io/metadata.name": ns})
        n = table.next_free(key)
        table = ids.IdentityTable({**table.by_number, n: ids.labels_key(key)})
        objects.append({"apiVersion": "mesh.dev/v1alpha1", "kind": "MeshIdentity",
                        "metadata": {"name": str(n)}, "spec": {"labels": dict(key)}})
    objects += policies
    store = Store()
    store.replace("test", [parse_object(o) for o in objects])
    return store.snapshot()


def compile_(*policies: dict[str, Any]) -> ir.NetworkPolicies:
    snap = snapshot(*policies)
    return translate_network_policies(snap, None, identity_table(snap))


def mnp(name: str, spec: dict[str, Any], namespace: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "mesh.dev/v1alpha1", "kind": "MeshNetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def reach(state: ir.NetworkPolicies, src: str, dst: str, port: int = 3000) -> bool:
    ok, _ = dv.verdict(state, state, PODS.get(src, src), PODS[dst], "TCP", port)
    return ok


PUBLIC_ONLY = mnp("public-only", {
    "endpointSelector": {"matchLabels": {"app": "server"}},
    "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "a"}}],
                 "toPorts": [{"port": 3000, "http": [{"method": "GET", "path": "/public.*"}],
                              "grpc": [{"service": "shop.Cart", "method": "Get"}]}]}]})


def test_l7_ports_go_to_the_proxy_for_the_allowed_clients_only() -> None:
    state = compile_(PUBLIC_ONLY)
    server = dv.endpoint(state, PODS["shop/server"])
    assert server is not None and server.ingress_isolated and not server.egress_isolated
    assert all(a.proxy for a in server.allow) and len(server.allow) == 1
    assert reach(state, "shop/a", "shop/server") and not reach(state, "shop/b", "shop/server")
    assert state.proxy_port == POLICY_PORT
    (target,) = state.l7
    assert (target.address, target.port, target.http2) == (PODS["shop/server"], 3000, True)
    (group,) = target.groups
    assert group.sources == (f"{PODS['shop/a']}/32",) and group.policies == ("shop/public-only",)
    assert ir.L7Rule("GET", "/public.*") in group.rules
    assert ir.L7Rule("POST", r"/shop\.Cart/Get") in group.rules


def test_the_proxy_listener_forwards_allowed_requests_and_answers_403_naming_the_policy() -> None:
    listener, tables, backends = policy_listener(compile_(PUBLIC_ONLY))
    assert listener is not None and listener.transparent and listener.port == POLICY_PORT
    assert [b.endpoints for b in backends] == [(ir.Endpoint(PODS["shop/server"], 3000),)]
    assert backends[0].protocol == "h2c"  # a gRPC rule: the pod speaks HTTP/2
    by_name = {t.name: t for t in tables}
    for chain in listener.chains:
        assert chain.destination == (PODS["shop/server"], 3000)
        assert chain.route_table is not None
        routes = by_name[chain.route_table].virtual_hosts[0].routes
        assert routes[-1].action == ir.DirectResponse(
            403, "Access denied by network policy shop/public-only\n")
    clients, others = listener.chains
    assert clients.source_ranges == (f"{PODS['shop/a']}/32",) and not others.source_ranges
    allowed = by_name[str(clients.route_table)].virtual_hosts[0].routes[:-1]
    assert {(r.method, r.path.value) for r in allowed} == {
        ("GET", "/public.*"), ("POST", r"/shop\.Cart/Get")}


def test_an_l4_allow_of_the_same_port_wins_over_l7() -> None:
    also_l4 = mnp("l4", {"endpointSelector": {"matchLabels": {"app": "server"}},
                         "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "a"}}],
                                      "toPorts": [{"port": 3000}]}]})
    from mesh.datapath.policy import policy_keys

    state = compile_(PUBLIC_ONLY, also_l4)
    server = dv.endpoint(state, PODS["shop/server"])
    assert server is not None
    assert set(policy_keys(server, state.proxy_port).values()) == {0}


def test_peers_by_namespace_cidr_and_entity() -> None:
    state = compile_(mnp("peers", {
        "endpointSelector": {"matchLabels": {"app": "server"}},
        "ingress": [{"fromNamespaces": [{"matchLabels": {"kubernetes.io/metadata.name": "ops"}}]},
                    {"fromCIDRs": ["192.0.2.0/24"]},
                    {"fromEntities": ["host"]}],
        "egress": [{"toEntities": ["world"], "toPorts": [{"port": 443}]}]}))
    assert reach(state, "ops/c", "shop/server") and not reach(state, "shop/a", "shop/server")
    ok, _ = dv.verdict(state, state, "192.0.2.9", PODS["shop/server"], "TCP", 3000)
    assert ok
    ok, _ = dv.verdict(state, state, "198.51.100.1", PODS["shop/server"], "TCP", 3000)
    assert not ok
    ok, _ = dv.verdict(state, state, PODS["shop/server"], "203.0.113.5", "TCP", 443)
    assert ok
    ok, _ = dv.verdict(state, state, PODS["shop/server"], PODS["shop/a"], "TCP", 443)
    assert not ok  # a pod is not the world
    cluster = compile_(mnp("cluster", {
        "endpointSelector": {"matchLabels": {"app": "server"}},
        "ingress": [{"fromEntities": ["cluster"]}]}))
    assert reach(cluster, "ops/c", "shop/server")
    ok, _ = dv.verdict(cluster, cluster, "203.0.113.5", PODS["shop/server"], "TCP", 3000)
    assert not ok


def test_fqdn_rules_send_dns_through_the_proxy_and_name_their_ports() -> None:
    policy = mnp("names", {
        "endpointSelector": {"matchLabels": {"app": "a"}},
        "egress": [{"toFQDNs": [{"matchName": "API.Example.com."},
                                {"matchPattern": "*.cdn.example.com"}],
                    "toPorts": [{"port": 443}, {"port": 8000, "endPort": 8080}]}]})
    state = compile_(policy)
    a = dv.endpoint(state, PODS["shop/a"])
    assert a is not None and a.egress_isolated and not a.ingress_isolated
    assert a.fqdn == (ir.FqdnAllow("*.cdn.example.com", "TCP", 443),
                      ir.FqdnAllow("*.cdn.example.com", "TCP", 8000, 8080),
                      ir.FqdnAllow("api.example.com", "TCP", 443),
                      ir.FqdnAllow("api.example.com", "TCP", 8000, 8080))
    assert state.dns_proxy_port == DNS_PROXY_PORT
    # its DNS goes anywhere, through the proxy; nothing else is allowed by identity
    dns = [x for x in a.allow if x.dns]
    assert {(x.protocol, x.port, x.identity) for x in dns} == {("UDP", 53, ids.ANY),
                                                              ("TCP", 53, ids.ANY)}
    assert not reach(state, "shop/a", "shop/server", 3000)
    ok, why = dv.verdict(state, state, PODS["shop/a"], "203.0.113.5", "TCP", 443)
    assert not ok and "api.example.com" in why and "*.cdn.example.com" in why
    ok, why = dv.verdict(state, state, PODS["shop/a"], "203.0.113.53", "UDP", 53)
    assert ok and "DNS proxy" in why
    # the datapath keys: the DNS proxy's port wins over a plain allow of the same key
    both = mnp("both", {"endpointSelector": {"matchLabels": {"app": "a"}},
                        "egress": [{"toPorts": [{"port": 53, "protocol": "UDP"}]}]})
    a = dv.endpoint(compile_(policy, both), PODS["shop/a"])
    assert a is not None
    keys = policy_keys(a, POLICY_PORT, DNS_PROXY_PORT)
    udp53 = [port for (_, identity, _, proto, p, _), port in keys.items()
             if identity == ids.ANY and proto == 17 and p == 53]
    assert udp53 == [DNS_PROXY_PORT]
    assert not dv.endpoint(compile_(both), PODS["shop/a"]).fqdn  # type: ignore[union-attr]
    assert compile_(both).dns_proxy_port == 0


def test_fqdn_patterns_match_one_label_per_star() -> None:
    assert fqdn_regex("api.example.com").fullmatch("api.example.com")
    assert not fqdn_regex("api.example.com").fullmatch("apixexample.com")  # dots are dots
    star = fqdn_regex("*.example.com")
    assert star.fullmatch("a.example.com") and star.fullmatch("a-b_c.example.com")
    assert not star.fullmatch("a.b.example.com") and not star.fullmatch("example.com")
    assert fqdn_regex("api-*.example.com").fullmatch("api-eu1.example.com")
    assert fqdn_regex("*").fullmatch("anything.at.all")


def test_fqdn_rules_refused_with_other_peers_or_bad_names() -> None:
    for rule, message in (
            ({"toFQDNs": [{"matchName": "a.example.com"}], "toCIDRs": ["10.0.0.0/8"]},
             "rule of its own"),
            ({"toFQDNs": [{"matchName": "bad name"}]}, "is not a DNS name"),
            ({"toFQDNs": [{"matchPattern": "a.(x).com"}]}, "is not a DNS pattern"),
            ({"toFQDNs": [{"matchName": "a.com", "matchPattern": "*.com"}]}, "one of"),
            ({"toFQDNs": [{"matchName": f"n{i}.com"} for i in range(33)]}, "at most 32")):
        policy = mnp("bad", {"endpointSelector": {"matchLabels": {"app": "a"}},
                             "egress": [rule]})
        a = dv.endpoint(compile_(policy), PODS["shop/a"])
        assert a is not None and a.egress_isolated and a.ingress_isolated and not a.allow
        (cond,) = next(iter(mesh_network_policy_statuses(snapshot(policy)).values())
                       ).to_kubernetes()["conditions"]
        assert (cond["status"], cond["reason"]) == ("False", "Invalid"), rule
        assert message in cond["message"], (message, cond["message"])


def test_what_is_not_enforced_yet_fails_closed_and_says_so() -> None:
    policy = mnp("later", {
        "endpointSelector": {"matchLabels": {"app": "a"}},
        "egress": [{"toEndpoints": [{"matchLabels": {"app": "server"}}],
                    "toPorts": [{"port": 3000, "http": [{"path": "/"}]}]}]})
    state = compile_(policy)
    assert not reach(state, "shop/a", "shop/server")  # isolated, nothing allowed
    messages = [p.message for p in state.problems]
    assert any("on egress are not enforced yet" in m for m in messages)
    status = mesh_network_policy_statuses(snapshot(policy))
    (cond,) = next(iter(status.values())).to_kubernetes()["conditions"]
    assert (cond["status"], cond["reason"]) == ("False", "UnsupportedValue")
    refused = mnp("refused", {"endpointSelector": {"matchLabels": {"app": "b"}},
                              "ingress": [{"toPorts": [{"port": 80, "protocol": "UDP",
                                                        "http": [{"path": "/"}]}]}]})
    state = compile_(refused)
    b = dv.endpoint(state, PODS["shop/b"])
    assert b is not None and b.ingress_isolated and b.egress_isolated and not b.allow
    (cond,) = next(iter(mesh_network_policy_statuses(snapshot(refused)).values())
                   ).to_kubernetes()["conditions"]
    assert (cond["status"], cond["reason"]) == ("False", "Invalid")
    assert "need protocol TCP" in cond["message"]
