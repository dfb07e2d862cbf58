"""ClusterNetworkPolicy (v1alpha2) compiled for the datapath, judged by the datapath's lookups
mirrored over the IR (mesh.policy.datapath_verdict): each tier and action, Pass falling through
to NetworkPolicy and then Baseline, priorities and rule order, overlapping port ranges, named
ports, networks and nodes, and a peer that cannot be honoured failing closed. The same cases run
in the lab (tests/test_cnp_lab.py)."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.policy import clusternetworkpolicy as cnp
from mesh.policy import datapath_verdict as dv
from mesh.policy import identities as ids
from mesh.policy.networkpolicy import Invalid
from mesh.store.objects import parse_object
from mesh.store.store import Store
from mesh.translate.cluster_network_policy import Piece, flatten
from mesh.translate.identities import identity_table
from mesh.translate.network_policy import translate_network_policies

PODS = {"x/a": "10.244.1.10", "x/b": "10.244.1.11", "y/a": "10.244.2.10",
        "y/b": "10.244.2.11"}
NODE = ("node1", "172.30.0.11")
PORTS = [{"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"},
         {"name": "serve-81-tcp", "containerPort": 81, "protocol": "TCP"},
         {"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"}]


def world(*policies: dict[str, Any]) -> Any:
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns,
                                             "team": "blue" if ns == "x" else "red"}}}
        for ns in ("x", "y")]
    objects.append({"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": NODE[0], "labels": {"role": "infra"}},
                    "status": {"addresses": [{"type": "InternalIP", "address": NODE[1]}]}})
    table = ids.IdentityTable({})
    for pod_id, ip in PODS.items():
        ns, name = pod_id.split("/")
        labels = {"pod": name}
        objects.append({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": name, "namespace": ns, "labels": labels},
                        "spec": {"containers": [{"name": "c", "ports": PORTS}]},
                        "status": {"phase": "Running", "podIP": ip}})
        key = ids.identity_labels(ns, labels, {"kubernetes.io/metadata.name": ns,
                                               "team": "blue" if ns == "x" else "red"})
        n = table.next_free(key)
        table = ids.IdentityTable({**table.by_number, n: ids.labels_key(key)})
        objects.append({"apiVersion": "mesh.dev/v1alpha1", "kind": "MeshIdentity",
                        "metadata": {"name": str(n)}, "spec": {"labels": dict(key)}})
    objects += policies
    store = Store()
    store.replace("test", [parse_object(o) for o in objects])
    snap = store.snapshot()
    state = translate_network_policies(snap, None, identity_table(snap))
    for e in state.endpoints:  # one value per map key, as the datapath's maps hold them
        keys = [(t.tier, t.direction, t.identity, t.protocol, t.port, t.end_port)
                for t in e.tiers]
        assert len(keys) == len(set(keys)), f"overlapping tier entries for {e.address}"
    return state


def reach(state: Any, src: str, dst: str, port: int = 80, protocol: str = "TCP") -> bool:
    source = PODS.get(src, src)
    ok, _ = dv.verdict(state, state, source, PODS[dst], protocol, port)
    return ok


def cnp_obj(name: str, tier: str, priority: int, subject: dict[str, Any],
            ingress: list[dict[str, Any]] | None = None,
            egress: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"tier": tier, "priority": priority, "subject": subject}
    if ingress:
        spec["ingress"] = ingress
    if egress:
        spec["egress"] = egress
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name}, "spec": spec}


def np_obj(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


NS_X = {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}}
FROM_Y = [{"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]
ALLOW_ALL_NP = np_obj("allow-all", "x", {"podSelector": {}, "ingress": [{}]})
DENY_ALL_NP = np_obj("deny-all", "x", {"podSelector": {}, "policyTypes": ["Ingress"]})


def test_admin_deny_wins_over_a_networkpolicy_that_allows() -> None:
    s = world(ALLOW_ALL_NP, cnp_obj("deny-y", "Admin", 10, NS_X,
                                    ingress=[{"action": "Deny", "from": FROM_Y}]))
    assert not reach(s, "y/a", "x/a") and reach(s, "x/b", "x/a")


def test_admin_accept_wins_over_a_networkpolicy_that_denies() -> None:
    s = world(DENY_ALL_NP, cnp_obj("accept-y", "Admin", 10, NS_X,
                                   ingress=[{"action": "Accept", "from": FROM_Y}]))
    assert reach(s, "y/a", "x/a") and not reach(s, "x/b", "x/a")


def test_pass_falls_through_to_networkpolicy_then_baseline() -> None:
    passing = cnp_obj("pass-y", "Admin", 5, NS_X, ingress=[{"action": "Pass", "from": FROM_Y}])
    deny_later = cnp_obj("deny-y", "Admin", 20, NS_X,
                         ingress=[{"action": "Deny", "from": FROM_Y}])
    baseline_deny = cnp_obj("baseline-deny-y", "Baseline", 10, NS_X,
                            ingress=[{"action": "Deny", "from": FROM_Y}])
    # Pass skips the rest of the Admin tier (its Deny) and no NetworkPolicy isolates x:
    # the Baseline tier decides.
    assert not reach(world(passing, deny_later, baseline_deny), "y/a", "x/a")
    # A NetworkPolicy that isolates x and allows y: it decides, Baseline is not consulted.
    np_allow_y = np_obj("allow-y", "x", {"podSelector": {}, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}]})
    assert reach(world(passing, deny_later, baseline_deny, np_allow_y), "y/a", "x/a")
    # Pass before an Accept of another policy of the tier: the NetworkPolicy decides.
    accept_later = cnp_obj("accept-y", "Admin", 10, NS_X,
                           ingress=[{"action": "Accept", "from": FROM_Y}])
    assert not reach(world(passing, accept_later, DENY_ALL_NP), "y/a", "x/a")
    # Without the Pass, the Admin Deny decides.
    assert not reach(world(deny_later, np_allow_y), "y/a", "x/a")
    # Baseline Accept lets in what no NetworkPolicy isolates; its Deny drops.
    baseline_accept = cnp_obj("baseline-accept", "Baseline", 5, NS_X,
                              ingress=[{"action": "Accept", "from": FROM_Y}])
    assert reach(world(baseline_accept, baseline_deny), "y/a", "x/a")


def test_priority_then_rule_order_decides() -> None:
    accept = cnp_obj("a-accept", "Admin", 10, NS_X, ingress=[{"action": "Accept",
                                                              "from": FROM_Y}])
    deny = cnp_obj("b-deny", "Admin", 20, NS_X, ingress=[{"action": "Deny", "from": FROM_Y}])
    assert reach(world(accept, deny, DENY_ALL_NP), "y/a", "x/a")
    deny_first = cnp_obj("b-deny", "Admin", 5, NS_X, ingress=[{"action": "Deny",
                                                               "from": FROM_Y}])
    assert not reach(world(accept, deny_first, ALLOW_ALL_NP), "y/a", "x/a")
    in_order = cnp_obj("ordered", "Admin", 10, NS_X, ingress=[
        {"action": "Deny", "from": FROM_Y, "protocols": [{"tcp": {"destinationPort":
                                                                  {"number": 80}}}]},
        {"action": "Accept", "from": FROM_Y}])
    s = world(in_order, DENY_ALL_NP)
    assert not reach(s, "y/a", "x/a", 80) and reach(s, "y/a", "x/a", 81)
    assert reach(s, "y/a", "x/a", 80, "UDP")


def test_overlapping_port_ranges_keep_the_first_rule_on_each_port() -> None:
    wide_first = cnp_obj("wide", "Admin", 10, NS_X, ingress=[
        {"action": "Accept", "from": FROM_Y,
         "protocols": [{"tcp": {"destinationPort": {"range": {"start": 1, "end": 1000}}}}]},
        {"action": "Deny", "from": FROM_Y}])
    s = world(wide_first)
    assert reach(s, "y/a", "x/a", 80) and reach(s, "y/a", "x/a", 1000)
    assert not reach(s, "y/a", "x/a", 1001) and not reach(s, "y/a", "x/a", 80, "UDP")
    entries = flatten("admin", "ingress", 300, [
        Piece(1, "Deny", "TCP", 80, 80), Piece(2, "Accept", "TCP", 1, 1000),
        Piece(3, "Pass", None)])
    tcp = sorted((e.port or 0, e.end_port or e.port or 0, e.action) for e in entries
                 if e.protocol == "TCP")
    assert tcp == [(0, 0, "Pass"), (1, 79, "Accept"), (80, 80, "Deny"), (81, 1000, "Accept"),
                   (1001, 65535, "Pass")]
    assert [e.action for e in entries if e.protocol is None] == ["Pass"]


def test_named_ports_networks_and_nodes() -> None:
    named = cnp_obj("named", "Admin", 10, NS_X, ingress=[
        {"action": "Deny", "from": FROM_Y, "protocols": [{"destinationNamedPort":
                                                          "serve-81-tcp"}]}])
    s = world(named, ALLOW_ALL_NP)
    assert reach(s, "y/a", "x/a", 80) and not reach(s, "y/a", "x/a", 81)
    to_net = cnp_obj("no-y-net", "Admin", 10, NS_X, egress=[
        {"action": "Deny", "to": [{"networks": ["10.244.2.0/24"]}]}])
    s = world(to_net)
    assert not reach(s, "x/a", "y/a") and reach(s, "x/a", "x/b")
    to_node = cnp_obj("no-infra", "Admin", 10, NS_X, egress=[
        {"action": "Deny", "to": [{"nodes": {"matchLabels": {"role": "infra"}}}]}])
    s = world(to_node)
    out = dv.decide(dv.endpoint(s, PODS["x/a"]), "egress", dv.peer_of(s, NODE[1]), "TCP", 22)
    assert not out.allowed and "no-infra" in out.reason
    assert reach(s, "x/a", "y/a")


def test_a_peer_that_cannot_be_honoured_fails_closed() -> None:
    deny_dns = cnp_obj("deny-domains", "Admin", 10, NS_X, egress=[
        {"action": "Deny", "to": [{"domainNames": ["example.com"]}]}])
    s = world(deny_dns)
    assert not reach(s, "x/a", "y/a") and not reach(s, "x/a", "x/b")
    assert any("domainNames is not supported" in p.message for p in s.problems)
    accept_dns = cnp_obj("accept-domains", "Admin", 10, NS_X, egress=[
        {"action": "Accept", "to": [{"domainNames": ["example.com"]}]}])
    s = world(accept_dns, np_obj("deny-out", "x", {"podSelector": {},
                                                    "policyTypes": ["Egress"]}))
    assert not reach(s, "x/a", "y/a")  # the Accept matches nothing: the isolation decides


def test_the_subject_selects_by_namespace_and_pod() -> None:
    only_b = cnp_obj("b-only", "Admin", 10, {"pods": {
        "namespaceSelector": {"matchLabels": {"team": "blue"}},
        "podSelector": {"matchLabels": {"pod": "b"}}}},
        ingress=[{"action": "Deny", "from": FROM_Y}])
    s = world(only_b)
    assert not reach(s, "y/a", "x/b") and reach(s, "y/a", "x/a")


@pytest.mark.parametrize("spec, message", [
    ({"tier": "Gold", "priority": 1, "subject": NS_X}, "spec.tier"),
    ({"tier": "Admin", "priority": 1001, "subject": NS_X}, "spec.priority"),
    ({"tier": "Admin", "priority": 1, "subject": {}}, "spec.subject"),
    ({"tier": "Admin", "priority": 1, "subject": NS_X,
      "ingress": [{"action": "Allow", "from": FROM_Y}]}, "action"),
    ({"tier": "Admin", "priority": 1, "subject": NS_X, "ingress": [{"action": "Deny"}]},
     "from"),
    ({"tier": "Admin", "priority": 1, "subject": NS_X, "ingress": [
        {"action": "Deny", "from": FROM_Y,
         "protocols": [{"tcp": {"destinationPort": {"range": {"start": 9, "end": 8}}}}]}]},
     "range"),
])
def test_what_the_schema_refuses_is_refused(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(Invalid, match=message):
        cnp.parse(parse_object({"apiVersion": "policy.networking.k8s.io/v1alpha2",
                                "kind": "ClusterNetworkPolicy", "metadata": {"name": "p"},
                                "spec": spec}))


def test_each_policy_says_whether_it_is_enforced_as_written() -> None:
    from mesh.translate.cluster_network_policy import statuses

    good = cnp_obj("good", "Admin", 10, NS_X, ingress=[{"action": "Deny", "from": FROM_Y}])
    dns = cnp_obj("dns", "Admin", 10, NS_X, egress=[
        {"action": "Deny", "to": [{"domainNames": ["example.com"]}]}])
    bad = cnp_obj("bad", "Admin", 2000, NS_X)
    store = Store()
    store.replace("test", [parse_object(o) for o in (good, dns, bad)])
    got = {k.name: v.to_kubernetes()["conditions"][0] for k, v in
           statuses(store.snapshot()).items()}
    assert got["good"]["status"] == "True" and got["good"]["reason"] == "Accepted"
    assert got["dns"]["status"] == "False" and got["dns"]["reason"] == "UnsupportedValue"
    assert "fails closed" in got["dns"]["message"]
    assert got["bad"]["status"] == "False" and got["bad"]["reason"] == "Invalid"
    assert "spec.priority" in got["bad"]["message"]
