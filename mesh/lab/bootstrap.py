"""What a fresh control plane gets before the lab's agents run on it, as a cluster gets it
from its administrator: the Gateway API's CRDs (from its Go module) and ours, and the chart's
own objects (`mesh install`'s rendering with the Hubble relay on: its Namespace,
ServiceAccounts, ClusterRoles, Role, their bindings, the relay's certificates, the
GatewayClass and IngressClass), the DaemonSet and the relay's Deployment aside since the lab
runs each node's agent and the relay itself. The agents and the relay then authenticate with
tokens of the chart's ServiceAccounts, and talk with the chart's certificates, so a
permission the code uses and the chart lacks fails in the lab as on a cluster.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from mesh.install import render, to_stream
from mesh.lab.controlplane import (
    ControlPlane,
    ControlPlaneError,
    gateway_api_crds,
    network_policy_api_crds,
    write_file,
)

RELEASE = "mesh"
NAMESPACE = "mesh-system"
# The lab's agents' tokens: long enough for a lab left running for days (the API server
# caps nothing here; a chart's pods get short projected tokens instead).
TOKEN_DURATION = "8760h"


def install_crds(cp: ControlPlane) -> None:
    """The Gateway API's CRDs (experimental channel) and the Network Policy API's
    (ClusterNetworkPolicy), established (ours come with the chart)."""
    files = [arg for crd in [*gateway_api_crds(), *network_policy_api_crds()]
             for arg in ("-f", str(crd))]
    cp.kubectl("apply", "--server-side", "--force-conflicts", *files)
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
               "crd/httproutes.gateway.networking.k8s.io",
               "crd/gateways.gateway.networking.k8s.io",
               "crd/gatewayclasses.gateway.networking.k8s.io",
               "crd/clusternetworkpolicies.policy.networking.k8s.io")


@dataclass(frozen=True)
class Installed:
    agent_account: str  # the agents' ServiceAccount
    relay_account: str  # the Hubble relay's
    # The chart's certificate Secrets: name -> file (ca.crt, tls.crt, tls.key) -> content.
    secrets: dict[str, dict[str, bytes]]

    def tls(self, component: str) -> dict[str, bytes]:
        """The files of the Secret for `component` ("server": the agents', "relay")."""
        suffix = {"server": "-hubble-server-certs", "relay": "-hubble-relay-client-certs"}
        return next(v for k, v in self.secrets.items() if k.endswith(suffix[component]))


def install_chart(cp: ControlPlane, namespace: str = NAMESPACE,
                  encryption: str = "none") -> Installed:
    """The chart's objects but its DaemonSet and the relay's Deployment (its CRDs included),
    applied in Helm's order, rendered for the lab's encryption mode (its RBAC follows it)
    and with the Hubble relay on."""
    values = {"encryption": {"mode": encryption}, "datapath": {"enabled": True},
              "hubble": {"relay": {"enabled": True}}}
    manifests = [m for m in render(values, release=RELEASE, namespace=namespace,
                                   create_namespace=True)
                 if m.kind not in ("DaemonSet", "Deployment")]
    crds = [m for m in manifests if m.kind == "CustomResourceDefinition"]
    rest = [m for m in manifests if m.kind != "CustomResourceDefinition"]
    _apply(cp, to_stream(crds))
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
               "crd/meshnodes.mesh.dev", "crd/trafficpolicies.mesh.dev",
               "crd/meshidentities.mesh.dev")
    _apply(cp, to_stream(rest))
    accounts = [str(m.object["metadata"]["name"]) for m in rest if m.kind == "ServiceAccount"]
    secrets = {str(m.object["metadata"]["name"]): {
        k: base64.b64decode(v) for k, v in m.object["data"].items()}
        for m in rest if m.kind == "Secret"}
    return Installed(agent_account=next(a for a in accounts if "relay" not in a),
                     relay_account=next(a for a in accounts if "relay" in a), secrets=secrets)


def write_tls(directory: Path, files: dict[str, bytes]) -> Path:
    """A Secret's certificate files in `directory`, as a pod would have them mounted (the
    key 0600)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, data in files.items():
        write_file(directory / name, data, 0o600 if name.endswith(".key") else 0o644)
    return directory


def _apply(cp: ControlPlane, stream: str) -> None:
    done = cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                      input=stream, check=False)
    if done.returncode != 0:
        raise ControlPlaneError(f"kubectl apply: {done.stderr.strip()}")


def token_kubeconfig(cp: ControlPlane, path: Path, service_account: str, *,
                     namespace: str = NAMESPACE, server: str | None = None) -> Path:
    """A kubeconfig (mode 0600) holding a token of `service_account`, for `server` (the
    control plane's own address unless given)."""
    done = cp.kubectl("create", "token", service_account, "-n", namespace,
                      f"--duration={TOKEN_DURATION}", check=False)
    if done.returncode != 0:
        raise ControlPlaneError(f"no token for {namespace}/{service_account}: "
                                f"{done.stderr.strip()}")
    token = done.stdout.strip()
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "agent",
              "clusters": [{"name": "lab", "cluster": {
                  "server": server or cp.server,
                  "certificate-authority": str(cp.certs / "ca.crt")}}],
              "users": [{"name": service_account, "user": {"token": token}}],
              "contexts": [{"name": "agent", "context": {"cluster": "lab",
                                                         "user": service_account}}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, json.dumps(config).encode(), 0o600)
    return path
