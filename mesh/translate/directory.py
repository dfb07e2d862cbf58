"""Pods and Services by address (mesh/ir/directory.py), pure: each running pod's addresses
with its namespace, name, labels and node; each Service's ClusterIPs. What is not a string
where a string belongs is left out, never guessed."""

from __future__ import annotations

from collections.abc import Mapping

from mesh import ir
from mesh.store import kinds
from mesh.store.store import StoreSnapshot
from mesh.translate import addressing, model


def translate_directory(snapshot: StoreSnapshot) -> ir.Directory:
    pods = []
    for pod in snapshot.of_kind(kinds.POD):
        status = pod.body.get("status")
        if isinstance(status, Mapping) and status.get("phase") in ("Succeeded", "Failed"):
            continue  # its addresses may be another pod's now
        labels = tuple(sorted(f"{k}={v}" for k, v in (pod.labels or {}).items()
                              if isinstance(k, str) and isinstance(v, str)))
        node = pod.spec.get("nodeName")
        for address in model.pod_ips(status):
            pods.append(ir.DirectoryPod(address, pod.namespace, pod.name, labels,
                                        node if isinstance(node, str) else ""))
    services = []
    for svc in snapshot.of_kind(kinds.SERVICE):
        raw = svc.spec.get("clusterIPs")
        ips = raw if isinstance(raw, list) else [svc.spec.get("clusterIP")]
        for ip in ips:
            if isinstance(ip, str) and model.is_ip(ip):
                services.append(ir.DirectoryService(ip, svc.namespace, svc.name))
    return ir.Directory(
        tuple(sorted(pods, key=lambda p: (addressing.address_order(p.address), p.namespace,
                                          p.name))),
        tuple(sorted(services, key=lambda s: (addressing.address_order(s.address),
                                              s.namespace, s.name))))
