"""What `mesh run` configures."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mesh.envoy.bootstrap import Protocol
from mesh.kube.leader import LeaseConfig
from mesh.translate import TranslatorConfig
from meshxds.address import ListenAddress


@dataclass(frozen=True)
class AgentConfig:
    node_id: str
    state_dir: Path
    xds_address: ListenAddress
    admin_address: ListenAddress
    protocol: Protocol = "delta"
    resources_file: Path | None = None  # Envoy resources as they are
    manifests: Path | None = None  # Kubernetes manifests, translated
    # The objects from a Kubernetes API server instead (list+watch); `kubeconfig` None: the
    # in-cluster configuration (the pod's service account).
    kubernetes: bool = False
    kubeconfig: str | None = None
    # Kubernetes: the Lease on which agents elect the one that writes status (None: this
    # agent writes, alone), and this agent's name in it and in its MeshNode (its pod's).
    lease: LeaseConfig | None = None
    identity: str | None = None
    # Envoy runs beside the agent, started by someone else (the chart's own container): the
    # agent serves it xDS and waits for it, but never starts, adopts or stops it.
    external_envoy: bool = False
    translator: TranslatorConfig = field(default_factory=TranslatorConfig)
    envoy_log_level: str = "warning"
    max_downstream_connections: int = 50_000
    keep_envoy: bool = False  # a stop on purpose leaves Envoy serving, for the next agent
    # The eBPF datapath: service load balancing for the processes of this cgroup (v2), the
    # pods' on a lab node; None: no datapath (the agent on one host, Envoy only).
    datapath_cgroup: Path | None = None
    # The node's device towards other nodes: packets for local pods arriving on it are
    # redirected into them too (None: only pod-to-pod on the node).
    datapath_underlay: str | None = None
    # How the datapath hands connections to Envoy: "sk-assign" (bpf_sk_assign at tc) or
    # "tproxy" (a mark at tc and netfilter's TPROXY); README "The L7 redirect" compares them.
    datapath_redirect: str = "sk-assign"
    # Transparent encryption of pod traffic between nodes: "none" | "wireguard" | "ipsec";
    # strict: what would leave in the clear is dropped (and these CIDRs too, besides other
    # nodes' pods'). IPsec's keys: the cluster's secret, a file (a mounted Secret).
    encryption: str = "none"
    encryption_strict: bool = True
    encryption_strict_cidrs: tuple[str, ...] = ()
    ipsec_keys: Path = Path("/etc/mesh/ipsec/keys")
    # Redis for the node's rate limit service (global rate limits); None: no service, and
    # policies with global limits are refused in their status.
    ratelimit_redis: str | None = None
    # The node's flows: how many of the last the agent keeps; with a datapath, whether it
    # tracks connections (L3/L4 flows; L7 flows come from Envoy either way).
    flow_capacity: int = 4095
    flow_events: bool = True
    # Prometheus metrics (the agent's at /metrics, Envoy's at /metrics/envoy): HOST:PORT,
    # loopback by default (Hubble's metrics port); None: not served.
    metrics_address: tuple[str, int] | None = ("127.0.0.1", 9965)
    # Hubble's Observer API on the network too, for the cluster's relay: HOST:PORT, with
    # mutual TLS from this directory (ca.crt, tls.crt, tls.key) off the loopback.
    hubble_listen: str | None = None
    hubble_tls: Path | None = None

    @property
    def ratelimit_socket(self) -> Path:
        return self.state_dir / "ratelimit.sock"

    @property
    def hubble_socket(self) -> Path:
        """Hubble's Observer API: the node's flows (`mesh observe`, `hubble observe`)."""
        return self.state_dir / "hubble.sock"

    @property
    def accesslog_socket(self) -> Path:
        """The access log service's: Envoy's requests, as L7 flows."""
        return self.state_dir / "accesslog.sock"
