"""Kubernetes Events about NetworkPolicies the datapath cannot enforce as written (an IPv6
ipBlock, a policy the agent cannot parse): a NetworkPolicy has no status to say it in, so the
elected leader records a Warning Event on it (`kubectl get events --field-selector
involvedObject.kind=NetworkPolicy`).

One Event per (policy, message), not one per translation or per node: before recording one
the leader looks for it among the policy's Events (a new leader does not repeat its
predecessor's).
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Callable
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
COMPONENT = "mesh-agent"
RETRY = 2.0


def event(problem: ir.PolicyProblem, node: str, now: str) -> dict[str, Any]:
    namespace, _, name = problem.policy.rpartition("/")
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{name}.", "namespace": namespace},
        "involvedObject": {"apiVersion": "networking.k8s.io/v1", "kind": problem.kind,
                           "namespace": namespace, "name": name, "uid": problem.uid},
        "reason": REASON, "message": problem.message[:1024], "type": "Warning",
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": COMPONENT, "reportingInstance": node,
        "firstTimestamp": now, "lastTimestamp": now, "count": 1}


class PolicyEvents:
    """A sink: `apply` takes the IR's policy problems; `run` records an Event for each new
    one of a NetworkPolicy while `allowed()` (leading) says so."""

    name = "policy-events"

    def __init__(self, call: Call, node: str, allowed: Callable[[], bool],
                 election: LeaderElection | None) -> None:
        self.call = call
        self.node = node
        self.allowed = allowed
        self.leadership = election.subscribe() if election is not None else None
        self.desired: set[ir.PolicyProblem] = set()
        self.recorded: set[ir.PolicyProblem] = set()
        self.writes = 0
        self._offered = asyncio.Event()

    def apply(self, model: ir.IR) -> None:
        # NetworkPolicies only: a ClusterNetworkPolicy says it in its status.
        self.desired = {p for p in model.network_policies.problems
                        if p.kind == "NetworkPolicy" and p.uid and "/" in p.policy}
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
                for p in sorted(self.desired - self.recorded, key=lambda p: p.policy):
                    if self.allowed() and not await self._exists(p):
                        await self._record(p)
                    self.recorded.add(p)
            except API_ERRORS as e:
                log.warning("policy events not recorded: retrying", extra={"error": repr(e)})
                await asyncio.sleep(RETRY)
                self._offered.set()

    async def _exists(self, p: ir.PolicyProblem) -> bool:
        namespace = p.policy.rpartition("/")[0]
        selector = urllib.parse.quote(f"involvedObject.uid={p.uid},reason={REASON}")
        code, body = await self.call(
            "GET", f"{EVENTS.collection(namespace)}?fieldSelector={selector}", None)
        if code != 200:
            raise ConnectionError(f"listing events: {code} {api_message(body)}")
        return any(e.get("message") == p.message[:1024] for e in body.get("items") or [])

    async def _record(self, p: ir.PolicyProblem) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = p.policy.rpartition("/")[0]
        code, body = await self.call("POST", EVENTS.collection(namespace),
                                     event(p, self.node, now))
        if code not in (200, 201):
            raise ConnectionError(f"recording an event: {code} {api_message(body)}")
        self.writes += 1
        log.warning("network policy not enforced as written",
                    extra={"policy": p.policy, "problem": p.message})
