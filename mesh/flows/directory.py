"""The flows' names for addresses: a sink of the IR's directory (the cluster's pods and
Services by address) and its identities, asked by each flow source for both ends."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from mesh import ir
from mesh.flows.model import Endpoint
from mesh.sinks.sink import Readiness
from mesh.store.objects import ObjectKey

RESERVED_HOST, RESERVED_REMOTE_NODE = "reserved:host", "reserved:remote-node"


class FlowDirectory:
    name = "flows"

    def __init__(self, node: str = "") -> None:
        """`node`: this node's name (its addresses are the host, the others' remote nodes)."""
        self.node = node
        self._nodes: dict[str, str] = {}  # a node's address -> its name
        self._pods: dict[str, ir.DirectoryPod] = {}
        self._services: dict[str, str] = {}  # ClusterIP -> "namespace/name"
        self._identities: dict[str, int] = {}
        self._seen: tuple[ir.Directory, ir.IdentityMap] | None = None

    def apply(self, model: ir.IR) -> None:
        seen = (model.directory, model.identities)
        if seen == self._seen:
            return
        self._seen = seen
        self._pods = {p.address: p for p in model.directory.pods}
        self._services = {s.address: f"{s.namespace}/{s.name}"
                          for s in model.directory.services}
        self._nodes = {n.address: n.name for n in model.directory.nodes}
        self._identities = dict(model.identities.endpoints)

    def readiness(self) -> Mapping[ObjectKey, Readiness]:
        return {}

    async def wait_progress(self) -> None:
        await asyncio.Event().wait()  # nothing here changes an object's readiness

    def endpoint(self, address: str, port: int = 0) -> Endpoint:
        pod = self._pods.get(address)
        if pod is None:
            node = self._nodes.get(address)
            if node is not None:  # Hubble's reserved identities: host 1, remote-node 6
                host = node == self.node
                return Endpoint(address, port, labels=(
                    RESERVED_HOST if host else RESERVED_REMOTE_NODE,),
                    identity=1 if host else 6, node=node)
            return Endpoint(address, port, service=self._services.get(address, ""))
        return Endpoint(address, port, pod.namespace, pod.name, pod.labels,
                        self._identities.get(address, 0), node=pod.node,
                        workload=pod.workload, workload_kind=pod.workload_kind)

    def namespaces(self) -> set[str]:
        """The namespaces of the cluster's pods."""
        return {p.namespace for p in self._pods.values()}

    def service(self, address: str) -> str:
        """The Service whose ClusterIP this is ("namespace/name"), or ""."""
        return self._services.get(address, "")
