"""Security identities made where they are missing: a sink of the IR's `identities.missing`
(label sets of pods that no MeshIdentity holds yet), on every agent, leader or not: whoever
sees a label set first creates its identity. And collected when no pod uses them any more:
the leader deletes an identity that stayed unused for `GRACE` (so that churn, a Deployment's
labels changed every rollout, does not exhaust the 65,280 numbers).

A label set's number is the first of its probing order (mesh/policy/identities.py) that is
free or already holds it. The create is the arbiter: 201, it is ours; 409, someone has that
number, so it is read: the same labels (another node was first) end the search, others
(a collision) move on to the next number. The watch then brings the object to every node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from mesh import ir
from mesh.kube.client import API_ERRORS, Call, NotInstalled, api_message
from mesh.kube.leader import LeaderElection, next_round
from mesh.kube.resources import MESH_IDENTITIES
from mesh.policy import identities as ids
from mesh.sinks.sink import Readiness
from mesh.store.objects import ObjectKey

log = logging.getLogger(__name__)
PATH = MESH_IDENTITIES.path
RETRY = 1.0  # seconds after a failed round
# Seconds after which a label set made here but still missing from the store (the watch is
# behind, or the identity was deleted since) is looked for again.
RECHECK = 30.0
MISSING_RETRY = 10.0  # seconds between looks for the CRD while it is not served
PROBES = 64  # numbers tried per label set in one round (the table is far from full)
# An identity no pod has used for this long is deleted (Cilium collects after 15 minutes);
# a pod with that label set coming back meanwhile keeps it.
GRACE = 600.0
COLLECT_EVERY = 30.0  # seconds between the leader's looks for identities to collect


def identity_object(number: int, labels: ir.Labels) -> dict[str, Any]:
    return {"apiVersion": "mesh.dev/v1alpha1", "kind": "MeshIdentity",
            "metadata": {"name": str(number)}, "spec": {"labels": dict(labels)}}


class IdentityAllocator:
    name = "identities"

    def __init__(self, call: Call) -> None:
        self.call = call
        self.missing: tuple[ir.Labels, ...] = ()
        # Found or created by this agent, for the ones the IR still names: (number, when).
        self.made: dict[ir.Labels, tuple[int, float]] = {}
        self.created = 0  # identities this agent created, for tests and metrics
        self._said_missing = False  # the missing CRD was logged (once, until it is served)
        self._offered = asyncio.Event()

    def apply(self, model: ir.IR) -> None:
        self.missing = model.identities.missing
        if self.missing:
            self._offered.set()

    def readiness(self) -> dict[ObjectKey, Readiness]:
        return {}

    async def wait_progress(self) -> None:
        await asyncio.Event().wait()  # never: nothing here changes a readiness

    async def run(self) -> None:
        while True:
            await self._offered.wait()
            self._offered.clear()
            # Until the watch brings an identity in, the IR still names it missing: what
            # was made already is not asked again for a while.
            now = asyncio.get_running_loop().time()
            self.made = {k: v for k, v in self.made.items()
                         if k in self.missing and now - v[1] < RECHECK}
            for labels in [m for m in self.missing if m not in self.made]:
                try:
                    self.made[labels] = (await self.allocate(labels), now)
                except NotInstalled:
                    if not self._said_missing:
                        log.warning("MeshIdentity is not served (its CRD not installed?): "
                                    "pods get no identity; looking again every "
                                    f"{MISSING_RETRY:.0f} s")
                        self._said_missing = True
                    await asyncio.sleep(MISSING_RETRY)
                    self._offered.set()
                    break
                except API_ERRORS as e:
                    log.warning("identity not allocated: retrying", extra={
                        "labels": ids.labels_key(labels), "error": repr(e)})
                    await asyncio.sleep(RETRY)
                    self._offered.set()
                    break

    async def allocate(self, labels: ir.Labels) -> int:
        """The number of this label set: found or created."""
        key = ids.labels_key(labels)
        for number, _ in zip(ids.candidates(labels), range(PROBES), strict=False):
            code, body = await self.call("POST", PATH, identity_object(number, labels))
            if code == 404:
                raise NotInstalled()
            self._said_missing = False
            if code == 201:
                self.created += 1
                log.info("identity created", extra={"identity": number, "labels": key})
                return number
            if code != 409:
                raise RuntimeError(f"creating identity {number}: {code} {api_message(body)}")
            code, body = await self.call("GET", f"{PATH}/{number}", None)
            if code != 200:  # 404: deleted meanwhile; the next round tries it again
                raise RuntimeError(f"reading identity {number}: {code}")
            theirs = (body or {}).get("spec", {}).get("labels") or {}
            if ids.labels_key(tuple(sorted(theirs.items()))) == key:
                return number
        raise RuntimeError(f"no free identity among {PROBES} numbers for {key}")


class IdentityCollector:
    """A sink of the IR's `identities.unused`: the leader deletes an identity that stayed
    unused for `grace` seconds (clock: `clock`). Following agents only keep time, so that a
    new leader does not wait the whole grace again for identities unused long before."""

    name = "identity-collector"

    def __init__(self, call: Call, allowed: Callable[[], bool],
                 election: LeaderElection | None, grace: float = GRACE,
                 every: float = COLLECT_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.call = call
        self.allowed = allowed
        self.leadership = election.subscribe() if election is not None else None
        self.grace = grace
        self.every = every
        self.clock = clock
        self.unused_since: dict[int, float] = {}
        self.deleted = 0  # identities this agent collected, for tests and metrics
        self._offered = asyncio.Event()

    def apply(self, model: ir.IR) -> None:
        now = self.clock()
        unused = set(model.identities.unused)
        self.unused_since = {n: self.unused_since.get(n, now) for n in unused}
        self._offered.set()

    def readiness(self) -> dict[ObjectKey, Readiness]:
        return {}

    async def wait_progress(self) -> None:
        await asyncio.Event().wait()  # never: nothing here changes a readiness

    def due(self) -> list[int]:
        now = self.clock()
        return sorted(n for n, since in self.unused_since.items() if now - since >= self.grace)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(next_round(self._offered, self.leadership), self.every)
            except TimeoutError:
                pass
            if not self.allowed():
                continue
            for number in self.due():
                if number not in self.unused_since or not self.allowed():
                    continue  # used again since (the IR changed while we deleted)
                try:
                    code, body = await self.call("DELETE", f"{PATH}/{number}", None)
                except API_ERRORS as e:
                    log.warning("identity not collected: retrying", extra={
                        "identity": number, "error": repr(e)})
                    break
                if code in (200, 202, 404):
                    self.unused_since.pop(number, None)
                    self.deleted += code != 404
                    log.info("identity collected", extra={"identity": number})
                else:
                    log.warning("identity not collected", extra={
                        "identity": number, "code": code, "error": api_message(body)})
