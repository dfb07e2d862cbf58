"""The snapshot cache: per node, the resources to serve, a version per type, a hash per resource.

The producer (the agent) calls `set_snapshot` with the full desired set for a node. The cache
works out what changed, bumps the version of each changed type and wakes that node's streams.
It also holds back the removal of clusters until the node's Envoy has ACKed the listeners and
routes that stopped using them (make before break).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from meshxds import types
from meshxds.acks import AckState, AckTracker, ResourceStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resource:
    """One xDS resource, serialized once: the hash is over its deterministic encoding."""

    type_url: str
    name: str
    body: any_pb2.Any
    hash: str
    # Clusters only: True when the cluster takes its endpoints from EDS, so a change to it
    # must be followed by its ClusterLoadAssignment or it stays warming.
    uses_eds: bool = False

    @classmethod
    def of(cls, message: Message) -> Resource:
        type_url = types.type_url_of(message)
        data = message.SerializeToString(deterministic=True)
        uses_eds = (
            type_url == types.CLUSTER
            and message.type == cluster_pb2.Cluster.EDS  # type: ignore[attr-defined]
        )
        return cls(
            type_url=type_url,
            name=types.resource_name(message),
            body=any_pb2.Any(type_url=type_url, value=data),
            hash=hashlib.blake2b(data, digest_size=8).hexdigest(),
            uses_eds=uses_eds,
        )


@dataclass
class TypeSnapshot:
    version: int = 0
    resources: dict[str, Resource] = field(default_factory=dict)

    def hashes(self) -> dict[str, str]:
        return {name: r.hash for name, r in self.resources.items()}


class Subscriber(Protocol):
    """What the cache needs from a live stream (see xds.stream.Stream)."""

    wake: asyncio.Event

    def settled(self, type_url: str) -> bool: ...

    def requested_types(self) -> Iterable[str]: ...


@dataclass
class NodeState:
    node_id: str
    desired: dict[str, dict[str, Resource]] = field(default_factory=dict)
    served: dict[str, TypeSnapshot] = field(
        default_factory=lambda: {t: TypeSnapshot() for t in types.PUSH_ORDER}
    )
    held_clusters: set[str] = field(default_factory=set)
    ready: bool = False  # no stream is answered before the first full snapshot
    streams: set[Subscriber] = field(default_factory=set)
    acks: AckTracker = field(default_factory=AckTracker)
    # What was written to this node's streams, for benchmarks and debugging.
    bytes_sent: int = 0
    responses_sent: dict[str, int] = field(default_factory=dict)  # by type URL
    acks_received: dict[str, int] = field(default_factory=dict)  # responses ACKed, by type URL
    nacks_received: dict[str, int] = field(default_factory=dict)  # ... and NACKed
    _progress: asyncio.Event | None = None

    # -- producer side -------------------------------------------------------------------

    def set_desired(self, resources: Iterable[Resource]) -> list[str]:
        by_type: dict[str, dict[str, Resource]] = {t: {} for t in types.PUSH_ORDER}
        for r in resources:
            if r.type_url not in by_type:
                raise ValueError(f"unsupported resource type {r.type_url}")
            if r.name in by_type[r.type_url]:
                raise ValueError(f"duplicate {types.SHORT_NAMES[r.type_url]} {r.name!r}")
            by_type[r.type_url][r.name] = r
        _add_missing_load_assignments(by_type)
        old_clusters = self.served[types.CLUSTER].resources
        self.held_clusters = (self.held_clusters | (old_clusters.keys() - by_type[types.CLUSTER]))
        self.held_clusters -= by_type[types.CLUSTER].keys()
        self.desired = by_type
        self.ready = True
        changed = self._serve_desired()
        self.release_held_clusters_if_safe()
        self.notify()
        return changed

    def _serve_desired(self) -> list[str]:
        """Serve desired, plus the held clusters and their endpoints. Returns changed types."""
        changed = []
        for type_url in types.PUSH_ORDER:
            new = dict(self.desired[type_url])
            if type_url in (types.CLUSTER, types.ENDPOINT):
                old = self.served[type_url].resources
                new.update({n: old[n] for n in self.held_clusters if n in old})
            snap = self.served[type_url]
            if {n: r.hash for n, r in new.items()} != snap.hashes():
                snap.version += 1
                snap.resources = new
                changed.append(type_url)
        return changed

    def release_held_clusters_if_safe(self) -> None:
        """Drop held clusters once every stream runs listeners and routes that no longer
        need them. A NACKed route keeps them: Envoy still runs the old route."""
        if not self.held_clusters or not self.streams:
            return
        if all(s.settled(types.LISTENER) and s.settled(types.ROUTE) for s in self.streams):
            log.info(
                "removing clusters no longer routed to",
                extra={"node": self.node_id, "clusters": sorted(self.held_clusters)},
            )
            self.held_clusters = set()
            if self._serve_desired():
                self.notify()

    # -- stream side ---------------------------------------------------------------------

    def notify(self) -> None:
        for s in self.streams:
            s.wake.set()

    def progressed(self) -> None:
        """A stream connected, left, or answered: re-check held clusters and wake waiters."""
        self.release_held_clusters_if_safe()
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    def settled(self) -> bool:
        """Envoy runs exactly what we serve: every resource served is ACKed at its current
        content, and every connected stream has ACKed what it asked for. (A resource that
        Envoy never asks for, one no listener or cluster refers to, keeps this false.)"""
        if not self.streams:
            return False
        for type_url, snap in self.served.items():
            for name, r in snap.resources.items():
                if self.acks.get(type_url, name).acked_hash != r.hash:
                    return False
        return all(s.settled(t) for s in self.streams for t in s.requested_types())

    async def wait_settled(self) -> None:
        """Return once settled; callers bound the wait with `asyncio.timeout`."""
        while not self.settled():
            await self.wait_progress()

    async def wait_progress(self) -> None:
        """Return at the next ACK, NACK or stream change of this node."""
        if self._progress is None:
            self._progress = asyncio.Event()
        await self._progress.wait()

    def status(self) -> list[ResourceStatus]:
        out = []
        for type_url in types.PUSH_ORDER:
            snap = self.served[type_url]
            for name, r in sorted(snap.resources.items()):
                out.append(
                    ResourceStatus(
                        node_id=self.node_id,
                        type_url=type_url,
                        name=name,
                        version=str(snap.version),
                        hash=r.hash,
                        ack=self.acks.get(type_url, name),
                    )
                )
        return out


def _add_missing_load_assignments(by_type: dict[str, dict[str, Resource]]) -> None:
    # An EDS cluster with no ClusterLoadAssignment warms forever (initial_fetch_timeout is 0),
    # and with it every listener that routes to it. Serve it empty instead: it answers 503.
    endpoints = by_type[types.ENDPOINT]
    for cluster in by_type[types.CLUSTER].values():
        if cluster.uses_eds and cluster.name not in endpoints:
            cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster.name)
            endpoints[cluster.name] = Resource.of(cla)


class SnapshotCache:
    """Node id -> NodeState. All methods run on the event loop that serves the streams."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeState] = {}

    def node(self, node_id: str) -> NodeState:
        state = self._nodes.get(node_id)
        if state is None:
            state = self._nodes[node_id] = NodeState(node_id)
        return state

    def node_ids(self) -> list[str]:
        return sorted(self._nodes)

    def set_snapshot(self, node_id: str, resources: Iterable[Resource | Message]) -> list[str]:
        """Replace everything served to `node_id`. Returns the type URLs that changed."""
        start = time.perf_counter()
        rs = [r if isinstance(r, Resource) else Resource.of(r) for r in resources]
        node = self.node(node_id)
        changed = node.set_desired(rs)
        log.info(
            "snapshot set",
            extra={
                "node": node_id,
                "resources": len(rs),
                "changed": [types.SHORT_NAMES[t] for t in changed],
                "versions": {types.SHORT_NAMES[t]: s.version for t, s in node.served.items()},
                "ms": round((time.perf_counter() - start) * 1000, 1),
            },
        )
        return changed

    def status(self, node_id: str | None = None) -> list[ResourceStatus]:
        ids = [node_id] if node_id is not None else self.node_ids()
        return [s for n in ids if n in self._nodes for s in self._nodes[n].status()]

    def programmed(self, node_id: str, type_url: str, name: str) -> bool:
        for s in self.status(node_id):
            if s.type_url == type_url and s.name == name:
                return s.state is AckState.ACKED
        return False
