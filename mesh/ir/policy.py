"""The network policy part of the IR: which security identity each address has, and what each
of this node's pods may send and receive (by peer identity, protocol and port)."""

from __future__ import annotations

from dataclasses import dataclass

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class IdentityMap:
    """Pod address -> security identity, for the pods whose identity is known (sorted by
    address); and the label sets seen on pods that have no identity yet, for a sink to
    create (until it exists, such a pod counts as unmanaged: policy allows it nothing a
    label selects)."""

    endpoints: tuple[tuple[str, int], ...] = ()
    missing: tuple[Labels, ...] = ()
    # The identities whose label set no pod has (any more): the leader collects them once
    # they stay unused long enough.
    unused: tuple[int, ...] = ()


@dataclass(frozen=True)
class IpcacheEntry:
    """What holds the addresses of `prefix`: a pod's identity, a node's, or the world's; and the
    CIDR identity of the longest CIDR a policy names that holds them (0: none)."""

    prefix: str  # "10.244.1.5/32", "0.0.0.0/4"
    identity: int
    cidr_identity: int = 0


@dataclass(frozen=True, order=True)
class PolicyAllow:
    """One thing a pod's policy allows: peers of `identity` (0: any), in `direction`, on a
    protocol (None: every protocol) and a destination port range (None: every port)."""

    direction: str  # "ingress" | "egress"
    identity: int
    protocol: str | None = None  # TCP | UDP | SCTP
    port: int | None = None
    end_port: int | None = None
    # L7 rules apply (a MeshNetworkPolicy's HTTP or gRPC rules): the flow goes to the node's
    # Envoy (NetworkPolicies.proxy_port), which enforces them. An allow of the same peer and
    # port without L7 rules wins: the flow is not redirected.
    proxy: bool = False
    # The pod's DNS (its toFQDNs rules learn from the answers): egress through the node's DNS
    # proxy (NetworkPolicies.dns_proxy_port), which wins over a plain allow of the same key.
    dns: bool = False


@dataclass(frozen=True)
class TierEntry:
    """What a ClusterNetworkPolicy tier does to a pod's peers of `identity`, in `direction`, on
    a protocol (None: every protocol) and a destination port range (None: every port). The
    entries of one (tier, direction, identity) never overlap: each holds the rule of lowest
    `precedence` (its place in the tier's order) that covers it."""

    tier: str  # "admin" | "baseline"
    direction: str
    identity: int
    protocol: str | None
    port: int | None
    end_port: int | None
    action: str  # Accept | Deny | Pass
    precedence: int


@dataclass(frozen=True, order=True)
class FqdnAllow:
    """A pod may send to the addresses DNS answers give for names `pattern` matches (a name,
    or one with `*` standing for any characters of one label; `*` alone: every name), on a
    protocol (None: every protocol) and a destination port range (None: every port), for
    the records' TTL."""

    pattern: str  # lower case, no trailing dot
    protocol: str | None = None
    port: int | None = None
    end_port: int | None = None


@dataclass(frozen=True)
class EndpointPolicy:
    """A pod of this node: whether policies isolate it each way, and what they allow (sorted);
    `policies` names them (namespace/name), for `mesh policy`."""

    address: str
    identity: int
    ingress_isolated: bool = False
    egress_isolated: bool = False
    allow: tuple[PolicyAllow, ...] = ()
    policies: tuple[str, ...] = ()
    # ClusterNetworkPolicy tiers (sorted); `tier_rules` names each precedence's rule
    # ("cnp/name: rule"), for `mesh policy`.
    tiers: tuple[TierEntry, ...] = ()
    tier_rules: tuple[tuple[int, str], ...] = ()
    # toFQDNs rules (sorted): their addresses are the node's DNS proxy's to learn.
    fqdn: tuple[FqdnAllow, ...] = ()


@dataclass(frozen=True)
class PolicyProblem:
    """A policy (namespace/name, or a cluster-scoped one's name) that could not be enforced as
    written, and what is done instead; its kind and uid, for an Event about it."""

    policy: str
    message: str
    kind: str = "NetworkPolicy"  # | ClusterNetworkPolicy
    uid: str = ""


@dataclass(frozen=True)
class L7Rule:
    """A request an L7 rule lets through."""

    method: str | None = None
    path: str | None = None  # a regular expression the whole path matches
    host: str | None = None
    headers: tuple[tuple[str, str | None], ...] = ()  # (name, value; None: present)


@dataclass(frozen=True)
class L7Group:
    """Clients (their addresses) that the same L7 rules apply to, at one pod's port."""

    sources: tuple[str, ...]  # CIDRs
    rules: tuple[L7Rule, ...]
    policies: tuple[str, ...]  # namespace/name of the policies the rules come from


@dataclass(frozen=True)
class L7Target:
    """A pod of this node's port whose clients' requests the node's Envoy checks."""

    address: str
    port: int
    groups: tuple[L7Group, ...]
    http2: bool = False  # gRPC rules: the pod speaks HTTP/2 (h2c)


@dataclass(frozen=True)
class NetworkPolicies:
    """The datapath's policy state for one node: the ipcache (sorted by prefix) and this node's
    pods (sorted by address)."""

    ipcache: tuple[IpcacheEntry, ...] = ()
    endpoints: tuple[EndpointPolicy, ...] = ()
    problems: tuple[PolicyProblem, ...] = ()
    l7: tuple[L7Target, ...] = ()
    proxy_port: int = 0  # the node Envoy's policy listener (0: no L7 rule anywhere)
    dns_proxy_port: int = 0  # the node's DNS proxy (0: no toFQDNs rule on this node's pods)
