"""The objects generated for Gateways (mesh/ir/infrastructure.py), kept in the cluster by the
elected leader: a sink of the IR, written like status, by one agent.

Server-side apply (field manager `mesh-gateway-controller`): what we stop saying (an
annotation the Gateway no longer lists) is removed, fields others own are left alone. Only a
change is applied. A Service no longer wanted is deleted with its EndpointSlice; on taking
the lead, the leader lists what carries our managed-by label and deletes what it would not
generate (a Gateway deleted meanwhile is the garbage collector's: both are owned by it). A
Service whose loadBalancerClass must change (it cannot be changed) is deleted and made again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from mesh import ir
from mesh.kube.client import API_ERRORS, Call, api_message
from mesh.kube.leader import LeaderElection, next_round
from mesh.kube.resources import ENDPOINT_SLICES, SERVICES
from mesh.sinks.sink import Readiness
from mesh.store.objects import ObjectKey
from mesh.translate.gateway.infrastructure import MANAGED_BY_LABEL

log = logging.getLogger(__name__)
FIELD_MANAGER = "mesh-gateway-controller"
SLICE_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
RETRY = 1.0  # seconds after a failed round

# A server-side apply: (path with its query, object) -> (status code, the answer).
Apply = Callable[[str, dict[str, Any]], Awaitable[tuple[int, Any]]]
APPLY_QUERY = f"?fieldManager={FIELD_MANAGER}&force=true"


def _owner(gs: ir.GatewayService) -> list[dict[str, Any]]:
    if not gs.gateway_uid:
        return []
    return [{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
             "name": gs.gateway, "uid": gs.gateway_uid, "controller": True}]


def service(gs: ir.GatewayService) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": "LoadBalancer",
        "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol, "targetPort": p.port}
                  for p in gs.ports]}
    if gs.load_balancer_class is not None:
        spec["loadBalancerClass"] = gs.load_balancer_class
        # Nothing sends to node ports: the pool's address is routed to the nodes.
        spec["allocateLoadBalancerNodePorts"] = False
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": gs.name, "namespace": gs.namespace, "labels": dict(gs.labels),
                         "annotations": dict(gs.annotations), "ownerReferences": _owner(gs)},
            "spec": spec}


def service_status(gs: ir.GatewayService) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": gs.name, "namespace": gs.namespace},
            "status": {"loadBalancer": {"ingress": [{"ip": a} for a in gs.ingress]}}}


def _endpoint_address(address: str) -> bool:
    """What the API takes as an endpoint (not loopback, link-local or multicast)."""
    ip = ipaddress.ip_address(address)
    return ip.version == 4 and not (ip.is_loopback or ip.is_link_local or ip.is_multicast)


def endpoint_slice(gs: ir.GatewayService) -> dict[str, Any]:
    manager = dict(gs.labels)[MANAGED_BY_LABEL]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": gs.name, "namespace": gs.namespace,
                         "labels": {"kubernetes.io/service-name": gs.name,
                                    SLICE_MANAGED_BY: manager, MANAGED_BY_LABEL: manager},
                         "ownerReferences": _owner(gs)},
            "addressType": "IPv4",
            "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol}
                      for p in gs.ports],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}}
                          for a in gs.endpoints if _endpoint_address(a)]}


class GatewayServiceWriter:
    """A sink: `apply` (on the loop) takes the IR's generated objects; `run` keeps them in
    the cluster while `allowed()` (leading) says so."""

    name = "gateway-services"

    def __init__(self, call: Call, apply: Apply, allowed: Callable[[], bool],
                 election: LeaderElection | None, managed_by: str) -> None:
        """`managed_by`: the label value of our objects (`infrastructure.managed_by` of the
        controller name): what the pruning looks for."""
        self.call = call
        self.managed_by = managed_by
        self.server_apply = apply
        self.allowed = allowed
        self.leadership = election.subscribe() if election is not None else None
        self.desired: dict[tuple[str, str], ir.GatewayService] | None = None
        self.applied: dict[tuple[str, str], ir.GatewayService] = {}
        self.pruned = False  # what an earlier leader left has been looked for
        self.writes = 0  # objects applied or deleted, for tests and metrics
        self._offered = asyncio.Event()

    # -- the sink -----------------------------------------------------------------------------

    def apply(self, model: ir.IR) -> None:
        self.desired = {(gs.namespace, gs.name): gs for gs in model.gateway_services}
        self._offered.set()

    def readiness(self) -> dict[ObjectKey, Readiness]:
        return {}  # a Gateway is served whether or not its Service exists yet

    async def wait_progress(self) -> None:
        await asyncio.Event().wait()  # never: nothing here changes a readiness

    # -- the component ------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            if await next_round(self._offered, self.leadership):
                self.applied, self.pruned = {}, False  # another leader may have changed them
            if self.desired is None or not self.allowed():
                continue
            try:
                await self.reconcile(self.desired)
            except API_ERRORS as e:
                log.warning("gateway services not written: retrying", extra={"error": repr(e)})
                await asyncio.sleep(RETRY)
                self._offered.set()

    async def reconcile(self, desired: dict[tuple[str, str], ir.GatewayService]) -> None:
        if not self.pruned:
            for key in await self._ours():
                if key not in desired:
                    await self._delete(*key)
            self.pruned = True
        for key, gs in desired.items():
            if self.applied.get(key) != gs and self.allowed():
                await self._apply(gs)
                self.applied[key] = gs
        for key in [k for k in self.applied if k not in desired]:
            if self.allowed():
                await self._delete(*key)
                del self.applied[key]

    async def _ours(self) -> list[tuple[str, str]]:
        selector = urllib.parse.quote(f"{MANAGED_BY_LABEL}={self.managed_by}")
        code, doc = await self.call("GET", f"{SERVICES.path}?labelSelector={selector}", None)
        if code != 200:
            raise RuntimeError(f"listing the generated Services: {code}")
        return [(i["metadata"]["namespace"], i["metadata"]["name"])
                for i in (doc or {}).get("items") or []]

    async def _apply(self, gs: ir.GatewayService) -> None:
        path = SERVICES.item(gs.namespace, gs.name)
        code, answer = await self.server_apply(path + APPLY_QUERY, service(gs))
        if code == 422 and "loadBalancerClass" in str(answer):
            # The class cannot change (the mode did): make it again.
            await self._delete(gs.namespace, gs.name)
            code, answer = await self.server_apply(path + APPLY_QUERY, service(gs))
        if code == 404:
            return  # its namespace is going away
        if code not in (200, 201):
            raise RuntimeError(f"applying Service {gs.namespace}/{gs.name}: {code} "
                               f"{api_message(answer)}")
        if gs.load_balancer_class is not None:
            code, answer = await self.server_apply(path + "/status" + APPLY_QUERY,
                                                   service_status(gs))
            if code != 200:
                raise RuntimeError(f"the status of Service {gs.namespace}/{gs.name}: {code}")
        code, answer = await self.server_apply(
            ENDPOINT_SLICES.item(gs.namespace, gs.name) + APPLY_QUERY, endpoint_slice(gs))
        if code not in (200, 201):
            raise RuntimeError(f"applying EndpointSlice {gs.namespace}/{gs.name}: {code} "
                               f"{api_message(answer)}")
        self.writes += 1
        log.info("gateway service applied", extra={
            "service": f"{gs.namespace}/{gs.name}", "ports": [p.name for p in gs.ports],
            "endpoints": list(gs.endpoints)})

    async def _delete(self, namespace: str, name: str) -> None:
        for path in (SERVICES.item(namespace, name), ENDPOINT_SLICES.item(namespace, name)):
            code, _ = await self.call("DELETE", path, None)
            if code not in (200, 202, 404):
                raise RuntimeError(f"deleting {path}: {code}")
        self.writes += 1
        log.info("gateway service deleted", extra={"service": f"{namespace}/{name}"})
