"""Who is behind an address, for the flows: the cluster's pods, Services and nodes by
address (sorted), so that a flow names its ends as Hubble's do (namespace, pod, labels,
Service, a node as the host or a remote node) rather than as addresses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DirectoryPod:
    address: str
    namespace: str
    name: str
    labels: tuple[str, ...] = ()  # "key=value", sorted
    node: str = ""
    workload: str = ""  # its controller's name (a ReplicaSet's Deployment), else the pod's
    workload_kind: str = ""  # "Deployment", "StatefulSet", ..., "Pod"


@dataclass(frozen=True)
class DirectoryService:
    address: str  # a ClusterIP
    namespace: str
    name: str


@dataclass(frozen=True)
class DirectoryNode:
    address: str  # one of its Node's addresses (InternalIP, ExternalIP)
    name: str


@dataclass(frozen=True)
class Directory:
    pods: tuple[DirectoryPod, ...] = ()
    services: tuple[DirectoryService, ...] = ()
    nodes: tuple[DirectoryNode, ...] = ()
