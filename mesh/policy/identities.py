"""Security identities: a number per set of pod labels, the same on every node.

Network policy is enforced by identity, not by address: the datapath looks up the peer's
identity (an IP -> identity map) and the pod's policy by identity, so a pod that comes and
goes changes one map entry, not every policy that selects it. Numbers as Cilium gives them:
0 matches any identity (a wildcard in the policy map), 1-255 are reserved (the host, the
world, other nodes, the node's Envoy), 256-65535 name label sets.

A pod's identity comes from its namespace and its labels, less the ones a controller adds per
replica or per rollout (`pod-template-hash`, `controller-revision-hash`, ...), so the replicas
of a Deployment share one identity and a rollout does not mint new ones. Labels that change
what a policy selects (any other label, or the namespace's labels) give another identity: a pod
relabelled gets a new identity for new flows.

Every node must agree without talking to the others. The number for a label set is found by
probing from a starting point its labels give (a digest): the first number whose identity
object holds those labels, or the first free one, taken by creating that object (the API
server's create is the arbiter: of two nodes creating the same number, one gets "already
exists" and reads whose it is). `candidates` gives the probing order; `IdentityTable` is what
a node knows of the numbers taken.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

# Reserved identities (Cilium's numbers).
ANY = 0
HOST = 1  # this node (its own processes)
WORLD = 2  # anything outside the cluster
UNMANAGED = 3  # a pod of the cluster whose identity is not known (yet)
REMOTE_NODE = 6  # another node of the cluster
PROXY = 8  # the node's Envoy, when it sends on its own behalf (Cilium's "ingress")
RESERVED_NAMES = {HOST: "host", WORLD: "world", UNMANAGED: "unmanaged",
                  REMOTE_NODE: "remote-node", PROXY: "proxy"}

FIRST = 256  # the first identity of a label set
LAST = 65535  # the last (16 bits in the datapath's maps)

# The label of a pod's namespace in its identity's labels (as Cilium writes it).
NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
# Namespace labels become identity labels under this prefix (a pod label key cannot hold a
# colon): a namespaceSelector selects on them, so a namespace relabelled changes its pods'
# identities.
NAMESPACE_LABELS_PREFIX = "ns:"

# Labels a controller sets per replica or per rollout, and the ones that say nothing a
# policy selects on: not part of an identity.
_IGNORED = frozenset({
    "pod-template-hash", "controller-revision-hash", "pod-template-generation",
    "statefulset.kubernetes.io/pod-name", "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid", "controller-uid",
    "batch.kubernetes.io/job-completion-index"})


def identity_labels(namespace: str, pod_labels: Mapping[str, str],
                    namespace_labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The labels that make a pod's identity, sorted: its namespace, its own labels less the
    per-replica ones, and its namespace's labels (prefixed)."""
    out = {NAMESPACE_LABEL: namespace}
    out.update({k: v for k, v in pod_labels.items() if k not in _IGNORED})
    out.update({NAMESPACE_LABELS_PREFIX + k: v for k, v in namespace_labels.items()})
    return tuple(sorted(out.items()))


def labels_key(labels: tuple[tuple[str, str], ...]) -> str:
    """A label set as one string (what an identity object records, and what is compared)."""
    return ";".join(f"{k}={v}" for k, v in labels)


def candidates(labels: tuple[tuple[str, str], ...]) -> Iterator[int]:
    """The numbers to try for a label set, in order: every label-set number once, starting
    where the labels' digest points, so that different sets rarely meet."""
    span = LAST - FIRST + 1
    start = int.from_bytes(hashlib.blake2b(labels_key(labels).encode(),
                                           digest_size=8).digest(), "big") % span
    for i in range(span):
        yield FIRST + (start + i) % span


@dataclass
class IdentityTable:
    """The numbers taken, as a node knows them (the identity objects it has seen)."""

    by_number: dict[int, str]  # number -> labels key

    def __post_init__(self) -> None:
        # Labels -> their number; the lowest if a race or a collection ever left two.
        self._by_key: dict[str, int] = {}
        for n, key in sorted(self.by_number.items(), reverse=True):
            self._by_key[key] = n

    def find(self, labels: tuple[tuple[str, str], ...]) -> int | None:
        """The number these labels have, or None."""
        return self._by_key.get(labels_key(labels))

    def next_free(self, labels: tuple[tuple[str, str], ...]) -> int:
        """The number to claim for new labels: the first free one in their probing order.
        ValueError when every number is taken."""
        for n in candidates(labels):
            if n not in self.by_number:
                return n
        raise ValueError("no identity left: every number from 256 to 65535 is taken")
