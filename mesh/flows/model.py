"""One flow: an event of a connection (L3/L4) or a request (L7), with both ends as the node
knows them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    """One end: its address and port, and what the node's directory of pods says of it
    (empty where it knows nothing: an address outside the cluster)."""

    ip: str
    port: int = 0
    namespace: str = ""
    pod: str = ""
    labels: tuple[str, ...] = ()  # "key=value", sorted
    identity: int = 0
    service: str = ""  # "namespace/name": the Service the client asked for (its ClusterIP)
    node: str = ""  # the pod's node


@dataclass(frozen=True)
class Http:
    """A request as the node's Envoy logged it. `status` 0: no response (the client left,
    or no upstream answered)."""

    method: str
    path: str
    host: str
    status: int
    latency_ms: float
    protocol: str  # "HTTP/1.0", "HTTP/1.1", "HTTP/2", "HTTP/3"
    route: str = ""
    upstream_cluster: str = ""
    details: str = ""  # Envoy's response code details ("via_upstream", "rbac_access_denied...")


# Verdicts and drop reasons as Hubble names them (flow.proto's Verdict and DropReason).
FORWARDED, DROPPED, ERROR = "FORWARDED", "DROPPED", "ERROR"
L3_L4, L7 = "L3_L4", "L7"


@dataclass(frozen=True)
class Flow:
    time: float  # seconds since the epoch
    node: str
    kind: str  # L3_L4 | L7
    verdict: str  # FORWARDED | DROPPED | ERROR
    source: Endpoint
    destination: Endpoint
    protocol: str  # "TCP", "UDP", "ICMP"
    drop_reason: str = ""  # with DROPPED: "POLICY_DENIED", ...
    http: Http | None = None
