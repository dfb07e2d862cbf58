"""Status written back to the Kubernetes API: the status subresource of each object whose
status changed, by the elected leader only.

Only a change is written: statuses are compared without `lastTransitionTime` (the time moves
only when a condition does, but a status whose conditions did not change is not written
again for it). A write is one request when the watch has seen the object: our status merged
onto the status the watch saw, sent with the resourceVersion it saw; the server refuses it
(409) if the object changed since, and only then is it read. A condition that did not change
keeps the server's time. A route's `parents` and a policy's `ancestors` entries of other
controllers are kept as the server has them: we own only ours. A 409 Conflict (someone wrote
the object since we read it) is retried: the object is read again, our status applied on the
fresh version, written again. A 404 is confirmed by a read before the write is dropped: the
cache may be behind the server. Leadership is checked before every write, so a leader that
lost its Lease stops at once, even in the middle of a round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from mesh.kube.client import API_ERRORS, Call, api_message
from mesh.kube.leader import LeaderElection, next_round
from mesh.kube.resources import STATUS_KINDS, Resource, resources
from mesh.sinks.status.report import EVENTS, stamp_transitions
from mesh.store.objects import KubeObject, ObjectKey
from mesh.translate.status import Reason

log = logging.getLogger(__name__)
ATTEMPTS = 3
CONCURRENCY = 8  # status writes in flight at once
RETRY_AFTER = 1.0  # seconds after a 429 Too Many Requests
FIRST_STATUS_GRACE = 5.0  # seconds a new object's first status may wait to be Programmed


def comparable(status: Any) -> Any:
    """The status without lastTransitionTime, anywhere in it."""
    if isinstance(status, Mapping):
        return {k: comparable(v) for k, v in status.items() if k != "lastTransitionTime"}
    if isinstance(status, list):
        return [comparable(v) for v in status]
    return status


def _by_kind() -> dict[tuple[str, str], Resource]:
    return {(r.group, r.kind): r for r in resources(None)}


OWNED_LISTS = ("parents", "ancestors")  # entries per controller (controllerName)


def with_foreign(ours: Mapping[str, Any], theirs: Any, controller: str) -> dict[str, Any]:
    """Our status, with the server's entries of other controllers kept in the per-controller
    lists, in the server's order; ours where ours were (else last)."""
    out = dict(ours)
    if not isinstance(theirs, Mapping):
        return out
    for field in OWNED_LISTS:
        if field not in out or not isinstance(theirs.get(field), list):
            continue
        merged: list[Any] = []
        placed = False
        for e in theirs[field]:
            if isinstance(e, Mapping) and e.get("controllerName") != controller:
                merged.append(e)
            elif not placed:  # ours go where ours were: no reordering fight with others
                merged.extend(out[field])
                placed = True
        if not placed:
            merged.extend(out[field])
        out[field] = merged
    return out


