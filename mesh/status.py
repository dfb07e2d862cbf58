"""The status sink: each object's `.status`, with `Programmed` from the node's ACKs.

The translator's status says what the configuration means; this adds whether the node's
Envoy runs it. `Programmed` is True only once Envoy ACKed every xDS resource that carries
the object; a NACK puts Envoy's error text in the condition's message. It also stamps
`lastTransitionTime`, keeping the old time while a condition's status does not change, and
writes everything to a file (mode 0600) that `mesh status` reads.
"""

from __future__ import annotations

import json
import marshal
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mesh.gateway.conditions import condition, put
from mesh.k8s import KubeObject, ObjectKey, StoreSnapshot
from meshxds.acks import AckState, ResourceStatus
from meshxds.types import SHORT_NAMES

Owned = Mapping[ObjectKey, set[tuple[str, str]]]


def programmed(owned: set[tuple[str, str]],
               acks: Mapping[tuple[str, str], ResourceStatus]) -> tuple[bool, str, str]:
    """(status, reason, message) of the Programmed condition for what an object owns."""
    nacked = []
    pending = []
    for key in sorted(owned):
        s = acks.get(key)
        if s is None or s.state is AckState.PENDING:
            pending.append(key)
        elif s.state is AckState.NACKED:
            nacked.append((key, s.ack.nack_message))
    if nacked:
        (type_url, name), message = nacked[0]
        return False, "Invalid", f"Envoy rejected {SHORT_NAMES.get(type_url, type_url)} " \
            f"{name}: {message}"
    if pending:
        type_url, name = pending[0]
        return False, "Pending", f"waiting for Envoy to accept {SHORT_NAMES.get(type_url)} " \
            f"{name}" + (f" and {len(pending) - 1} more" if len(pending) > 1 else "")
    return True, "Programmed", "Envoy runs the configuration"


def with_programmed(obj: KubeObject, status: dict[str, Any], owned: set[tuple[str, str]],
                    acks: Mapping[tuple[str, str], ResourceStatus]) -> dict[str, Any]:
    out: dict[str, Any] = marshal.loads(marshal.dumps(status))  # a deep copy, in C
    ok, reason, message = programmed(owned, acks)
    gen = obj.generation
    if obj.kind in ("Gateway", "ListenerSet", "XListenerSet"):
        conds = out.setdefault("conditions", [])
        current = next((c for c in conds if c["type"] == "Programmed"), None)
        # The translator may already have said why it cannot be programmed (no address).
        if current is None:
            put(conds, condition("Programmed", ok, reason, message, gen))
        for li in out.get("listeners", []):
            valid = any(c["type"] == "Accepted" and c["status"] == "True"
                        for c in li["conditions"])
            if not valid and any(c["type"] == "Programmed" for c in li["conditions"]):
                continue  # the translator said why (a conflict)
            put(li["conditions"], condition(
                "Programmed", ok and valid, reason if valid else "Invalid",
                message if valid else "listener not accepted", gen))
    elif obj.kind in ("HTTPRoute", "GRPCRoute", "TLSRoute"):
        for parent in out.get("parents", []):
            accepted = any(c["type"] == "Accepted" and c["status"] == "True"
                           for c in parent["conditions"])
            if accepted:
                put(parent["conditions"], condition("Programmed", ok, reason, message, gen))
    return out


def _ident(item: Mapping[str, Any]) -> Any:
    ref = item.get("parentRef") or item.get("ancestorRef")
    return item.get("name") or (tuple(sorted(ref.items())) if isinstance(ref, dict) else None)


def stamp_transitions(new: dict[str, Any], old: dict[str, Any] | None, now: str) -> None:
    """Set lastTransitionTime on every condition list in `new`, from `old` when unchanged."""
    def walk(n: Any, o: Any) -> None:
        if isinstance(n, dict):
            for k, v in n.items():
                walk(v, o.get(k) if isinstance(o, dict) else None)
                if k == "conditions" and isinstance(v, list):
                    prev = {c.get("type"): c for c in (o.get(k) or [])} if isinstance(
                        o, dict) else {}
                    for c in v:
                        p = prev.get(c["type"])
                        c["lastTransitionTime"] = p["lastTransitionTime"] if p and p.get(
                            "status") == c["status"] and "lastTransitionTime" in p else now
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


