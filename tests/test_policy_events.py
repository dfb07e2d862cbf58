"""Warning Events on NetworkPolicies the datapath cannot enforce as written, recorded by the
leader with the agent's own token and RBAC against a real API server: one per problem, not
repeated by a new leader, listed by `kubectl get events`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mesh import ir
from mesh.kube.client import connect
from mesh.kube.events import REASON, PolicyEvents
from mesh.lab.controlplane import ControlPlane
from mesh.store.objects import parse_object
from mesh.store.store import Store
from mesh.translate.identities import identity_table
from mesh.translate.network_policy import translate_network_policies
from tests.test_kubernetes_real import agent_namespace, apply

NAMESPACE = "policy-events"


async def lead_twice(kubeconfig: Path, model: ir.IR, node_keys: bool = False
                     ) -> tuple[int, int]:
    """The Events written by a leader given `model`, then by the next leader given it."""
    writes = []
    async with connect(str(kubeconfig)) as http:
        for _ in range(2):
            sink = PolicyEvents(http.call, "node-a", lambda: True, None, node_keys=node_keys)
            sink.apply(model)
            task = asyncio.create_task(sink.run())
            for _ in range(100):
                if sink.recorded:
                    break
                await asyncio.sleep(0.05)
            task.cancel()
            writes.append(sink.writes)
    return writes[0], writes[1]


@pytest.mark.e2e
def test_a_policy_not_enforced_as_written_gets_one_warning_event(
        control_plane: ControlPlane, tmp_path: Path) -> None:
    cp = control_plane
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "v6", "namespace": NAMESPACE},
              "spec": {"podSelector": {}, "ingress": [
                  {"from": [{"ipBlock": {"cidr": "2001:db8::/64"}}]}]}}
    with agent_namespace(cp, NAMESPACE, tmp_path / "kubeconfig") as kubeconfig:
        apply(cp, policy)
        _, stored = cp.request("GET", f"/apis/networking.k8s.io/v1/namespaces/{NAMESPACE}/"
                                      "networkpolicies/v6")
        store = Store()
        store.replace("api", [parse_object(stored | {"apiVersion": "networking.k8s.io/v1",
                                                     "kind": "NetworkPolicy"})])
        snap = store.snapshot()
        state = translate_network_policies(snap, None, identity_table(snap))
        assert [p.message for p in state.problems] == [
            "ipBlock 2001:db8::/64: IPv6 is not enforced (the datapath is IPv4 only); the "
            "peer selects nothing"]

        first, second = asyncio.run(lead_twice(kubeconfig, ir.IR(network_policies=state)))
        assert (first, second) == (1, 0)
        events = cp.kubectl("get", "events", "-n", NAMESPACE, "--field-selector",
                            "involvedObject.kind=NetworkPolicy,involvedObject.name=v6").stdout
        assert REASON in events and "IPv6 is not enforced" in events, events


@pytest.mark.e2e
def test_a_node_with_a_refused_key_gets_one_warning_event(
        control_plane: ControlPlane, tmp_path: Path) -> None:
    """A Node publishing a WireGuard key that is not one: a Warning Event on the Node (in the
    default namespace, where a cluster object's Events go), recorded once."""
    from mesh.encryption.keys import ANNOTATION
    from mesh.kube.events import KEY_REASON
    from mesh.translate.encryption import translate_encryption

    cp = control_plane
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "bad-key-node", "annotations": {ANNOTATION: "not-a-key"}}}
    with agent_namespace(cp, f"{NAMESPACE}-keys", tmp_path / "kubeconfig") as kubeconfig:
        apply(cp, node)
        try:
            _, stored = cp.request("GET", "/api/v1/nodes/bad-key-node")
            store = Store()
            store.replace("api", [parse_object(stored | {"apiVersion": "v1", "kind": "Node"})])
            encryption = translate_encryption(store.snapshot(), "another-node")
            assert [p.node for p in encryption.problems] == ["bad-key-node"]

            assert asyncio.run(lead_twice(kubeconfig, ir.IR(encryption=encryption),
                                          node_keys=True)) == (1, 0)
            events = cp.kubectl("get", "events", "-n", "default", "--field-selector",
                                "involvedObject.kind=Node,involvedObject.name=bad-key-node"
                                ).stdout
            assert KEY_REASON in events and "not base64" in events, events
        finally:
            cp.kubectl("delete", "node", "bad-key-node", "--ignore-not-found", check=False)
            cp.kubectl("delete", "events", "-n", "default", "--field-selector",
                       "involvedObject.name=bad-key-node", check=False)
