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
    labels: tuple[str, ...] = ()  # "key=value", sorted; a node's: "reserved:host" or ":remote-node"
    identity: int = 0
    service: str = ""  # "namespace/name": the Service the client asked for (its ClusterIP)
    node: str = ""  # the pod's node
    workload: str = ""  # its Deployment (or other controller), or the pod
    workload_kind: str = ""


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


@dataclass(frozen=True)
class Connection:
    """What the datapath told of an L3/L4 flow's connection: the event (NEW: its first
    packet; CHANGED: a direction's verdict changed; CLOSED: its end, with the counts), where
    the packet went (Hubble's observation point), and the packets and bytes each way so far
    (initiator to responder, then the replies)."""

    event: str  # NEW | CHANGED | CLOSED
    point: str  # TO_ENDPOINT, TO_STACK, TO_PROXY, TO_CRYPTO, or "" (dropped before a point)
    is_reply: bool  # the packet went responder -> initiator
    tcp_flags: tuple[str, ...] = ()  # of that packet: "SYN", "ACK", "FIN", "RST", "PSH"
    packets: tuple[int, int] = (0, 0)
    bytes: tuple[int, int] = (0, 0)


# Verdicts and drop reasons as Hubble names them (flow.proto's Verdict and DropReason).
FORWARDED, DROPPED, ERROR, REDIRECTED = "FORWARDED", "DROPPED", "ERROR", "REDIRECTED"
TRANSLATED = "TRANSLATED"  # a socket balanced from a Service to a backend (a SOCK flow)
# Flow kinds (flow.proto's FlowType): a connection's event, a request, a socket's
# translation by the socket load balancer.
L3_L4, L7, SOCK = "L3_L4", "L7", "SOCK"
INGRESS, EGRESS = "INGRESS", "EGRESS"


@dataclass(frozen=True)
class Flow:
    time: float  # seconds since the epoch
    node: str
    kind: str  # L3_L4 | L7 | SOCK
    verdict: str  # FORWARDED | DROPPED | ERROR | REDIRECTED (to the node's Envoy) | TRANSLATED
    source: Endpoint
    destination: Endpoint
    protocol: str  # "TCP", "UDP", "ICMP"
    drop_reason: str = ""  # with DROPPED: "POLICY_DENIED", ...
    http: Http | None = None
    connection: Connection | None = None  # L3_L4 flows from the datapath
    direction: str = ""  # INGRESS (to a pod of the node) | EGRESS (from one) | ""
    id: str = ""  # this flow's (Hubble's uuid)
    connection_id: str = ""  # its connection's: shared by its L3/L4, SOCK and L7 flows
