"""Each object's `.status`: the translator's, plus `Programmed` from the sinks' readiness.

`Programmed` is True only once every sink runs what carries the object; a failure puts the
sink's error text (Envoy's NACK) in the condition's message. `lastTransitionTime` keeps the
old time while a condition's status does not change.

Readiness comes from this node's sinks, and from the readiness sources besides them: in
Kubernetes mode, every node's, which the leader merges (mesh/kube/meshnodes.py), so that
Programmed says the whole cluster runs an object.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from mesh.sinks.sink import READY, Readiness, State, combine
from mesh.store.kinds import NODE
from mesh.store.objects import KubeObject, ObjectKey
from mesh.store.store import StoreSnapshot
from mesh.translate.status import IngressStatus, ObjectStatus, Reason, with_programmed

# The key under which a status carries Event-like warnings that the API's status has no place
# for (an Ingress's annotations refused): writers take it out and show it beside the status.
EVENTS = "@events"
Readinesses = list[Mapping[ObjectKey, Readiness]]  # one mapping per sink


class ReadinessView(Protocol):
    """One status round's look at a readiness source: taken on the loop, read on the status
    thread."""

    def readiness(self, snapshot: StoreSnapshot, keys: Collection[ObjectKey],
                  local: Readinesses) -> Readinesses | None:
        """The readiness Programmed is made of this round, given the readiness so far
        (`local`: this node's sinks', or what an earlier source made of it); None: that
        readiness as it is."""


class ReadinessSource(Protocol):
    """Readiness besides this node's sinks', which the report reads at every round."""

    def view(self) -> ReadinessView:
        """On the loop: what this round reads of it (the report runs on the status thread)."""

    async def wait_progress(self) -> None:
        """Return when its readiness may have changed."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def programmed(r: Readiness) -> tuple[bool, str, str]:
    """(status, reason, message) of the Programmed condition for a readiness."""
    if r.state is State.FAILED:
        return False, Reason.INVALID, r.message
    if r.state is State.PENDING:
        return False, Reason.PENDING, r.message
    return True, Reason.PROGRAMMED, "Envoy runs the configuration"


def _ident(item: Mapping[str, Any]) -> Any:
    ref = item.get("parentRef") or item.get("ancestorRef")
    return item.get("name") or (tuple(sorted(ref.items())) if isinstance(ref, dict) else None)


def stamp_transitions(new: dict[str, Any], old: dict[str, Any] | None, now: str | None) -> None:
    """Set lastTransitionTime on every condition list in `new`, from `old` when unchanged
    (else `now`; None: the condition's own)."""
    def walk(n: Any, o: Any) -> None:
        if isinstance(n, dict):
            for k, v in n.items():
                walk(v, o.get(k) if isinstance(o, dict) else None)
                if k == "conditions" and isinstance(v, list):
                    prev = {c.get("type"): c for c in (o.get(k) or [])} if isinstance(
                        o, dict) else {}
                    for c in v:
                        p = prev.get(c["type"])
                        if p and p.get("status") == c["status"] and \
                                "lastTransitionTime" in p:
                            c["lastTransitionTime"] = p["lastTransitionTime"]
                        elif now is not None:
                            c["lastTransitionTime"] = now
        elif isinstance(n, list):
            olist = o if isinstance(o, list) else []
            for i, item in enumerate(n):
                # Match list items by name where they have one (listeners, parents).
                match = None
                if olist and isinstance(item, dict):
                    ident = _ident(item)
                    match = next((x for x in olist if isinstance(x, dict) and
                                  _ident(x) == ident), None)
                walk(item, match if match is not None else (olist[i] if i < len(olist)
                                                            else None))

    walk(new, old)


@dataclass(frozen=True)
class _Inputs:
    """What one object's last status was made of: unchanged inputs, unchanged status."""

    version: str
    status: ObjectStatus
    readiness: Readiness


class StatusReport:
    """The last status of every object, recomputed from the translator's status and the
    sinks' readiness. Pure data in and out: the writer does the I/O."""

    def __init__(self, clock: Callable[[], str] = _now) -> None:
        self._clock = clock
        self.current: dict[ObjectKey, dict[str, Any]] = {}
        self.objects: dict[ObjectKey, KubeObject] = {}
        self.errors: dict[str, str] = {}
        self._inputs: dict[ObjectKey, _Inputs] = {}
        self._sourced = False  # whether the last round's readiness was a source's

    def update(self, snapshot: StoreSnapshot, statuses: Mapping[ObjectKey, ObjectStatus],
               readiness: Readinesses, sources: Sequence[ReadinessView] = ()) -> bool:
        """Recompute every status. Returns whether anything changed, or whether it must be
        written anyway: at the first round on a source's readiness (a node that starts
        leading), whose writer dropped what it held before."""
        sourced = False
        for source in sources:
            theirs = source.readiness(snapshot, statuses.keys(), readiness)
            if theirs is not None:
                readiness, sourced = theirs, True
        forced = sourced and not self._sourced
        self._sourced = sourced
        now = self._clock()
        new: dict[ObjectKey, dict[str, Any]] = {}
        inputs: dict[ObjectKey, _Inputs] = {}
        # The node's own facts (its Node object) are not input anyone wrote: not reported.
        objects = {o.key: o for o in snapshot if o.group_kind != NODE}
        changed = dict(snapshot.errors) != self.errors or objects.keys() != self.objects.keys()
        for key, status in statuses.items():
            obj = objects.get(key)
            if obj is None:
                continue
            r = combine(readiness, key) if readiness else READY
            last = self._inputs.get(key)
            same = last is not None and last.version == obj.version and last.status == status
            if same and last is not None and last.readiness.ready and \
                    r.state is State.PENDING:
                # The object did not change and the node runs it; what a sink is about to
                # take is someone else's change to something they share (a route table).
                # At 10,000 routes one change must not flip 10,000 conditions back and forth.
                r = last.readiness
            inputs[key] = _Inputs(obj.version, status, r)
            if same and last is not None and last.readiness == r and key in self.current:
                new[key] = self.current[key]
                continue
            st = with_programmed(status, *programmed(r), obj.generation).to_kubernetes()
            if isinstance(status, IngressStatus) and status.warnings:
                # Not part of the API's status: the writers show them beside it (Events).
                st[EVENTS] = status.events()
            stamp_transitions(st, self.current.get(key), now)
            changed = changed or st != self.current.get(key)
            new[key] = st
        changed = changed or new.keys() != self.current.keys()
        self.current, self.objects, self.errors = new, objects, dict(snapshot.errors)
        self._inputs = inputs
        return changed or forced
