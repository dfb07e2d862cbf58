"""NetworkPolicy semantics (mesh.policy.networkpolicy) against the upstream Kubernetes e2e
cases (../shared/netpol/cases.yaml, read at run time): every step of every case, each
probed (port, protocol) matrix decided by the policy model and compared with upstream's
expected reachability; and the API's endPort validation cases. The same cases run against
the lab's datapath once it enforces policy; this checks the decisions it will be given."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.policy import networkpolicy as np
from mesh.store.objects import parse_object
from tests.netpol import runner

CASES = Path(__file__).resolve().parents[1].parent / "shared" / "netpol" / "cases.yaml"
pytestmark = pytest.mark.skipif(not CASES.exists(), reason=f"{CASES} is not beside the "
                                "project (the shared data is read at run time, not copied)")
NAMESPACE_NODE = {"x": 1, "y": 2, "z": 3}  # pod networks as the lab gives them


@functools.cache
def _data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.load(CASES.read_text(),
                                     Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return data


def _ip(pod_id: str) -> str:
    ns, name = pod_id.split("/")
    return f"10.244.{NAMESPACE_NODE[ns]}.{10 + 'abc'.index(name)}"


def _fill(value: Any) -> Any:
    """The placeholders of ipBlock cases, filled as the README says (as the lab runner does)."""
    return runner.fill(value, _ip)


CASE_IDS = [c["id"] for c in _data()["reachability_cases"]] if CASES.exists() else []


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_upstream_reachability(case_id: str) -> None:
    data = _data()
    case = next(c for c in data["reachability_cases"] if c["id"] == case_id)
    model = data["model"]
    ports = {p["name"]: (p["port"], p["protocol"]) for p in model["container_ports"]}
    ns_labels = {n["name"]: dict(n["labels"]) for n in model["namespaces"]}
    pod_labels = {p["id"]: dict(p["labels"]) for p in model["pods"]}
    policies: dict[tuple[str, str], np.NetworkPolicy] = {}
    wrong = []
    for s, step in enumerate(case["steps"]):
        for action in step["actions"]:
            kind = action["action"]
            if kind == "apply":
                obj = parse_object(_fill(action["policy"]))
                policies[(obj.namespace, obj.name)] = np.parse(obj)
            elif kind == "delete_all_policies":
                policies = {k: v for k, v in policies.items()
                            if k[0] not in action["namespaces"]}
            elif kind == "add_namespace_labels":
                ns_labels[action["namespace"]].update(action["labels"])
            elif kind == "add_pod_labels":
                pod_labels[f"{action['namespace']}/{action['pod']}"].update(action["labels"])
            else:
                pytest.fail(f"unknown action {kind}")
        decide = np.Decision(list(policies.values()), ns_labels)

        def endpoint(pod_id: str) -> np.Endpoint:
            return np.Endpoint(_ip(pod_id), pod_id.split("/")[0], pod_labels[pod_id], ports)

        for expect in step["expect"]:
            for e in expect["matrix"]:
                if e.get("ignored"):
                    continue
                got = decide.verdict(endpoint(e["from"]), endpoint(e["to"]), e["port"],
                                     e["protocol"])
                if got.allowed != e["allowed"]:
                    wrong.append(f"step {s + 1}: {e['from']} -> {e['to']} "
                                 f"{e['protocol']}/{e['port']}: expected "
                                 f"{'allowed' if e['allowed'] else 'denied'}, got "
                                 f"{got.allowed} ({got.reason}: {', '.join(got.policies)})")
    assert not wrong, "\n".join(wrong[:20])


def test_upstream_api_validation() -> None:
    for case in _data()["validation_cases"]:
        policy = dict(case["policy"])
        policy["metadata"] = {"name": "v", "namespace": "x"}
        try:
            np.parse(parse_object(policy))
            accepted = True
        except np.Invalid:
            accepted = False
        assert accepted == case["expect_accepted"], case["id"]


def test_a_verdict_names_the_policies_that_decide() -> None:
    policy = parse_object({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                     {"key": "tier", "operator": "In", "values": ["front"]}]}}],
                     "ports": [{"port": 8080, "endPort": 8090}]}]}})
    decide = np.Decision([np.parse(policy)], {"shop": {}})
    web = np.Endpoint("10.0.0.1", "shop", {"app": "web"})
    front = np.Endpoint("10.0.0.2", "shop", {"tier": "front"})
    other = np.Endpoint("10.0.0.3", "shop", {"tier": "back"})
    ok = decide.verdict(front, web, 8085, "TCP")
    assert ok.allowed and ok.policies == ("shop/web (Ingress)",)
    assert not decide.verdict(front, web, 8091, "TCP").allowed
    assert not decide.verdict(front, web, 8085, "UDP").allowed
    denied = decide.verdict(other, web, 8085, "TCP")
    assert not denied.allowed and denied.policies == ("shop/web (Ingress)",)
    assert "ingress" in denied.reason
    # The other way round nothing isolates: allowed, by no policy.
    free = decide.verdict(web, other, 80, "TCP")
    assert free.allowed and free.policies == ()


def _identity_objects(pods: dict[str, dict[str, str]], ns_labels: dict[str, dict[str, str]]
                      ) -> list[dict[str, Any]]:
    """MeshIdentity objects for the pods' label sets, numbered as an allocator would."""
    from mesh.policy import identities as ids

    table = ids.IdentityTable({})
    out = []
    for pod_id, labels in sorted(pods.items()):
        ns = pod_id.split("/")[0]
        key = ids.identity_labels(ns, labels, ns_labels[ns])
        if table.find(key) is not None:
            continue
        n = table.next_free(key)
        table = ids.IdentityTable({**table.by_number, n: ids.labels_key(key)})
        out.append({"apiVersion": "mesh.dev/v1alpha1", "kind": "MeshIdentity",
                    "metadata": {"name": str(n)}, "spec": {"labels": dict(key)}})
    return out


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_the_compiled_datapath_state_gives_upstream_reachability(case_id: str) -> None:
    """The same cases through the translator (identities, CIDR identities, named ports, the
    per-pod allowed entries) and the datapath's lookups mirrored over the IR
    (mesh.policy.datapath_verdict): what the BPF maps will be asked."""
    from mesh.policy import datapath_verdict as dv
    from mesh.store.store import Store
    from mesh.translate.identities import identity_table
    from mesh.translate.network_policy import translate_network_policies

    data = _data()
    case = next(c for c in data["reachability_cases"] if c["id"] == case_id)
    model = data["model"]
    container = [{"name": "c", "ports": [
        {"name": p["name"], "containerPort": p["port"], "protocol": p["protocol"]}
        for p in model["container_ports"]]}]
    ns_labels = {n["name"]: dict(n["labels"]) for n in model["namespaces"]}
    pod_labels = {p["id"]: dict(p["labels"]) for p in model["pods"]}
    policies: dict[tuple[str, str], dict[str, Any]] = {}
    wrong = []
    for s, step in enumerate(case["steps"]):
        for action in step["actions"]:
            if action["action"] == "apply":
                body = _fill(action["policy"])
                policies[(body["metadata"]["namespace"], body["metadata"]["name"])] = body
            elif action["action"] == "delete_all_policies":
                policies = {k: v for k, v in policies.items()
                            if k[0] not in action["namespaces"]}
            elif action["action"] == "add_namespace_labels":
                ns_labels[action["namespace"]].update(action["labels"])
            else:
                pod_labels[f"{action['namespace']}/{action['pod']}"].update(action["labels"])
        objects = [{"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ns, "labels": labels}}
                   for ns, labels in ns_labels.items()]
        objects += [{"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": pod_id.split("/")[1], "namespace": pod_id.split("/")[0],
                                  "labels": labels},
                     "spec": {"containers": container},
                     "status": {"phase": "Running", "podIP": _ip(pod_id)}}
                    for pod_id, labels in pod_labels.items()]
        objects += _identity_objects(pod_labels, ns_labels) + list(policies.values())
        store = Store()
        store.replace("test", [parse_object(o) for o in objects])
        snap = store.snapshot()
        compiled = translate_network_policies(snap, None, identity_table(snap))
        for expect in step["expect"]:
            for e in expect["matrix"]:
                if e.get("ignored"):
                    continue
                ok, why = dv.verdict(compiled, compiled, _ip(e["from"]), _ip(e["to"]),
                                     e["protocol"], e["port"])
                if ok != e["allowed"]:
                    wrong.append(f"step {s + 1}: {e['from']} -> {e['to']} {e['protocol']}/"
                                 f"{e['port']}: expected {e['allowed']}, got {ok} ({why})")
    assert not wrong, "\n".join(wrong[:20])