class StatusSink:
    """Keeps the last status of every object and writes them to `path`."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.current: dict[ObjectKey, dict[str, Any]] = {}
        self.objects: dict[ObjectKey, KubeObject] = {}
        self.file_errors: dict[str, str] = {}
        # Per object: the inputs of its last status (the translator's status object and
        # the Programmed triple), so an unchanged object costs a lookup, not a rebuild.
        self._inputs: dict[ObjectKey, tuple[dict[str, Any], tuple[bool, str, str]]] = {}
        self._items: dict[ObjectKey, tuple[KubeObject, dict[str, Any], str]] = {}

    def update(self, snapshot: StoreSnapshot, statuses: Mapping[ObjectKey, dict[str, Any]],
               owned: Owned, acks: Mapping[tuple[str, str], ResourceStatus],
               file_errors: Mapping[str, str], write: bool = True) -> bool:
        """Recompute every status; write the file if anything changed (and `write`).
        Returns whether anything changed."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        new: dict[ObjectKey, dict[str, Any]] = {}
        inputs: dict[ObjectKey, tuple[dict[str, Any], tuple[bool, str, str]]] = {}
        objects = {o.key: o for o in snapshot}
        changed = dict(file_errors) != self.file_errors or objects.keys() != self.objects.keys()
        for key, status in statuses.items():
            obj = objects.get(key)
            if obj is None:
                continue
            triple = programmed(owned.get(key, set()), acks)
            last = self._inputs.get(key)
            if last is not None and last[0] is status and last[1][0] and \
                    triple[1] == "Pending":
                # The object did not change and Envoy runs it; what Envoy is about to take
                # is someone else's change to a resource they share (a route table). At
                # 10,000 routes one change must not flip 10,000 conditions back and forth.
                triple = last[1]
            inputs[key] = (status, triple)
            if last is not None and last[0] is status and last[1] == triple \
                    and key in self.current:
                new[key] = self.current[key]
                continue
            st = with_programmed(obj, status, owned.get(key, set()), acks)
            stamp_transitions(st, self.current.get(key), now)
            changed = changed or st != self.current.get(key)
            new[key] = st
        changed = changed or new.keys() != self.current.keys()
        self.current, self.objects, self.file_errors = new, objects, dict(file_errors)
        self._inputs = inputs
        if changed and write and self.path is not None:
            self.write_text(self.serialize())
        return changed

    def serialize(self) -> str:
        """Every object with its status, as `kubectl get -o json` lists them, as JSON text.
        Each object's text is kept and redone only when the object or its status changed:
        10,000 routes do not cost 10,000 encodings a change."""
        parts = []
        cache: dict[ObjectKey, tuple[KubeObject, dict[str, Any], str]] = {}
        for key in sorted(self.objects):
            obj = self.objects[key]
            status = self.current.get(key, {})
            hit = self._items.get(key)
            if hit is not None and hit[0] is obj and hit[1] is status:
                text = hit[2]
            else:
                body = {k: v for k, v in obj.body.items() if k != "status"}
                meta = dict(body.get("metadata") or {})
                meta["generation"] = obj.generation
                if obj.namespace:
                    meta["namespace"] = obj.namespace
                body["metadata"] = meta
                if status:
                    body["status"] = status
                text = json.dumps(body, default=str)
            cache[key] = (obj, status, text)
            parts.append(text)
        self._items = cache
        return '{"apiVersion": "v1", "kind": "List", "items": [' + ", ".join(parts) + \
            '], "fileErrors": ' + json.dumps(self.file_errors) + "}"

    def write_text(self, text: str) -> None:
        """Write `serialize()`'s text atomically, mode 0600. Plain I/O: fine on a thread."""
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        tmp.replace(self.path)
