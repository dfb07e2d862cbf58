"""The RBAC rules the agent needs, derived from what it reads and writes. The chart's
ClusterRole and Role are checked against these in tests/test_chart.py."""

from __future__ import annotations

from mesh.kube.resources import (
    ENDPOINT_SLICES,
    EVENTS,
    LEASE,
    MESH_IDENTITIES,
    MESH_NODE,
    NODES,
    SERVICES,
    STATUS_KINDS,
    resources,
)


def cluster_rules(encryption: bool = False) -> list[dict[str, list[str]]]:
    """The cluster-wide RBAC rules the agent needs, exactly: list+watch of every kind it
    reads, get + update of the status of the kinds it writes status for (it reads an object
    again before a write and after a conflict), and MeshNodes (get, create and update of the
    status, which each agent does for its own node's only, though RBAC cannot say "own";
    the leader lists and watches them all)."""
    rules: list[dict[str, list[str]]] = []
    by_group: dict[str, list[str]] = {}
    for r in resources(None):
        by_group.setdefault(r.group, []).append(r.plural)
    for group, plurals in sorted(by_group.items()):
        rules.append({"apiGroups": [group], "resources": sorted(plurals),
                      "verbs": ["list", "watch"]})
    status: dict[str, list[str]] = {}
    for r in resources(None):
        if r.group_kind in STATUS_KINDS:
            status.setdefault(r.group, []).append(r.plural)
    for group, plurals in sorted(status.items()):
        rules.append({"apiGroups": [group], "resources": sorted(plurals), "verbs": ["get"]})
        rules.append({"apiGroups": [group], "resources": sorted(f"{p}/status" for p in plurals),
                      "verbs": ["update"]})
    rules.append({"apiGroups": [MESH_NODE.group], "resources": [MESH_NODE.plural],
                  "verbs": ["get", "list", "watch", "create"]})
    rules.append({"apiGroups": [MESH_NODE.group], "resources": [f"{MESH_NODE.plural}/status"],
                  "verbs": ["update"]})
    # What the leader generates for Gateways (mesh/kube/infrastructure.py): server-side
    # apply (patch; create when missing), deleted when no longer wanted.
    rules.append({"apiGroups": [SERVICES.group], "resources": [SERVICES.plural],
                  "verbs": ["create", "patch", "delete"]})
    rules.append({"apiGroups": [SERVICES.group], "resources": [f"{SERVICES.plural}/status"],
                  "verbs": ["patch"]})
    rules.append({"apiGroups": [ENDPOINT_SLICES.group], "resources": [ENDPOINT_SLICES.plural],
                  "verbs": ["create", "patch", "delete"]})
    # Security identities (mesh/kube/identities.py): made by whoever sees a label set first,
    # read after a create finds the number taken, deleted by the leader once unused.
    rules.append({"apiGroups": [MESH_IDENTITIES.group], "resources": [MESH_IDENTITIES.plural],
                  "verbs": ["get", "create", "delete"]})
    # Warning Events on NetworkPolicies not enforced as written (mesh/kube/events.py): looked
    # for first, so that a new leader does not repeat them.
    rules.append({"apiGroups": [EVENTS.group], "resources": [EVENTS.plural],
                  "verbs": ["list", "create"]})
    if encryption:
        # The node's WireGuard public key on its own Node (mesh/kube/nodekey.py).
        rules.append({"apiGroups": [NODES.group], "resources": [NODES.plural],
                      "verbs": ["patch"]})
    return rules


def namespace_rules() -> list[dict[str, list[str]]]:
    """The rules in the agent's own namespace: the leader election's Lease."""
    return [{"apiGroups": [LEASE.group], "resources": [LEASE.plural],
             "verbs": ["get", "create", "update"]}]


def relay_rules() -> list[dict[str, list[str]]]:
    """The Hubble relay's (`mesh relay --peers-from-kubernetes`, mesh/hubble/relay.py): it
    finds the agents by listing and watching Nodes, and reads nothing else."""
    return [{"apiGroups": [NODES.group], "resources": [NODES.plural],
             "verbs": ["list", "watch"]}]
