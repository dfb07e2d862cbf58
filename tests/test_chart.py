"""The Helm chart (charts/mesh), `mesh install` and `mesh cni-install`.

No helm binary and no API server run here: the chart is linted and rendered by the Helm
library itself (helm-python-sdk, ctypes over Helm's Go SDK), every rendered manifest is
checked against the Kubernetes 1.33 OpenAPI schemas (kubernetes-validate, strict: unknown
fields refused), and the RBAC is compared with what the code says it uses. The CNI install
runs into temporary directories; its Node lookup runs against tests/kubeapi.py.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from click.testing import CliRunner

from mesh.cli import main
from mesh.cni import install as cni
from mesh.cni.runtime import NetworkList
from mesh.hubble.tls import CLIENT_NAME, SERVER_NAME
from mesh.install import CHART_DIR, InstallError, Manifest, render
from mesh.kube.rbac import cluster_rules, namespace_rules, relay_rules
from mesh.lab.controlplane import ControlPlane, gateway_api_crds
from mesh.translate.config import DEFAULT_CONTROLLER, DEFAULT_INGRESS_CONTROLLER
from tests.kubeapi import BackgroundAPI
from tests.test_crds import refusals

ROOT = Path(__file__).resolve().parent.parent
KUBE_VERSION = "1.33"
STATE = "/var/run/mesh"

# Each value set is rendered once; the tests below check what each must give.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "pool-datapath-redis-cni": {
        "gatewayAddresses": {"source": "pool", "pool": "10.96.200.0/24"},
        "datapath": {"enabled": True, "underlay": "ens5", "redirect": "tproxy"},
        "rateLimit": {"redis": "redis://redis.mesh-system:6379/0"},
        "cni": {"install": True},
        "logLevel": "debug",
        "podAnnotations": {"example.com/team": "net"},
        "trafficPolicies": [
            {"name": "gateway-limit", "namespace": "infra", "spec": {
                "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                "name": "public"}],
                "rateLimit": {"local": {"rules": [{"limit": {"requests": 100,
                                                             "unit": "Second"}}]}}}},
            {"name": "retries", "spec": {
                "targetRefs": [{"group": "", "kind": "Service", "name": "api"}],
                "retry": {"numRetries": 3}}}],
    },
    # A gateway only: the datapath turned off (no eBPF, no bpffs or cgroup mounts).
    "gateway-only": {"datapath": {"enabled": False}, "metrics": {"enabled": False}},
    "encryption": {"datapath": {"enabled": True},
                   "metrics": {"nodeAddress": True, "port": 9100},
                   "encryption": {"mode": "wireguard", "strict": False,
                                  "strictCIDRs": ["fd00:10:244::/48"]}},
    "hubble-relay": {"hubble": {"relay": {"enabled": True, "agentPort": 14244},
                                "tls": {"validityDays": 30}}},
    "ipsec": {"datapath": {"enabled": True},
              "encryption": {"mode": "ipsec", "ipsecSecret": {"name": "cluster-ipsec",
                                                              "key": "keys.txt"}}},
    "legacy-secret-podcidr": {
        "gatewayAddresses": {"source": "loadbalancer"},
        "datapath": {"enabled": True},
        "securityContext": {"legacySysAdmin": True},
        "rateLimit": {"redisFromSecret": {"name": "redis-url", "key": "url"}},
        "cni": {"install": True, "podCIDR": "10.244.0.0/24", "mtu": 1450},
        "gatewayClass": {"create": False, "controllerName": "example.com/mesh"},
        "ingressClass": {"default": True, "useForwardedHeaders": True},
        "image": {"repository": "registry.example.com/mesh", "tag": "sha256:" + "a" * 64},
    },
}


@functools.cache
def _rendered(name: str) -> tuple[Manifest, ...]:
    return tuple(render(VALUE_SETS[name], create_namespace=True))


def _merged(name: str) -> dict[str, Any]:
    with helm.Chart.load(CHART_DIR) as chart:
        return chart.merge_values(VALUE_SETS[name])


def _objects(name: str, kind: str) -> list[dict[str, Any]]:
    return [m.object for m in _rendered(name) if m.kind == kind]


def _one(name: str, kind: str) -> dict[str, Any]:
    found = _objects(name, kind)
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def _containers(name: str) -> dict[str, dict[str, Any]]:
    spec = _one(name, "DaemonSet")["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def _triples(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


# -- the chart as Helm sees it ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["default", "pool-datapath-redis-cni"])
def test_helm_lint_is_clean(name: str) -> None:
    report = helm.lint(CHART_DIR, VALUE_SETS[name], strict=True, namespace="mesh-system",
                       kube_version=f"v{KUBE_VERSION}.0")
    assert report["errors"] == []
    # Only information is left (Chart.yaml has no icon: the project has none).
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_crds_are_the_projects_own() -> None:
    """charts/mesh/crds/ links to gateway-api/ (one copy of each CRD), and the Helm loader
    follows the links."""
    with helm.Chart.load(CHART_DIR) as chart:
        crds = {Path(c["name"]).name: c["data"] for c in chart.crds}
    assert set(crds) == {"meshidentity.yaml", "meshnetworkpolicy.yaml", "meshnode.yaml",
                         "trafficpolicy.yaml"}
    for file, data in crds.items():
        link = CHART_DIR / "crds" / file
        assert link.is_symlink()
        assert link.resolve() == ROOT / "gateway-api" / file
        assert data == (ROOT / "gateway-api" / file).read_text()


def test_the_defaults_deploy_the_datapath() -> None:
    """The product, not a gateway-only subset: eBPF on, with its mounts."""
    assert _merged("default")["datapath"]["enabled"] is True
    agent = _containers("default")["agent"]
    assert "--datapath-cgroup" in agent["args"]
    assert {m["name"] for m in agent["volumeMounts"]} >= {"bpffs", "cgroup"}
    assert "--datapath-cgroup" not in _containers("gateway-only")["agent"]["args"]


def test_defaults_agree_with_the_code() -> None:
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert defaults["gatewayClass"]["controllerName"] == DEFAULT_CONTROLLER
    assert _one("default", "IngressClass")["spec"]["controller"] == DEFAULT_INGRESS_CONTROLLER
    gc = _one("default", "GatewayClass")
    assert gc["spec"]["controllerName"] == DEFAULT_CONTROLLER
    assert gc["metadata"]["name"] == "mesh"


# -- every manifest against the Kubernetes schemas ---------------------------------------------

# Gateway API's pattern for spec.controllerName (its CRDs are a prerequisite, not stored here).
CONTROLLER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
                             r"/[A-Za-z0-9/\-._~%!$&'()*+,;=:]+$")


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_manifests_validate(name: str) -> None:
    kinds = []
    for m in _rendered(name):
        obj = m.object
        kinds.append(m.kind)
        if m.kind == "GatewayClass":
            assert obj["apiVersion"] == "gateway.networking.k8s.io/v1"
            assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
            assert set(obj["spec"]) <= {"controllerName", "description", "parametersRef"}
            assert CONTROLLER_NAME.match(obj["spec"]["controllerName"])
            continue
        if m.kind == "TrafficPolicy":  # ours: against its CRD, as the API server would
            errors, _ = refusals(obj)
            assert not errors, errors
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{m.source} ({m.kind}): {path}: {e.message}")
    want = ["CustomResourceDefinition"] * 4 + ["Namespace",
            "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
            "DaemonSet", "IngressClass"]
    if VALUE_SETS[name].get("gatewayClass", {}).get("create", True):
        want.append("GatewayClass")
    if VALUE_SETS[name].get("hubble", {}).get("relay", {}).get("enabled"):
        want[5:5] = ["Secret", "Secret", "ServiceAccount"]
        want[-2:-2] = ["ClusterRole", "ClusterRoleBinding"]
        want.insert(want.index("DaemonSet") + 1, "Deployment")
    want += ["TrafficPolicy"] * len(VALUE_SETS[name].get("trafficPolicies", []))
    assert sorted(kinds) == sorted(want)


# -- the DaemonSet ---------------------------------------------------------------------------

def _expected_args(v: dict[str, Any]) -> list[str]:
    args = ["--log-level", v["logLevel"], "--log-format", "json", "run", "--kubernetes",
            "--node-id", "$(NODE_NAME)", "--state-dir", STATE, "--envoy", "external",
            "--leader-elect", "--leader-namespace", "$(POD_NAMESPACE)",
            "--leader-identity", "$(POD_NAME)",
            "--controller-name", v["gatewayClass"]["controllerName"],
            "--gateway-addresses", v["gatewayAddresses"]["source"]]
    if v["ingressClass"]["useForwardedHeaders"]:
        args.append("--use-forwarded-headers")
    if v["gatewayAddresses"]["source"] == "pool":
        args += ["--address-pool", v["gatewayAddresses"]["pool"]]
    if v["rateLimit"]["redis"]:
        args += ["--ratelimit-redis", v["rateLimit"]["redis"]]
    elif v["rateLimit"]["redisFromSecret"]["name"]:
        args += ["--ratelimit-redis", "$(MESH_RATELIMIT_REDIS)"]
    if v["datapath"]["enabled"]:
        args += ["--datapath-cgroup", "/sys/fs/cgroup",
                 "--datapath-underlay", v["datapath"]["underlay"],
                 "--datapath-redirect", v["datapath"]["redirect"]]
    metrics = v["metrics"]
    args += ["--metrics-address", "none" if not metrics["enabled"] else
             f"$(HOST_IP):{metrics['port']}" if metrics["nodeAddress"] else
             f"127.0.0.1:{metrics['port']}"]
    if v["hubble"]["relay"]["enabled"]:
        args += ["--hubble-listen-address", f"$(HOST_IP):{v['hubble']['relay']['agentPort']}",
                 "--hubble-tls-dir", "/etc/mesh/hubble-tls"]
    if v["encryption"]["mode"] != "none":
        args += ["--encryption", v["encryption"]["mode"],
                 "--encryption-strict" if v["encryption"]["strict"] else "--no-encryption-strict"]
        for cidr in v["encryption"]["strictCIDRs"]:
            args += ["--encryption-strict-cidr", cidr]
        if v["encryption"]["mode"] == "ipsec":
            args += ["--ipsec-keys", "/etc/mesh/ipsec/keys"]
    return args


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_daemonset(name: str) -> None:
    v = _merged(name)
    ds = _one(name, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxUnavailable": 1}}
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert [c["name"] for c in pod["containers"]] == ["agent", "envoy"]
    assert [c["name"] for c in pod.get("initContainers", [])] == (
        ["cni-install"] if v["cni"]["install"] else [])
    containers = _containers(name)
    image = "registry.example.com/mesh@sha256:" + "a" * 64 if name.startswith("legacy") \
        else "mesh:0.1.0"
    assert {c["image"] for c in containers.values()} == {image}
    for c in containers.values():
        sc = c["securityContext"]
        assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["runAsUser"] == 0
    assert ds["spec"]["template"]["metadata"].get("annotations", {}) == v["podAnnotations"]

    agent, envoy = containers["agent"], containers["envoy"]
    assert agent["command"] == ["mesh"] and agent["args"] == _expected_args(v)
    assert envoy["command"] == ["mesh"]
    assert envoy["args"] == ["envoy", "--node-id", "$(NODE_NAME)", "--state-dir", STATE]
    env = {e["name"]: e["valueFrom"] for e in agent["env"]}
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    if v["metrics"]["nodeAddress"] or v["hubble"]["relay"]["enabled"]:
        assert env["HOST_IP"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    else:
        assert "HOST_IP" not in env
    if v["rateLimit"]["redisFromSecret"]["name"]:
        assert env["MESH_RATELIMIT_REDIS"] == {"secretKeyRef": {"name": "redis-url",
                                                                "key": "url"}}
    assert agent["resources"] == v["resources"]["agent"]
    assert envoy["resources"] == v["resources"]["envoy"]

    # Probes: exec, through the agent's unix socket (nothing listens on a port).
    health = ["mesh", "health", "--state-dir", STATE]
    assert agent["livenessProbe"]["exec"]["command"] == health
    assert agent["startupProbe"]["exec"]["command"] == health
    assert agent["readinessProbe"]["exec"]["command"] == [*health, "--ready"]
    envoy_health = ["mesh", "health", "--envoy", "--state-dir", STATE]
    assert envoy["livenessProbe"]["exec"]["command"] == envoy_health
    assert envoy["startupProbe"]["exec"]["command"] == envoy_health
    assert envoy["readinessProbe"]["exec"]["command"] == [*envoy_health, "--ready"]
    assert "ports" not in agent and "ports" not in envoy

    # Capabilities, exactly.
    agent_caps = []
    if v["datapath"]["enabled"]:
        agent_caps = ["NET_ADMIN", "NET_RAW", "SYS_ADMIN"] \
            if v["securityContext"]["legacySysAdmin"] else ["NET_ADMIN", "NET_RAW", "BPF",
                                                            "PERFMON"]
    assert agent["securityContext"]["capabilities"].get("add", []) == agent_caps
    assert envoy["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_BIND_SERVICE"]
    assert envoy["securityContext"]["readOnlyRootFilesystem"] is True

    # The state directory: one hostPath, mounted by both.
    volumes = {vol["name"]: vol for vol in pod["volumes"]}
    assert volumes["state"]["hostPath"] == {"path": STATE, "type": "DirectoryOrCreate"}
    for c in (agent, envoy):
        assert {"name": "state", "mountPath": STATE} in c["volumeMounts"]
    agent_mounts = {m["name"]: m for m in agent["volumeMounts"]}
    if v["datapath"]["enabled"]:
        assert agent_mounts["bpffs"]["mountPath"] == f"{STATE}/bpffs"
        assert "mountPropagation" not in agent_mounts["bpffs"]  # Bidirectional: privileged
        assert volumes["bpffs"]["hostPath"]["path"] == "/sys/fs/bpf/mesh"
        assert agent_mounts["cgroup"] == {"name": "cgroup", "mountPath": "/sys/fs/cgroup",
                                          "readOnly": True}
        assert volumes["cgroup"]["hostPath"]["path"] == "/sys/fs/cgroup"
    else:
        assert set(agent_mounts) == {"state"}
        assert {"bpffs", "cgroup"}.isdisjoint(volumes)
    if v["hubble"]["relay"]["enabled"]:
        assert agent_mounts["hubble-tls"] == {"name": "hubble-tls", "readOnly": True,
                                              "mountPath": "/etc/mesh/hubble-tls"}
        assert volumes["hubble-tls"]["secret"] == {
            "secretName": "mesh-agent-hubble-server-certs", "defaultMode": 0o400}
        assert "hubble-tls" not in {m["name"] for m in envoy["volumeMounts"]}
    else:
        assert "hubble-tls" not in volumes
    if v["encryption"]["mode"] == "ipsec":
        # the operator's Secret, read-only, owner-readable only, in the agent alone
        assert agent_mounts["ipsec-keys"] == {"name": "ipsec-keys",
                                              "mountPath": "/etc/mesh/ipsec", "readOnly": True}
        assert volumes["ipsec-keys"]["secret"] == {
            "secretName": v["encryption"]["ipsecSecret"]["name"], "defaultMode": 0o400,
            "items": [{"key": v["encryption"]["ipsecSecret"]["key"], "path": "keys"}]}
        assert "ipsec-keys" not in {m["name"] for m in envoy["volumeMounts"]}
    else:
        assert "ipsec-keys" not in volumes
    assert "/lib/modules" not in json.dumps(pod)

    if v["cni"]["install"]:
        init = containers["cni-install"]
        want = ["cni-install", "--bin-dir", "/host/opt/cni/bin",
                "--conf-dir", "/host/etc/cni/net.d", "--mtu", str(v["cni"]["mtu"])]
        want += (["--pod-cidr", v["cni"]["podCIDR"]] if v["cni"]["podCIDR"]
                 else ["--pod-cidr-from-node", "$(NODE_NAME)"])
        assert init["args"] == want
        assert "add" not in init["securityContext"]["capabilities"]
        assert {m["mountPath"] for m in init["volumeMounts"]} == {"/host/opt/cni/bin",
                                                                 "/host/etc/cni/net.d"}
        assert volumes["cni-bin"]["hostPath"]["path"] == "/opt/cni/bin"
        assert volumes["cni-conf"]["hostPath"]["path"] == "/etc/cni/net.d"


# -- the Hubble relay --------------------------------------------------------------------------

def test_the_hubble_relay_and_its_certificates() -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    name = "hubble-relay"
    assert not [m for m in _rendered("default") if "hubble" in m.object["metadata"]["name"]]
    secrets = {s["metadata"]["name"]: s for s in _objects(name, "Secret")}
    assert set(secrets) == {"mesh-agent-hubble-server-certs",
                            "mesh-agent-hubble-relay-client-certs"}

    def files(secret: str) -> dict[str, bytes]:
        assert secrets[secret]["type"] == "kubernetes.io/tls"
        return {k: base64.b64decode(v) for k, v in secrets[secret]["data"].items()}

    server, client = files("mesh-agent-hubble-server-certs"), files(
        "mesh-agent-hubble-relay-client-certs")
    assert set(server) == set(client) == {"ca.crt", "tls.crt", "tls.key"}  # no CA key
    assert server["ca.crt"] == client["ca.crt"]
    ca = x509.load_pem_x509_certificate(server["ca.crt"])
    for data, dns in ((server, SERVER_NAME), (client, CLIENT_NAME)):
        cert = x509.load_pem_x509_certificate(data["tls.crt"])
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == [dns]
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.SERVER_AUTH in usage and \
            ExtendedKeyUsageOID.CLIENT_AUTH in usage
        days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
        assert days == 30  # hubble.tls.validityDays

    relay = _one(name, "Deployment")
    pod = relay["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"] == ["--log-level", "info", "--log-format", "json", "relay",
                         "--peers-from-kubernetes", "--peer-port", "14244",
                         "--tls-dir", "/etc/mesh/hubble-tls", "--listen", "127.0.0.1:4245"]
    assert "ports" not in c and "hostNetwork" not in pod  # the loopback of its own pod
    health = ["mesh", "health", "--hubble", "127.0.0.1:4245"]
    assert c["livenessProbe"]["exec"]["command"] == c["readinessProbe"]["exec"]["command"] \
        == health
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"] == {"allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert pod["volumes"] == [{"name": "tls", "secret": {
        "secretName": "mesh-agent-hubble-relay-client-certs", "defaultMode": 0o440}}]
    # RBAC: Nodes listed and watched, nothing else, for the relay's own ServiceAccount
    roles = {r["metadata"]["name"]: r for r in _objects(name, "ClusterRole")}
    assert _triples(roles["mesh-hubble-relay"]["rules"]) == _triples(relay_rules())
    bindings = {b["metadata"]["name"]: b for b in _objects(name, "ClusterRoleBinding")}
    assert bindings["mesh-hubble-relay"]["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"],
         "namespace": "mesh-system"}]
    assert pod["serviceAccountName"] == "mesh-hubble-relay"


# -- RBAC --------------------------------------------------------------------------------------

def test_traffic_policies_from_the_values() -> None:
    assert _objects("default", "TrafficPolicy") == []
    got = {p["metadata"]["name"]: p for p in _objects("pool-datapath-redis-cni", "TrafficPolicy")}
    assert got["gateway-limit"]["metadata"]["namespace"] == "infra"
    assert got["retries"]["metadata"]["namespace"] == "mesh-system"  # the release's
    wanted = {p["name"]: p["spec"] for p in VALUE_SETS["pool-datapath-redis-cni"][
        "trafficPolicies"]}
    assert {n: p["spec"] for n, p in got.items()} == wanted


@pytest.mark.parametrize("name", ["default", "legacy-secret-podcidr"])
def test_rbac_is_what_the_code_uses(name: str) -> None:
    cluster_role = _one(name, "ClusterRole")
    role = _one(name, "Role")
    encryption = VALUE_SETS[name].get("encryption", {}).get("mode", "none") != "none"
    assert _triples(cluster_role["rules"]) == _triples(cluster_rules(encryption))
    assert _triples(role["rules"]) == _triples(namespace_rules())
    assert role["metadata"]["namespace"] == "mesh-system"

    sa = _one(name, "ServiceAccount")["metadata"]
    subject = {"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}
    for binding, bound in ((_one(name, "ClusterRoleBinding"), cluster_role),
                           (_one(name, "RoleBinding"), role)):
        assert binding["subjects"] == [subject]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                      "kind": bound["kind"], "name": bound["metadata"]["name"]}
    pod = _one(name, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["name"]


# -- mesh install --------------------------------------------------------------------------------

def _invoke(*args: str) -> Any:
    return CliRunner().invoke(main, ["install", *args])


@pytest.mark.parametrize(("args", "says"), [
    (["--set", "encryption.mode=gre"], "/encryption/mode: value must be one of"),
    (["--set", "encryption.ipsecSecret.name=Bad_Name"], "/encryption/ipsecSecret/name"),
    (["--set", "gatewayAddresses.source=foo"], "/gatewayAddresses/source: value must be one of"),
    (["--set", "colour=blue"], "additional properties 'colour' not allowed"),
    (["--set", "datapath.unknown=1"], "/datapath: additional properties 'unknown' not allowed"),
    (["--set", "gatewayAddresses.source=pool"], "/gatewayAddresses/pool"),
    (["--set", "rateLimit.redis=http://x"], "/rateLimit/redis"),
    (["--set", "datapath.redirect=ebpf"], "/datapath/redirect"),
])
def test_schema_refuses_bad_values(args: list[str], says: str) -> None:
    result = _invoke("--dry-run", *args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: invalid values: "), result.output
    assert says in lines[0]


def test_install_dry_run_is_a_yaml_stream_crds_first(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("logLevel: warning\ndatapath:\n  enabled: true\n")
    result = _invoke("--dry-run", "-n", "net", "--release-name", "edge", "-f", str(values),
                     "--set", "logLevel=error", "--set-string", "nodeSelector.pool=1")
    assert result.exit_code == 0, result.output
    docs = [d for d in yaml.safe_load_all(result.output) if d is not None]
    kinds = [d["kind"] for d in docs]
    assert kinds[:5] == ["CustomResourceDefinition"] * 4 + ["Namespace"]
    assert "CustomResourceDefinition" not in kinds[4:]
    assert {d["metadata"]["name"] for d in docs[:4]} == {
        "meshidentities.mesh.dev", "meshnetworkpolicies.mesh.dev", "meshnodes.mesh.dev",
        "trafficpolicies.mesh.dev"}
    assert docs[4]["metadata"] == {"name": "net", "labels": {
        "pod-security.kubernetes.io/enforce": "privileged"}}
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    assert ds["metadata"] == {**ds["metadata"], "name": "edge-agent", "namespace": "net"}
    agent = ds["spec"]["template"]["spec"]["containers"][0]
    assert agent["args"][:2] == ["--log-level", "error"]  # --set wins over -f
    assert "--datapath-cgroup" in agent["args"]  # and the file's value is kept
    assert ds["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux",
                                                              "pool": "1"}
    # The capabilities' reasons are in the output as comments.
    assert "# bpf(): loading the eBPF programs" in result.output

    plain = _invoke("--dry-run", "--no-create-namespace")
    assert "kind: Namespace" not in plain.output


def test_install_without_dry_run_says_how_to_apply() -> None:
    result = _invoke("--set", "logLevel=debug")
    assert result.exit_code == 2
    assert "mesh install --dry-run -n mesh-system --set logLevel=debug | kubectl apply " \
        "--server-side -f -" in result.output


def test_install_refuses_bad_options(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    for args, says in ((["-f", str(bad)], "not a map of values"),
                       (["-f", str(tmp_path / "missing.yaml")], "missing.yaml"),
                       (["--namespace", "Not_A_Label"], "is not a DNS label"),
                       (["--release-name", "x" * 60], "release name")):
        result = _invoke("--dry-run", *args)
        assert result.exit_code == 2, result.output
        assert says in result.output
    with pytest.raises(InstallError, match="no chart"):
        render({}, chart_dir=tmp_path)


# -- mesh cni-install ----------------------------------------------------------------------------

def _run_plugin(path: Path, command: str, stdin: str = "{}",
                **env: str) -> tuple[int, dict[str, Any]]:
    """Run the installed file as the container runtime would: executed directly, with a
    PATH without the venv's Python (the node's python3 has no pyroute2)."""
    out = subprocess.run([str(path)], input=stdin.encode(), capture_output=True, timeout=30,
                         check=False, env={"PATH": "/usr/bin:/bin", "CNI_COMMAND": command,
                                           **env})
    return out.returncode, json.loads(out.stdout)


needs_python3 = pytest.mark.skipif(not Path("/usr/bin/python3").exists(),
                                   reason="no /usr/bin/python3 to run the plugin with")


@needs_python3
def test_cni_install_writes_an_executable_plugin_and_conflist(tmp_path: Path) -> None:
    bin_dir, conf_dir = tmp_path / "opt/cni/bin", tmp_path / "etc/cni/net.d"
    result = CliRunner().invoke(main, ["cni-install", "--bin-dir", str(bin_dir), "--conf-dir",
                                       str(conf_dir), "--pod-cidr", "10.244.1.0/24",
                                       "--mtu", "1450"])
    assert result.exit_code == 0, result.output
    plugin = bin_dir / "mesh-cni"
    assert stat.S_IMODE(plugin.stat().st_mode) == 0o755
    assert plugin.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert sorted(os.listdir(bin_dir)) == ["mesh-cni"]  # no temporary file left
    assert sorted(os.listdir(conf_dir)) == ["05-mesh.conflist"]

    code, out = _run_plugin(plugin, "VERSION")
    assert code == 0 and out == {"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}
    # ADD reaches pyroute2 (bundled in the file) before it finds the namespace missing.
    conf = (conf_dir / "05-mesh.conflist").read_text()
    network = json.loads(conf)
    stdin = json.dumps({**network["plugins"][0], "name": network["name"],
                        "cniVersion": network["cniVersion"]})
    code, out = _run_plugin(plugin, "ADD", stdin, CNI_CONTAINERID="c1", CNI_IFNAME="eth0",
                            CNI_PATH=str(bin_dir), CNI_NETNS=str(tmp_path / "no-netns"))
    assert code == 1 and out["code"] == 3, out  # UNKNOWN_CONTAINER, not an ImportError

    assert network == {"cniVersion": "1.0.0", "name": "mesh", "plugins": [{
        "type": "mesh-cni", "mtu": 1450,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}}]}
    assert NetworkList.load(conf_dir / "05-mesh.conflist").plugins[0]["type"] == "mesh-cni"


def test_cni_install_is_idempotent(tmp_path: Path) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    first = cni.install(bin_dir, conf_dir, "10.244.2.0/24")
    assert set(first.values()) == {True}
    stamps = {p: Path(p).stat().st_mtime_ns for p in first}
    assert set(cni.install(bin_dir, conf_dir, "10.244.2.0/24").values()) == {False}
    assert {p: Path(p).stat().st_mtime_ns for p in first} == stamps
    # A changed range rewrites the conflist only; a mode gone wrong is put right.
    (bin_dir / "mesh-cni").chmod(0o644)
    again = cni.install(bin_dir, conf_dir, "10.244.3.0/24")
    assert again == {str(bin_dir / "mesh-cni"): True, str(conf_dir / "05-mesh.conflist"): True}
    assert stat.S_IMODE((bin_dir / "mesh-cni").stat().st_mode) == 0o755
    assert cni.plugin_executable() == cni.plugin_executable()  # byte for byte


def test_cni_install_refuses_bad_input(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["cni-install", "--bin-dir", str(tmp_path / "b"), "--conf-dir", str(tmp_path / "c")]
    for extra, says in (([], "one of --pod-cidr and --pod-cidr-from-node"),
                        (["--pod-cidr", "fd00::/64"], "IPv4"),
                        (["--pod-cidr", "10.244.1.1/24"], "host bits"),
                        (["--pod-cidr", "10.0.0.0/24", "--pod-cidr-from-node", "n"], "one of")):
        result = runner.invoke(main, [*args, *extra])
        assert result.exit_code == 2, result.output
        assert says in result.output
    assert not (tmp_path / "b" / "mesh-cni").exists()


def test_cni_install_reads_the_nodes_pod_cidr(tmp_path: Path) -> None:
    api = BackgroundAPI()
    try:
        for name, spec in (("node-a", {"podCIDR": "fd00:1::/64",
                                       "podCIDRs": ["fd00:1::/64", "10.244.7.0/24"]}),
                           ("node-b", {})):
            api.call(api.api.put_object("", "nodes", {"metadata": {"name": name},
                                                      "spec": spec}))
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        base = ["cni-install", "--bin-dir", str(tmp_path / "bin"),
                "--conf-dir", str(tmp_path / "net.d"), "--kubeconfig", str(kubeconfig)]
        result = CliRunner().invoke(main, [*base, "--pod-cidr-from-node", "node-a"])
        assert result.exit_code == 0, result.output
        conf = json.loads((tmp_path / "net.d" / "05-mesh.conflist").read_text())
        assert conf["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.244.7.0/24"}]]
        # A list with a field selector (the ClusterRole lists nodes; it does not get them).
        assert api.api.requests == [("GET", "/api/v1/nodes?fieldSelector=metadata.name%3Dnode-a")]

        for node, says in (("node-b", "Node node-b has no IPv4 spec.podCIDRs"),
                           ("node-c", "no Node named node-c")):
            result = CliRunner().invoke(main, [*base, "--pod-cidr-from-node", node,
                                               "--timeout", "0.5"])
            assert result.exit_code == 1, result.output
            assert says in result.output
    finally:
        api.stop()


def test_plugin_executable_holds_the_plugin_and_pyroute2() -> None:
    """The file's zip holds the plugin as __main__ and pyroute2: nothing else is needed."""
    import io
    import zipfile

    data = cni.plugin_executable()
    names = zipfile.ZipFile(io.BytesIO(data[len(cni.SHEBANG):])).namelist()
    assert names[0] == "__main__.py" and "pyroute2/__init__.py" in names
    assert any(n.startswith("pyroute2-licenses/LICENSE") for n in names)


