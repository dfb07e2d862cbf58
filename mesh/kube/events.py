"""Kubernetes Events about what the agents cannot do as written, on objects that have no status
to say it in, recorded by the elected leader:

- a NetworkPolicy the datapath cannot enforce as written (an IPv6 ipBlock, a policy the agent
  cannot parse): a Warning `NotEnforcedAsWritten` on it (`kubectl get events --field-selector
  involvedObject.kind=NetworkPolicy`);
- a Node whose WireGuard public key is refused (malformed, or the same as another node's): a
  Warning `WireGuardKeyRefused` on the Node (its Events live in the default namespace).

One Event per (object, message), not one per translation or per node: before recording one
the leader looks for it among the object's Events (a new leader does not repeat its
predecessor's).
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mesh import ir
from mesh.kube.client import API_ERRORS, Call, api_message
from mesh.kube.leader import LeaderElection, next_round
from mesh.kube.resources import EVENTS
from mesh.sinks.sink import Readiness
from mesh.store.objects import ObjectKey

log = logging.getLogger(__name__)
REASON = "NotEnforcedAsWritten"
KEY_REASON = "WireGuardKeyRefused"
COMPONENT = "mesh-agent"
RETRY = 2.0


@dataclass(frozen=True)
class Notice:
    """One Warning Event to be: on which object, why."""

    api_version: str
    kind: str
    namespace: str  # "" for a cluster-scoped object
    name: str
    uid: str
    reason: str
    message: str

    @property
    def event_namespace(self) -> str:
        return self.namespace or "default"  # where Kubernetes keeps cluster objects' Events


def notices(model: ir.IR) -> set[Notice]:
    """What the IR says deserves an Event: NetworkPolicies not enforced as written (a
    ClusterNetworkPolicy and a MeshNetworkPolicy say it in their status), Nodes whose key is
    refused."""
    out = set()
    for p in model.network_policies.problems:
        if p.kind == "NetworkPolicy" and p.uid and "/" in p.policy:
            namespace, _, name = p.policy.rpartition("/")
            out.add(Notice("networking.k8s.io/v1", p.kind, namespace, name, p.uid, REASON,
                           p.message))
    for k in model.encryption.problems:
        if k.uid:
            out.add(Notice("v1", "Node", "", k.node, k.uid, KEY_REASON, k.message))
    return out


def event(notice: Notice, node: str, now: str) -> dict[str, Any]:
    involved = {"apiVersion": notice.api_version, "kind": notice.kind, "name": notice.name,
                "uid": notice.uid}
    if notice.namespace:
        involved["namespace"] = notice.namespace
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{notice.name}.", "namespace": notice.event_namespace},
        "involvedObject": involved,
        "reason": notice.reason, "message": notice.message[:1024], "type": "Warning",
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": COMPONENT, "reportingInstance": node,
        "firstTimestamp": now, "lastTimestamp": now, "count": 1}


class PolicyEvents:
    """A sink: `apply` takes the IR's notices (NetworkPolicies, Nodes' keys); `run` records
    an Event for each new one while `allowed()` (leading) says so."""

    name = "policy-events"

    def __init__(self, call: Call, node: str, allowed: Callable[[], bool],
                 election: LeaderElection | None, node_keys: bool = False) -> None:
        """`node_keys`: also the Nodes' refused WireGuard keys (encryption is on)."""
        self.node_keys = node_keys
        self.call = call
        self.node = node
        self.allowed = allowed
        self.leadership = election.subscribe() if election is not None else None
        self.desired: set[Notice] = set()
        self.recorded: set[Notice] = set()
        self.writes = 0
        self._offered = asyncio.Event()

    def apply(self, model: ir.IR) -> None:
        self.desired = {n for n in notices(model) if self.node_keys or n.kind != "Node"}
        self._offered.set()

    def readiness(self) -> dict[ObjectKey, Readiness]:
        return {}

    async def wait_progress(self) -> None:
        await asyncio.Event().wait()  # never: nothing here changes a readiness

    async def run(self) -> None:
        while True:
            if await next_round(self._offered, self.leadership):
                self.recorded = set()  # as a new leader: look again at what is there
            if not self.allowed():
                continue
            try:
                for p in sorted(self.desired - self.recorded,
                                key=lambda p: (p.kind, p.namespace, p.name, p.message)):
                    if self.allowed() and not await self._exists(p):
                        await self._record(p)
                    self.recorded.add(p)
            except API_ERRORS as e:
                log.warning("policy events not recorded: retrying", extra={"error": repr(e)})
                await asyncio.sleep(RETRY)
                self._offered.set()

    async def _exists(self, p: Notice) -> bool:
        selector = urllib.parse.quote(f"involvedObject.uid={p.uid},reason={p.reason}")
        code, body = await self.call(
            "GET", f"{EVENTS.collection(p.event_namespace)}?fieldSelector={selector}", None)
        if code != 200:
            raise ConnectionError(f"listing events: {code} {api_message(body)}")
        return any(e.get("message") == p.message[:1024] for e in body.get("items") or [])

    async def _record(self, p: Notice) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        code, body = await self.call("POST", EVENTS.collection(p.event_namespace),
                                     event(p, self.node, now))
        if code not in (200, 201):
            raise ConnectionError(f"recording an event: {code} {api_message(body)}")
        self.writes += 1
        log.warning("event recorded", extra={"kind": p.kind, "object": (
            f"{p.namespace}/{p.name}" if p.namespace else p.name), "reason": p.reason,
            "problem": p.message})