class StatusPublisher:
    """Writes statuses through an API client (`call(method, path, body) -> (code, doc)`)."""

    def __init__(self, call: Call,
                 resources: Mapping[tuple[str, str], Resource] | None = None,
                 controller: str = "", allowed: Callable[[], bool] = lambda: True) -> None:
        self.call = call
        # (group, kind) -> its resource; by default every kind the agent reads.
        self.resources = resources if resources is not None else _by_kind()
        self.controller = controller  # our controllerName in route and policy statuses
        self.allowed = allowed  # leading: asked before every write
        self.written: dict[ObjectKey, Any] = {}  # what the server has, as we last wrote it
        # Statuses the server refused as invalid (422, 400): not sent again until they change.
        self.refused: dict[ObjectKey, Any] = {}
        self.writes = 0  # successful writes, for tests and metrics

    async def publish(self, statuses: Mapping[ObjectKey, dict[str, Any]],
                      server_status: Mapping[ObjectKey, Any] | None = None,
                      versions: Mapping[ObjectKey, str] | None = None) -> None:
        """Write each status that differs from what the server holds (`server_status`: as
        the watch last saw it; else what we last wrote), up to CONCURRENCY at a time: 10,000
        routes one after the other would take minutes. `versions`: the resourceVersions the
        watch saw with those statuses (a write is then one request, not a read and a write).
        A failed write fails the round (the caller tries again) once the others have
        finished."""
        due = [(key, status) for key, status in statuses.items()
               if comparable(seen := (server_status or {}).get(key, self.written.get(key)))
               != comparable(want := with_foreign(status, seen, self.controller))
               and self.refused.get(key) != comparable(want)]
        if not due:
            return
        slots = asyncio.Semaphore(CONCURRENCY)

        async def one(key: ObjectKey, status: dict[str, Any]) -> None:
            async with slots:
                if self.allowed():
                    version = (versions or {}).get(key)
                    seen = (server_status or {}).get(key)
                    await self._write(key, status, (seen, version) if version else None)

        results = await asyncio.gather(*(one(k, st) for k, st in due), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _write(self, key: ObjectKey, status: dict[str, Any],
                     known: tuple[Any, str] | None = None) -> None:
        """`known`: the status and resourceVersion the watch saw, tried first without a
        read."""
        r = self.resources.get((key.group, key.kind))
        if r is None:
            return
        path = r.item(key.namespace, key.name)
        for _ in range(ATTEMPTS):
            if known is not None:
                current_status, version = known
                known = None
            else:
                code, current = await self.call("GET", path, None)
                if code == 404:
                    log.info("object gone before its status was written",
                             extra={"object": str(key)})
                    self.written.pop(key, None)
                    return
                if code != 200:
                    raise RuntimeError(f"GET {path}: {code}")
                current_status = current.get("status")
                version = current["metadata"]["resourceVersion"]
            desired = with_foreign(status, current_status, self.controller)
            if comparable(current_status) == comparable(desired):
                self.written[key] = desired
                return  # the server has it already
            stamp_transitions(desired, current_status, None)
            body = {"apiVersion": r.api_version, "kind": r.kind,
                    "metadata": {"name": key.name, "namespace": key.namespace or None,
                                 "resourceVersion": version},
                    "status": desired}
            if not self.allowed():
                return
            code, answer = await self.call("PUT", path + "/status", body)
            if code == 200:
                self.written[key] = desired
                self.refused.pop(key, None)
                self.writes += 1
                return
            if code == 404:
                continue  # read again: gone, or a cache behind the server
            if code in (400, 422):
                # Ours is invalid for the server (a CRD's bounds): say it once, keep the rest
                # going, try again only when the status changes.
                log.warning("status refused by the API server", extra={
                    "object": str(key), "code": code,
                    "error": api_message(answer, 500)})
                self.refused[key] = comparable(with_foreign(status, current_status,
                                                            self.controller))
                return
            if code == 429:
                await asyncio.sleep(RETRY_AFTER)  # the server's flow control: slow down
                continue
            if code != 409:
                raise RuntimeError(f"PUT {path}/status: {code}")
            log.info("status conflict: read again and retry", extra={"object": str(key)})
        # The round fails, and the writer tries again a second later: never dropped.
        raise RuntimeError(f"{key}: status not written after {ATTEMPTS} attempts (conflicts, "
                           "throttling)")


def _pending(status: Any) -> bool:
    """Whether a status says Programmed False, Pending (waiting for the nodes) anywhere."""
    if isinstance(status, Mapping):
        conds = status.get("conditions")
        if isinstance(conds, list) and any(
                isinstance(c, Mapping) and c.get("type") == "Programmed" and
                c.get("reason") == Reason.PENDING for c in conds):
            return True
        return any(_pending(v) for k, v in status.items() if k != "conditions")
    if isinstance(status, list):
        return any(_pending(v) for v in status)
    return False


class KubernetesStatusWriter:
    """The pipeline's status writer in Kubernetes mode: `write` (on the status thread) hands
    the latest statuses over to `run` (on the loop), which publishes them while this agent
    leads, and again whenever it starts leading.

    An object the server has no status for yet, whose status waits for the nodes
    (Programmed: Pending), is written after up to FIRST_STATUS_GRACE seconds, or as soon as
    it is programmed: a new route is then written once, programmed, rather than twice (at
    10,000 routes applied at once, that halves the status writes).

    A round looks only at the objects whose status changed (the report hands over the same
    status object while it does not) or whose resourceVersion the watch saw move (someone
    wrote it, our own writes included) since they were last found in line with the server:
    at 10,000 routes one change costs a pass of identity checks on the loop, not 10,000 deep
    comparisons."""

    def __init__(self, publisher: StatusPublisher,
                 server: Callable[[ObjectKey], tuple[Any, str | None]],
                 election: LeaderElection | None) -> None:
        self.publisher = publisher
        # The object's status and resourceVersion as the watch last saw them.
        self.server = server
        # Set on each flip of leadership; None: no election, this agent always leads.
        self.leadership = election.subscribe() if election is not None else None
        self._latest: dict[ObjectKey, dict[str, Any]] | None = None
        self._offered = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first_pending: dict[ObjectKey, float] = {}  # new objects held back, since
        self._wake: asyncio.TimerHandle | None = None
        # Per object last found in line with the server: (its status, the server's version).
        self._checked: dict[ObjectKey, tuple[dict[str, Any], str | None]] = {}

    def write(self, objects: Mapping[ObjectKey, KubeObject],
              statuses: Mapping[ObjectKey, dict[str, Any]], errors: Mapping[str, str]) -> None:
        # Events (an Ingress's refused annotations) are not written: the status file shows them.
        ours = {k: st if EVENTS not in st else {f: v for f, v in st.items() if f != EVENTS}
                for k, st in statuses.items() if k.group_kind in STATUS_KINDS}
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._take, ours)

    def _take(self, statuses: dict[ObjectKey, dict[str, Any]]) -> None:
        self._latest = statuses
        self._offered.set()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            if await next_round(self._offered, self.leadership):
                # What we hold was made while following (this node's Programmed alone): the
                # pipeline's next round, merged, is what a leader writes.
                self._latest, self._checked = None, {}
            if self._latest is None or not self.publisher.allowed():
                continue
            latest = self._latest
            server = {}
            for k, st in latest.items():
                state = self.server(k)
                checked = self._checked.get(k)
                if checked is None or checked[0] is not st or checked[1] != state[1]:
                    server[k] = state
            if len(self._checked) > len(latest):  # objects gone
                self._checked = {k: v for k, v in self._checked.items() if k in latest}
            due = self._due({k: latest[k] for k in server}, server)
            try:
                await self.publisher.publish(
                    due, {k: server[k][0] for k in due},
                    {k: v for k in due if (v := server[k][1])})
                for k in due:
                    self._checked[k] = (due[k], server[k][1])
            except API_ERRORS as e:
                log.warning("status write failed: retrying", extra={"error": repr(e)})
                await asyncio.sleep(1.0)
                self._offered.set()

    def _due(self, latest: dict[ObjectKey, dict[str, Any]],
             server: Mapping[ObjectKey, tuple[Any, str | None]]) -> dict[ObjectKey, dict[str, Any]]:
        """The statuses to write now: all but new objects still within their grace; the
        round is offered again when the first grace ends."""
        now = time.monotonic()
        out = {}
        wake: float | None = None
        held = {}
        for key, status in latest.items():
            if server[key][0] is None and key not in self.publisher.written and \
                    _pending(status):
                since = held[key] = self._first_pending.get(key, now)
                if now - since < FIRST_STATUS_GRACE:
                    wake = since + FIRST_STATUS_GRACE if wake is None else \
                        min(wake, since + FIRST_STATUS_GRACE)
                    continue
            out[key] = status
        self._first_pending = held
        if wake is not None and self._loop is not None:
            if self._wake is not None:
                self._wake.cancel()
            self._wake = self._loop.call_later(wake - now, self._offered.set)
        return out
