"""The real control plane (mesh.lab.controlplane: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler from .kube/bin): it comes up, kubectl drives it, RBAC
and service-account tokens work, the real controllers and scheduler act, and the API server
itself judges the project's CRDs (schema and CEL) and the Gateway API's.

The e2e tests share the session's control plane (tests/cluster.py); each works in namespaces
and objects of its own. The tests of start failures and of the cleanup use stand-in programs,
not the real binaries.
"""

from __future__ import annotations

import ipaddress
import json
import os
import ssl
import stat
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.lab.controlplane import (
    Binaries,
    ControlPlane,
    ControlPlaneError,
    gateway_api_crds,
)
from mesh.lab.workloads import SERVICE_CIDR
from tests.cluster import eventually
from tests.test_crds import (
    CRD_FILE,
    GW,
    INVALID,
    NODES,
    PARSER_ONLY,
    SCHEMA,
    SCHEMA_ONLY,
    VALID,
    document,
    golden_policies,
    limit,
    spec,
    with_defaults,
)

ROOT = Path(__file__).resolve().parent.parent
MESHNODE_CRD = ROOT / "gateway-api" / "meshnode.yaml"
POLICIES = "/apis/mesh.dev/v1alpha1/namespaces/default/trafficpolicies"
DRY_RUN = "?dryRun=All&fieldValidation=Strict"





def get(cp: ControlPlane, path: str) -> dict[str, Any] | None:
    status, body = cp.request("GET", path)
    return body if status == 200 and isinstance(body, dict) else None


