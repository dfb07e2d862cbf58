"""Pods to security identities (mesh/policy/identities.py): each pod's label set looked up
among the MeshIdentity objects the store holds; the label sets without one are named for the
sink that creates them, and the identities no pod uses for the one that collects them."""

from __future__ import annotations

from collections.abc import Mapping

from mesh import ir
from mesh.policy import identities as ids
from mesh.store import kinds
from mesh.store.store import StoreSnapshot
from mesh.translate import addressing, model


def identity_table(snapshot: StoreSnapshot) -> ids.IdentityTable:
    """The numbers taken, from the MeshIdentity objects (named after their number)."""
    taken: dict[int, str] = {}
    for obj in snapshot.of_kind(kinds.MESH_IDENTITY):
        labels = obj.spec.get("labels")
        if not obj.name.isdigit() or not isinstance(labels, Mapping):
            continue  # the CRD's schema refuses these; a file may not
        number = int(obj.name)
        if ids.FIRST <= number <= ids.LAST:
            taken[number] = ids.labels_key(tuple(sorted((str(k), str(v))
                                                        for k, v in labels.items())))
    return ids.IdentityTable(taken)


def translate_identities(snapshot: StoreSnapshot,
                         table: ids.IdentityTable | None = None) -> ir.IdentityMap:
    table = table if table is not None else identity_table(snapshot)
    namespaces = {o.name: o.labels for o in snapshot.of_kind(kinds.NAMESPACE)}
    endpoints: dict[str, int] = {}
    missing: set[ir.Labels] = set()
    used: set[int] = set()
    for pod in snapshot.of_kind(kinds.POD):
        status = pod.body.get("status")
        done = isinstance(status, Mapping) and status.get("phase") in ("Succeeded", "Failed")
        if done:
            continue
        labels = ids.identity_labels(pod.namespace, pod.labels,
                                     namespaces.get(pod.namespace, {}))
        number = table.find(labels)
        if number is not None:
            used.add(number)  # also a pod not started yet: its identity is kept
        addresses = model.pod_ips(status)
        if not addresses:
            continue
        if number is None:
            missing.add(labels)
            continue
        for a in addresses:
            endpoints[a] = number
    return ir.IdentityMap(
        endpoints=tuple(sorted(endpoints.items(),
                               key=lambda e: addressing.address_order(e[0]))),
        missing=tuple(sorted(missing)),
        unused=tuple(sorted(set(table.by_number) - used)))
