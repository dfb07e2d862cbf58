"""The agent's RBAC (mesh.kube.rbac, which the chart's ClusterRole and Role are checked
against in tests/test_chart.py) judged by the real API server's authorizer: with every rule,
each thing the agent does is allowed with its ServiceAccount's token; with one rule removed,
what that rule allowed is refused, and nothing else changes. So a rule that is not needed,
or a permission the code uses that no rule grants, shows here."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from mesh.kube.rbac import cluster_rules, namespace_rules
from mesh.lab.controlplane import ControlPlane
from tests import manifests
from tests.testbed import wait_until

pytestmark = pytest.mark.e2e
NAMESPACE = "mesh-rbac-test"
ACCOUNT = "mesh-agent"
ROLE = "mesh-agent-rbac-test"

Triple = tuple[str, str, str, str]  # namespace ("" = cluster-wide), group, resource, verb


def triples(rules: list[dict[str, list[str]]], namespace: str) -> set[Triple]:
    return {(namespace, g, r, v) for rule in rules for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


def roles(cluster: list[dict[str, Any]], local: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": ROLE}, "rules": cluster},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": ROLE, "namespace": NAMESPACE}, "rules": local}]


class Agent:
    """Requests with the agent ServiceAccount's token (no client certificate)."""

    def __init__(self, cp: ControlPlane, token: str) -> None:
        self.port = cp.port
        self.token = token
        self.ctx = ssl.create_default_context(cafile=str(cp.certs / "ca.crt"))

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx,
                                           timeout=10)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers={"Authorization": f"Bearer {self.token}",
                                  "Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            conn.close()

    def allowed(self, t: Triple) -> bool:
        """The authorizer's verdict on this token doing `t` (a SelfSubjectAccessReview)."""
        namespace, group, resource, verb = t
        plural, _, sub = resource.partition("/")
        attrs = {"group": group, "resource": plural, "subresource": sub, "verb": verb,
                 "namespace": namespace}
        status, body = self.request("POST", "/apis/authorization.k8s.io/v1/"
                                    "selfsubjectaccessreviews",
                                    {"apiVersion": "authorization.k8s.io/v1",
                                     "kind": "SelfSubjectAccessReview",
                                     "spec": {"resourceAttributes": attrs}})
        assert status == 201, body
        return bool(body["status"]["allowed"])


def apply(cp: ControlPlane, *objects: dict[str, Any]) -> None:
    done = cp.kubectl("apply", "-f", "-", input=manifests.docs(*objects), check=False)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def agent(control_plane: ControlPlane) -> Iterator[tuple[ControlPlane, Agent]]:
    cp = control_plane
    apply(cp, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
          {"apiVersion": "v1", "kind": "ServiceAccount",
           "metadata": {"name": ACCOUNT, "namespace": NAMESPACE}},
          *roles(cluster_rules(), namespace_rules()),
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
           "metadata": {"name": ROLE},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                       "name": ROLE},
           "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": NAMESPACE}]},
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
           "metadata": {"name": ROLE, "namespace": NAMESPACE},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ROLE},
           "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": NAMESPACE}]})
    token = cp.kubectl("create", "token", ACCOUNT, "-n", NAMESPACE).stdout.strip()
    try:
        yield cp, Agent(cp, token)
    finally:
        cp.kubectl("delete", "clusterrole,clusterrolebinding", ROLE, "--ignore-not-found",
                   check=False)
        cp.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def test_every_permission_of_the_rules_is_granted(agent: tuple[ControlPlane, Agent]) -> None:
    _, a = agent
    wanted = triples(cluster_rules(), "") | triples(namespace_rules(), NAMESPACE)
    wait_until(lambda: all(a.allowed(t) for t in wanted), timeout=15,
               what="the bindings in force")
    # And nothing beyond them: no write of a spec, no Secret read, no Lease elsewhere.
    for t in [("", "gateway.networking.k8s.io", "httproutes", "update"),
              ("", "", "secrets", "get"), ("", "", "pods", "delete"),
              ("default", "coordination.k8s.io", "leases", "update")]:
        assert not a.allowed(t), t
    # A real request, not only the authorizer's verdict: the agent lists Services.
    status, _ = a.request("GET", "/api/v1/services")
    assert status == 200


@pytest.mark.parametrize("which", range(len(cluster_rules()) + len(namespace_rules())))
def test_each_rule_is_needed_for_what_it_grants(agent: tuple[ControlPlane, Agent],
                                               which: int) -> None:
    cp, a = agent
    cluster, local = cluster_rules(), namespace_rules()
    rules = cluster + local
    removed = rules[which]
    scope = "" if which < len(cluster) else NAMESPACE
    lost = triples([removed], scope)
    # Still granted by another rule: not what this rule alone grants.
    kept_cluster = [r for i, r in enumerate(cluster) if i != which]
    kept_local = [r for i, r in enumerate(local) if i + len(cluster) != which]
    lost -= triples(kept_cluster, "") | triples(kept_local, NAMESPACE)
    assert lost, f"rule {removed} grants nothing another rule does not"
    apply(cp, *roles(kept_cluster, kept_local))
    try:
        wait_until(lambda: not any(a.allowed(t) for t in lost), timeout=15,
                   what=f"the API server to refuse what {removed} granted")
        if ("", "", "services", "list") in lost:  # a real request refused, too
            assert a.request("GET", "/api/v1/services")[0] == 403
        others = (triples(kept_cluster, "") | triples(kept_local, NAMESPACE))
        assert all(a.allowed(t) for t in others)
    finally:
        apply(cp, *roles(cluster, local))
        wait_until(lambda: all(a.allowed(t) for t in lost), timeout=15,
                   what="the rule back in force")
