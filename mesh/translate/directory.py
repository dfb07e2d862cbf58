"""Pods and Services by address (mesh/ir/directory.py), pure: each running pod's addresses
with its namespace, name, labels and node; each Service's ClusterIPs. What is not a string
where a string belongs is left out, never guessed."""

from __future__ import annotations

from collections.abc import Mapping

from mesh import ir
from mesh.store import kinds
from mesh.store.store import StoreSnapshot
from mesh.translate import addressing, model


def workload(name: str, metadata: Mapping[str, object], labels: Mapping[str, object]
             ) -> tuple[str, str]:
    """(name, kind) of the workload a pod belongs to, as Hubble names it: its controlling
    owner, a ReplicaSet made by a Deployment (named with the pod template's hash) being the
    Deployment; without an owner, the pod itself."""
    owners = metadata.get("ownerReferences")
    for owner in owners if isinstance(owners, list) else []:
        if not isinstance(owner, Mapping) or not owner.get("controller"):
            continue
        kind, owner_name = owner.get("kind"), owner.get("name")
        if not isinstance(kind, str) or not isinstance(owner_name, str):
            continue
        template = labels.get("pod-template-hash")
        if kind == "ReplicaSet" and isinstance(template, str) and \
                owner_name.endswith(f"-{template}"):
            return owner_name[:-len(template) - 1], "Deployment"
        return owner_name, kind
    return name, "Pod"


def translate_directory(snapshot: StoreSnapshot) -> ir.Directory:
    pods = []
    for pod in snapshot.of_kind(kinds.POD):
        status = pod.body.get("status")
        if isinstance(status, Mapping) and status.get("phase") in ("Succeeded", "Failed"):
            continue  # its addresses may be another pod's now
        labels = tuple(sorted(f"{k}={v}" for k, v in (pod.labels or {}).items()
                              if isinstance(k, str) and isinstance(v, str)))
        node = pod.spec.get("nodeName")
        metadata = pod.body.get("metadata")
        owner, kind = workload(pod.name, metadata if isinstance(metadata, Mapping) else {},
                               pod.labels or {})
        for address in model.pod_ips(status):
            pods.append(ir.DirectoryPod(address, pod.namespace, pod.name, labels,
                                        node if isinstance(node, str) else "", owner, kind))
    services = []
    for svc in snapshot.of_kind(kinds.SERVICE):
        raw = svc.spec.get("clusterIPs")
        ips = raw if isinstance(raw, list) else [svc.spec.get("clusterIP")]
        for ip in ips:
            if isinstance(ip, str) and model.is_ip(ip):
                services.append(ir.DirectoryService(ip, svc.namespace, svc.name))
    nodes = set()
    for node in snapshot.of_kind(kinds.NODE):
        for address in addressing.reachable_addresses(node):
            if model.is_ip(address):
                nodes.add(ir.DirectoryNode(address, node.name))
    return ir.Directory(
        tuple(sorted(pods, key=lambda p: (addressing.address_order(p.address), p.namespace,
                                          p.name))),
        tuple(sorted(services, key=lambda s: (addressing.address_order(s.address),
                                              s.namespace, s.name))),
        tuple(sorted(nodes, key=lambda n: (addressing.address_order(n.address), n.name))))