def create(cp: ControlPlane, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, out = cp.request("POST", path, body)
    assert status == 201, (status, out)
    assert isinstance(out, dict)
    return out


def namespace(cp: ControlPlane, name: str) -> str:
    create(cp, "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                      "metadata": {"name": name}})
    return name


# -- it comes up --------------------------------------------------------------------------------

@pytest.mark.e2e
def test_comes_up_in_seconds(control_plane: ControlPlane) -> None:
    cp = control_plane
    assert cp.start_seconds is not None and cp.start_seconds < 60, cp.start_seconds
    print(f"control plane ready in {cp.start_seconds:.1f}s")
    status, body = cp.request("GET", "/readyz")
    assert status == 200, body
    for path in [cp.kubeconfig, *cp.certs.glob("*.key"), *cp.state_dir.glob("*.kubeconfig")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # CA, serving, admin, controller manager, scheduler, kubelet client, service accounts,
    # etcd's serving and the API server's etcd client
    assert len(list(cp.certs.glob("*.key"))) == 9
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        assert (cp.pids / f"{name}.pid").is_file()
        assert (cp.logs / f"{name}.log").is_file()
    kubernetes = get(cp, "/api/v1/namespaces/default/services/kubernetes")
    assert kubernetes and kubernetes["spec"]["clusterIP"] == cp.service_ip == "10.96.0.1"


@pytest.mark.e2e
def test_etcd_answers_only_clients_with_the_labs_certificate(control_plane: ControlPlane
                                                            ) -> None:
    """etcd on loopback is TLS with client certificates: a local user without the lab's
    certificate cannot read or write the cluster's state."""
    cp = control_plane
    url = f"https://127.0.0.1:{cp.etcd_port}/health"
    anonymous = ssl.create_default_context(cafile=str(cp.certs / "ca.crt"))
    with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
        urllib.request.urlopen(url, context=anonymous, timeout=5).read()
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # nothing in the clear
        urllib.request.urlopen(f"http://127.0.0.1:{cp.etcd_port}/health", timeout=5).read()
    client = ssl.create_default_context(cafile=str(cp.certs / "ca.crt"))
    client.load_cert_chain(cp.certs / "etcd-client.crt", cp.certs / "etcd-client.key")
    health = json.loads(urllib.request.urlopen(url, context=client, timeout=5).read())
    assert health["health"] == "true"


@pytest.mark.e2e
def test_kubectl_lists_namespaces(control_plane: ControlPlane) -> None:
    out = control_plane.kubectl("get", "namespaces", "-o", "name").stdout.split()
    assert {"namespace/default", "namespace/kube-system", "namespace/kube-public",
            "namespace/kube-node-lease"} <= set(out)
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.")


@pytest.mark.e2e
def test_rbac_and_service_account_tokens(control_plane: ControlPlane) -> None:
    """RBAC decides (a ServiceAccount has no rights of its own), and the API server issues
    and accepts service-account tokens signed with the lab's key."""
    cp = control_plane
    sa = "system:serviceaccount:default:default"
    assert cp.kubectl("auth", "can-i", "list", "pods", "--as", sa,
                      check=False).stdout.strip() == "no"
    assert cp.kubectl("auth", "can-i", "list", "pods").stdout.strip() == "yes"
    token = cp.kubectl("create", "token", "default", "-n", "default").stdout.strip()
    assert token.count(".") == 2
    review = create(cp, "/apis/authentication.k8s.io/v1/tokenreviews", {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": {"token": token}})
    assert review["status"]["authenticated"] is True
    assert review["status"]["user"]["username"] == sa
    # The controllers act as service accounts of their own (--use-service-account-credentials).
    assert get(cp, "/api/v1/namespaces/kube-system/serviceaccounts/replicaset-controller")


# -- the real controllers and scheduler ---------------------------------------------------------

@pytest.mark.e2e
def test_controllers_make_replicasets_pods_endpointslices(control_plane: ControlPlane) -> None:
    cp = control_plane
    ns = namespace(cp, "cp-controllers")
    labels = {"app": "web"}
    create(cp, f"/apis/apps/v1/namespaces/{ns}/deployments", {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"nodeSelector": {"mesh.dev/test": "nowhere"},  # never scheduled
                     "containers": [{"name": "web", "image": "registry.invalid/web:1"}]}}}})
    service = create(cp, f"/api/v1/namespaces/{ns}/services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}})
    assert ipaddress.ip_address(service["spec"]["clusterIP"]) in \
        ipaddress.ip_network(SERVICE_CIDR)

    def replicasets() -> list[dict[str, Any]] | None:
        found = get(cp, f"/apis/apps/v1/namespaces/{ns}/replicasets")
        return found["items"] if found else None

    rs = eventually("the Deployment's ReplicaSet", replicasets)[0]
    assert rs["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    assert rs["metadata"]["name"].startswith("web-")

    def pods() -> list[dict[str, Any]] | None:
        found = get(cp, f"/api/v1/namespaces/{ns}/pods")
        return found["items"] if found and len(found["items"]) == 2 else None

    made = eventually("the ReplicaSet's two Pods", pods)
    for pod in made:
        assert pod["metadata"]["name"].startswith(rs["metadata"]["name"] + "-")
        assert pod["metadata"]["ownerReferences"][0]["name"] == rs["metadata"]["name"]
        assert pod["status"]["phase"] == "Pending"  # no kubelet runs it

    def unschedulable() -> bool:
        """The scheduler looked at every pod and found no node for it."""
        found = pods() or []
        return len(found) == 2 and all(
            any(c["type"] == "PodScheduled" and c["status"] == "False" and
                c.get("reason") == "Unschedulable" for c in p["status"].get("conditions", []))
            for p in found)

    eventually("the scheduler's verdict", unschedulable)

    def slices() -> list[dict[str, Any]] | None:
        found = get(cp, f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
                        "?labelSelector=kubernetes.io/service-name%3Dweb")
        return found["items"] if found else None

    eps = eventually("the Service's EndpointSlice", slices)
    assert eps[0]["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == \
        "endpointslice-controller.k8s.io"
    assert not eps[0].get("endpoints")  # no pod is ready
    cp.kubectl("delete", "namespace", ns, "--wait=false")


@pytest.mark.e2e
def test_node_ipam_gives_nodes_pod_cidrs(control_plane: ControlPlane) -> None:
    """--allocate-node-cidrs: a Node gets a /24 of the lab's pod range, another Node another."""
    cp = control_plane
    cidrs: list[ipaddress.IPv4Network] = []
    lab = ipaddress.IPv4Network("10.244.0.0/16")
    for name in ("cp-test-node-a", "cp-test-node-b"):
        create(cp, "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                     "metadata": {"name": name}})

        def pod_cidr(name: str = name) -> str | None:
            node = get(cp, f"/api/v1/nodes/{name}")
            return node["spec"].get("podCIDR") if node else None

        cidrs.append(ipaddress.IPv4Network(eventually(f"{name}'s podCIDR", pod_cidr)))
    for net in cidrs:
        assert net.prefixlen == 24 and net.subnet_of(lab)
    assert cidrs[0] != cidrs[1]
    for name in ("cp-test-node-a", "cp-test-node-b"):
        cp.kubectl("delete", "node", name)


# -- the project's CRDs, judged by the API server -----------------------------------------------

@pytest.fixture(scope="module")
def mesh_crds(control_plane: ControlPlane) -> ControlPlane:
    cp = control_plane
    cp.kubectl("apply", "--server-side", "-f", str(CRD_FILE), "-f", str(MESHNODE_CRD))
    cp.kubectl("wait", "--for", "condition=Established", "--timeout", "60s",
               "crd/trafficpolicies.mesh.dev", "crd/meshnodes.mesh.dev")

    def served() -> bool:  # discovery follows Established by a moment
        status, _ = cp.request("GET", POLICIES)
        return status == 200

    eventually("the TrafficPolicy resource", served)
    return cp


def judge(cp: ControlPlane, spec_: dict[str, Any], name: str = "example") -> tuple[int, str]:
    """The API server's verdict on a TrafficPolicy (a dry-run create, strict about fields):
    the status code and the message."""
    status, body = cp.request("POST", POLICIES + DRY_RUN, document(spec_, name))
    message = body.get("message", "") if isinstance(body, dict) else str(body)
    return status, message


# For each CEL rule (x-kubernetes-validations) in the CRD, by the schema path it sits on and its
# place there: policies the server takes and policies it refuses with that rule's message.
# The refused ones are valid but for that rule (CEL runs only on a value the schema takes).
CEL_EXAMPLES: dict[tuple[str, int], tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    (".spec", 0): ([VALID["retry-only"], VALID["round-robin"]], [INVALID["sets-nothing"][0]]),
    (".spec", 1): ([VALID["l7-visibility"], VALID["l7-visibility-none"]],
                   [INVALID["l7-visibility-on-a-route"][0],
                    INVALID["l7-visibility-with-a-route"][0]]),
    (".spec.targetRefs", 0): (
        [VALID["every-target-kind"]],
        [SCHEMA_ONLY["duplicate-targets"][0],
         {"targetRefs": [{"group": "", "kind": "Service", "name": "cart"},
                         {"kind": "Service", "name": "cart"}], "retry": {"numRetries": 1}}]),
    (".spec.targetRefs[]", 0): (
        [VALID["every-target-kind"]],
        [INVALID["target-group-for-kind"][0], INVALID["target-xlistenerset-group"][0],
         {"targetRefs": [{"group": "gateway.networking.x-k8s.io", "kind": "HTTPRoute",
                          "name": "x"}], "retry": {"numRetries": 1}}]),
    (".spec.rateLimit", 0): (
        [VALID["local-limits"], VALID["global-limits"]],
        [INVALID["rate-limit-without-rules"][0],
         spec(rateLimit={"local": {"rules": []}, "global": {"rules": []}})]),
    (".spec.rateLimit.local.rules[].clientSelectors[].headers[]", 0): (
        [VALID["local-limits"]],
        [SCHEMA_ONLY["distinct-header-with-value"][0], INVALID["header-without-value"][0]]),
    (".spec.rateLimit.global", 0): (
        [VALID["global-limits"]],
        [INVALID["global-narrow-cidr"][0], INVALID["global-address"][0]]),
    (".spec.rateLimit.global.rules[].clientSelectors[].headers[]", 0): (
        [VALID["global-limits"]],
        [spec(rateLimit={"global": {"rules": [limit(clientSelectors=[
            {"headers": [{"name": "x-user", "type": "Distinct", "value": "a"}]}])]}}),
         spec(rateLimit={"global": {"rules": [limit(clientSelectors=[
             {"headers": [{"name": "x-user"}]}])]}})]),
    (".spec.healthCheck", 0): (
        [VALID["passive-gateway-errors"], VALID["active-grpc"]],
        [INVALID["health-check-empty"][0]]),
    (".spec.loadBalancer", 0): (
        [VALID["round-robin"], VALID["hash-source-ip"]],
        [INVALID["hash-on-round-robin"][0], INVALID["hash-missing"][0]]),
    (".spec.loadBalancer.consistentHash", 0): (
        [VALID["hash-header"]], [INVALID["hash-header-missing"][0]]),
    (".spec.loadBalancer.consistentHash", 1): (
        [VALID["hash-cookie"]], [INVALID["hash-cookie-missing"][0]]),
}


def cel_rules() -> dict[tuple[str, int], dict[str, Any]]:
    return {(path, i): v for path, node in NODES.items()
            for i, v in enumerate(node.get("x-kubernetes-validations", []))}


def test_every_cel_rule_has_examples() -> None:
    assert set(CEL_EXAMPLES) == set(cel_rules())
    for accepted, refused in CEL_EXAMPLES.values():
        assert accepted and refused


@pytest.mark.e2e
@pytest.mark.parametrize("key", sorted(CEL_EXAMPLES), ids=lambda k: f"{k[0]}#{k[1]}")
def test_cel_rule_judged_by_the_api_server(mesh_crds: ControlPlane,
                                          key: tuple[str, int]) -> None:
    message = cel_rules()[key]["message"]
    accepted, refused = CEL_EXAMPLES[key]
    for body in accepted:
        assert judge(mesh_crds, body) == (201, ""), body
    for body in refused:
        status, said = judge(mesh_crds, body)
        assert status == 422, (status, said, body)
        assert message in said, said


@pytest.mark.e2e
def test_valid_examples_accepted_by_the_api_server(mesh_crds: ControlPlane) -> None:
    refused = {name: judge(mesh_crds, body, name) for name, body in VALID.items()}
    assert {n: v for n, v in refused.items() if v[0] != 201} == {}


@pytest.mark.e2e
def test_invalid_examples_refused_by_the_api_server(mesh_crds: ControlPlane) -> None:
    """What tests/test_crds.py says the schema refuses, the API server refuses; what only the
    parser refuses, it takes."""
    taken = {name: judge(mesh_crds, body, name)
             for name, (body, _) in {**INVALID, **SCHEMA_ONLY}.items()}
    assert {n: v for n, v in taken.items() if v[0] < 400} == {}
    for name, (body, _) in PARSER_ONLY.items():
        assert judge(mesh_crds, body, name)[0] == 201, name


@pytest.mark.e2e
def test_golden_policies_judged_by_the_api_server(mesh_crds: ControlPlane) -> None:
    for doc in golden_policies():
        status, said = judge(mesh_crds, doc["spec"], doc["metadata"]["name"])
        if doc["metadata"]["name"] == "broken":
            assert status == 422, said
        else:
            assert status == 201, (doc["metadata"]["name"], said)


@pytest.mark.e2e
def test_policies_stored_with_the_defaults_test_crds_assumes(mesh_crds: ControlPlane) -> None:
    """A real create stores the schema's defaults, the very ones tests/test_crds.py fills in
    (with_defaults) before it judges a policy."""
    cp = mesh_crds
    for name, body in VALID.items():
        doc = document(body, f"cp-{name}")
        stored = create(cp, POLICIES, doc)
        assert stored["spec"] == with_defaults(doc, SCHEMA)["spec"], name
        assert stored["metadata"]["generation"] == 1
        cp.request("DELETE", f"{POLICIES}/cp-{name}")


@pytest.mark.e2e
def test_policy_status_judged_by_the_status_schema(mesh_crds: ControlPlane) -> None:
    cp = mesh_crds
    stored = create(cp, POLICIES, document(VALID["hash-header"], "cp-status"))
    status_path = f"{POLICIES}/cp-status/status"
    ancestor = {"ancestorRef": {"group": GW, "kind": "Gateway", "name": "gw"},
                "controllerName": "mesh.dev/gateway-controller", "conditions": [{
                    "type": "Accepted", "status": "True", "reason": "Accepted",
                    "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z",
                    "observedGeneration": 1}]}
    code, body = cp.request("PUT", status_path, {**stored, "status": {"ancestors": [ancestor]}})
    assert code == 200, body
    code, _ = cp.request("PUT", status_path, {**body, "status": {"ancestors": [ancestor] * 17}})
    assert code == 422
    cp.request("DELETE", f"{POLICIES}/cp-status")


@pytest.mark.e2e
def test_meshnode_judged_by_the_api_server(mesh_crds: ControlPlane) -> None:
    cp = mesh_crds
    created = create(cp, "/apis/mesh.dev/v1alpha1/meshnodes", {
        "apiVersion": "mesh.dev/v1alpha1", "kind": "MeshNode",
        "metadata": {"name": "cp-test-node"}, "spec": {}})
    path = "/apis/mesh.dev/v1alpha1/meshnodes/cp-test-node/status"
    good = {**created, "status": {"agent": "mesh-agent-x", "programmedCount": 1,
                                  "pendingCount": 0,
                                  "heartbeatTime": "2026-01-01T00:00:00Z",
                                  "programmed": {"gateway.networking.k8s.io/Gateway/a/b": 2}}}
    code, body = cp.request("PUT", path, good)
    assert code == 200, body
    code, body = cp.request("PUT", path, {**body, "status": {"programmedCount": -1}})
    assert code == 422, body
    cp.request("DELETE", "/apis/mesh.dev/v1alpha1/meshnodes/cp-test-node")


# -- the Gateway API's CRDs ---------------------------------------------------------------------

GATEWAY_OBJECTS = f"""
apiVersion: {GW}/v1
kind: GatewayClass
metadata: {{name: cp-test}}
spec: {{controllerName: mesh.dev/gateway-controller}}
---
apiVersion: {GW}/v1
kind: Gateway
metadata: {{name: edge, namespace: cp-gateway}}
spec:
  gatewayClassName: cp-test
  listeners:
  - {{name: http, protocol: HTTP, port: 80}}
---
apiVersion: {GW}/v1
kind: HTTPRoute
metadata: {{name: shop, namespace: cp-gateway}}
spec:
  parentRefs: [{{name: edge}}]
  hostnames: [shop.example.com]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /cart}}}}]
    backendRefs: [{{name: cart, port: 8080}}]
"""


@pytest.mark.e2e
def test_gateway_api_crds_and_objects(control_plane: ControlPlane) -> None:
    cp = control_plane
    files = gateway_api_crds()
    assert {"gateway.networking.k8s.io_gateways.yaml",
            "gateway.networking.k8s.io_httproutes.yaml",
            "gateway.networking.k8s.io_listenersets.yaml"} <= {f.name for f in files}
    args = [a for f in files for a in ("-f", str(f))]
    cp.kubectl("apply", "--server-side", *args, timeout=120)
    cp.kubectl("wait", "--for", "condition=Established", "--timeout", "60s",
               f"crd/gateways.{GW}", f"crd/httproutes.{GW}", f"crd/gatewayclasses.{GW}")
    namespace(cp, "cp-gateway")
    cp.kubectl("apply", "-f", "-", input=GATEWAY_OBJECTS)
    out = cp.kubectl("get", "gatewayclasses,gateways,httproutes", "-A", "-o", "name").stdout
    assert {f"gatewayclass.{GW}/cp-test", f"gateway.{GW}/edge",
            f"httproute.{GW}/shop"} <= set(out.split())
    # The Gateway API's own CEL: listener names are unique within a Gateway.
    twice = yaml.safe_load_all(GATEWAY_OBJECTS)
    gateway = next(d for d in twice if d["kind"] == "Gateway")
    gateway["metadata"]["name"] = "twice"
    gateway["spec"]["listeners"] *= 2
    status, body = cp.request(
        "POST", f"/apis/{GW}/v1/namespaces/cp-gateway/gateways{DRY_RUN}", gateway)
    assert status == 422 and "unique" in body["message"], body
    cp.kubectl("delete", "namespace", "cp-gateway", "--wait=false")
    cp.kubectl("delete", f"gatewayclass.{GW}/cp-test")


# -- start failures and cleanup, with stand-ins -------------------------------------------------

def stand_ins(directory: Path, etcd: str) -> Binaries:
    """Binaries whose etcd runs `etcd` (a shell script) and the others sleep."""
    directory.mkdir()
    scripts = {"etcd": etcd, "kube-apiserver": "exec sleep 60",
               "kube-controller-manager": "exec sleep 60", "kube-scheduler": "exec sleep 60",
               "kubectl": "exit 0"}
    for name, body in scripts.items():
        path = directory / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return Binaries.at(directory)


def test_a_component_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    binaries = stand_ins(tmp_path / "bin", "echo 'etcd: cannot open data dir' >&2; exit 3")
    cp = ControlPlane(tmp_path / "state", binaries)
    with pytest.raises(ControlPlaneError) as failed:
        cp.start(timeout=20)
    assert "etcd exited with 3" in str(failed.value)
    assert "cannot open data dir" in str(failed.value)
    assert not (tmp_path / "state").exists()  # stopped: processes ended, files removed


def test_missing_binaries_say_how_to_build_them(tmp_path: Path) -> None:
    with pytest.raises(ControlPlaneError, match="make kube-bin"):
        ControlPlane(tmp_path / "state", Binaries.at(tmp_path)).start()


@pytest.fixture
def sleeper() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def test_cleanup_after_a_crash_ends_only_its_own_processes(
        tmp_path: Path, sleeper: list[subprocess.Popen[bytes]]) -> None:
    """`cleanup` from the pid files alone: the processes started with the state directory
    on their command line end; a pid file naming another process (a pid reused since) does
    not end it."""
    state = tmp_path / "state"
    (state / "pids").mkdir(parents=True)
    ours = subprocess.Popen(["sh", "-c", "sleep 60", str(state)])
    other = subprocess.Popen(["sleep", "60"])
    sleeper += [ours, other]
    (state / "pids" / "etcd.pid").write_text(f"{ours.pid}\n")
    (state / "pids" / "kube-apiserver.pid").write_text(f"{other.pid}\n")
    (state / "pids" / "kube-scheduler.pid").write_text("not a pid\n")
    ControlPlane.cleanup(state, grace=2)
    assert ours.wait(timeout=5) is not None
    assert other.poll() is None
    assert not state.exists()


def test_keys_are_never_readable_by_others(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "state", Binaries.at(tmp_path))
    for d in (cp.state_dir, cp.certs):
        d.mkdir(exist_ok=True)
    cp.port = 6443
    old = os.umask(0)
    try:
        cp._make_certificates()
    finally:
        os.umask(old)
    for path in [*cp.certs.glob("*.key"), cp.kubeconfig]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    config = yaml.safe_load(cp.kubeconfig.read_text())
    assert config["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"