HOST_LOCAL = Path("/usr/lib/cni/host-local")  # Debian's containernetworking-plugins


@pytest.mark.netns
@needs_python3
@pytest.mark.skipif(os.geteuid() != 0 or not HOST_LOCAL.exists(),
                    reason="needs root (network namespaces) and host-local")
def test_installed_plugin_adds_and_deletes_a_pod(tmp_path: Path) -> None:
    """The installed file, run with the node's python3 (no pyroute2 of its own) in a node
    namespace, gives a pod namespace its eth0 and takes it back."""
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    cni.install(bin_dir, conf_dir, "10.250.9.0/24")
    (bin_dir / "host-local").symlink_to(HOST_LOCAL)
    network = json.loads((conf_dir / cni.CONFLIST_NAME).read_text())
    conf = {**network["plugins"][0], "name": network["name"],
            "cniVersion": network["cniVersion"]}
    conf["ipam"]["dataDir"] = str(tmp_path / "ipam")
    node, pod = f"chart-node-{os.getpid()}", f"chart-pod-{os.getpid()}"
    for ns in (node, pod):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        env = {"PATH": "/usr/bin:/bin", "CNI_CONTAINERID": "chart", "CNI_IFNAME": "eth0",
               "CNI_PATH": str(bin_dir), "CNI_NETNS": f"/var/run/netns/{pod}"}
        for command in ("ADD", "DEL"):
            out = subprocess.run(["ip", "netns", "exec", node, str(bin_dir / "mesh-cni")],
                                 input=json.dumps(conf).encode(), capture_output=True,
                                 env={**env, "CNI_COMMAND": command}, timeout=30, check=False)
            assert out.returncode == 0, out.stdout + out.stderr
            addrs = subprocess.run(["ip", "-n", pod, "-j", "addr", "show", "eth0"],
                                   capture_output=True, text=True, check=False)
            if command == "ADD":
                assert json.loads(out.stdout)["ips"][0]["address"] == "10.250.9.2/32"
                assert "10.250.9.2" in addrs.stdout
            else:
                assert addrs.returncode != 0  # eth0 went with its host side
    finally:
        for ns in (node, pod):
            subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_manifests_accepted_by_the_real_api_server(
        name: str, control_plane: ControlPlane) -> None:
    """Every object the chart renders, judged by a real API server (its schemas, CEL rules
    and admission, server-side dry run; the CRDs it installs applied for real first)."""
    cp = control_plane
    for crd in gateway_api_crds():
        cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    rendered = _rendered(name)
    crds = [m.object for m in rendered if m.kind == "CustomResourceDefinition"]
    assert crds, "the chart installs our CRDs"
    cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
               input=yaml.safe_dump_all(crds))
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
               *(f"crd/{c['metadata']['name']}" for c in crds))
    namespaces = {m.object["metadata"].get("namespace") for m in rendered} - {None}
    for ns in sorted(namespaces):
        cp.kubectl("create", "namespace", ns, check=False)  # may exist from another set
    rest = [m.object for m in rendered if m.kind != "CustomResourceDefinition"]
    done = cp.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(rest),
                      check=False)
    assert done.returncode == 0, done.stderr
    assert sum(" (server dry run)" in line for line in done.stdout.splitlines()) == len(rest)
