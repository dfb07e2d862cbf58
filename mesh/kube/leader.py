"""Leader election on a coordination.k8s.io Lease: one agent per cluster writes status.

As client-go's leaderelection does it: every `retry` seconds a candidate reads the Lease; it
takes it when nobody holds it or when the holder has not renewed for `duration` seconds, as
measured on the candidate's own clock from the moment it saw the record last change (the
holder's timestamps are not trusted: clocks differ between nodes). The leader renews every
`retry` seconds; when it could not renew for `renew_deadline` seconds (< `duration`, so it
stops before anyone can take over: a round is bounded by the time left to the deadline, and
the deadline counts from before the last successful request), or finds another holder, it
stops leading at once. A stop on purpose releases the Lease, so that the next leader need not
wait out the duration.
Writes use the Lease's resourceVersion: two candidates racing for it cannot both win.

`leading` is what the writers look at before each write; `subscribe()` gives each of them an
event set when it flips.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mesh.kube.client import API_ERRORS, Call
from mesh.kube.resources import LEASE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseConfig:
    namespace: str
    identity: str
    name: str = "mesh-status-writer"
    duration: float = 15.0  # seconds without a renewal before others take over
    renew_deadline: float = 10.0  # the leader gives up when it could not renew this long
    retry: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry < self.renew_deadline < self.duration:
            raise ValueError("lease timings need 0 < retry < renew_deadline < duration")


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElection:
    def __init__(self, call: Call, cfg: LeaseConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.call = call
        self.cfg = cfg
        self.clock = clock
        self.leading = False
        self.holder: str | None = None  # who holds the Lease, as last read
        self.transitions = 0  # times this agent started or stopped leading
        self._subscribers: list[asyncio.Event] = []
        self._observed: tuple[Any, ...] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self._renewed_at = 0.0

    def subscribe(self) -> asyncio.Event:
        """An event set on every flip of `leading` (its owner clears it)."""
        event = asyncio.Event()
        self._subscribers.append(event)
        return event

    @property
    def path(self) -> str:
        return LEASE.item(self.cfg.namespace, self.cfg.name)

    def status(self) -> dict[str, Any]:
        return {"leading": self.leading, "holder": self.holder, "identity": self.cfg.identity,
                "lease": f"{self.cfg.namespace}/{self.cfg.name}"}

    def _set(self, leading: bool, why: str) -> None:
        if leading != self.leading:
            self.leading = leading
            self.transitions += 1
            for event in self._subscribers:
                event.set()
            (log.info if leading else log.warning)(
                "leading" if leading else "not leading", extra={
                    "identity": self.cfg.identity, "lease": self.cfg.name, "why": why})

    async def run(self) -> None:
        try:
            while True:
                started = self.clock()
                # A slow API server gets until the deadline (client-go's renewDeadline); a
                # hung one must not keep a leader past it.
                left = self._renewed_at + self.cfg.renew_deadline - started \
                    if self.leading else self.cfg.renew_deadline
                try:
                    async with asyncio.timeout(max(0.05, left)):
                        ok = await self._try()
                except API_ERRORS as e:
                    log.warning("lease request failed", extra={"error": repr(e)})
                    ok = False
                now = self.clock()
                if ok:
                    # From before the request: others measure from when they saw it change,
                    # which is later, so our deadline always comes first.
                    self._renewed_at = started
                    self._set(True, "lease acquired or renewed")
                elif self.leading and (self.holder not in (None, self.cfg.identity) or
                                       now - self._renewed_at >= self.cfg.renew_deadline):
                    self._set(False, "lease lost" if self.holder != self.cfg.identity
                              else "could not renew within the deadline")
                await asyncio.sleep(self.cfg.retry)
        finally:
            if self.leading:
                self._set(False, "stopping")
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._release())

    def _spec(self, transitions: int, acquired: str | None) -> dict[str, Any]:
        now = _micro_time()
        return {"holderIdentity": self.cfg.identity,
                "leaseDurationSeconds": max(1, round(self.cfg.duration)),
                "acquireTime": acquired or now, "renewTime": now,
                "leaseTransitions": transitions}

    async def _try(self) -> bool:
        """One round: True when this agent holds the Lease after it."""
        code, lease = await self.call("GET", self.path, None)
        if code == 404:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.cfg.name, "namespace": self.cfg.namespace},
                    "spec": self._spec(0, None)}
            code, _ = await self.call("POST", LEASE.collection(self.cfg.namespace), body)
            if code in (200, 201):
                self.holder = self.cfg.identity
                return True
            return False
        if code != 200:
            raise RuntimeError(f"GET lease: {code}")
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or None
        self.holder = holder
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        now = self.clock()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or self.cfg.duration)
        if holder not in (None, self.cfg.identity) and now - self._observed_at < duration:
            return False  # held, and renewed recently as far as we have seen
        transitions = int(spec.get("leaseTransitions") or 0)
        acquired = spec.get("acquireTime") if holder == self.cfg.identity else None
        if holder != self.cfg.identity:
            transitions += 1
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.cfg.name, "namespace": self.cfg.namespace,
                             "resourceVersion": lease["metadata"]["resourceVersion"]},
                "spec": self._spec(transitions, acquired)}
        code, _ = await self.call("PUT", self.path, body)
        if code == 200:
            if holder != self.cfg.identity:
                log.info("lease taken", extra={"from": holder, "identity": self.cfg.identity})
            self.holder = self.cfg.identity
            return True
        if code == 409:
            return False  # someone else wrote it first: read again next round
        raise RuntimeError(f"PUT lease: {code}")

    async def _release(self) -> None:
        code, lease = await self.call("GET", self.path, None)
        if code != 200 or (lease.get("spec") or {}).get("holderIdentity") != self.cfg.identity:
            return
        spec = dict(lease["spec"])
        spec.update(holderIdentity=None, leaseDurationSeconds=1, renewTime=_micro_time())
        body = {**lease, "spec": spec}
        await self.call("PUT", self.path, body)
        log.info("lease released", extra={"identity": self.cfg.identity})


async def next_round(offered: asyncio.Event, flipped: asyncio.Event | None) -> bool:
    """A leader-only writer's wait: until there is something to write (`offered`) or the
    leadership flipped (`flipped`, from `subscribe`; None: no election). Clears what it saw;
    True when the leadership flipped, so the writer forgets what it knew of the server."""
    waits = [asyncio.create_task(offered.wait())]
    if flipped is not None:
        waits.append(asyncio.create_task(flipped.wait()))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    offered.clear()
    if flipped is not None and flipped.is_set():
        flipped.clear()
        return True
    return False
