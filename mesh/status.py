"""The status sink: each object's `.status`, with `Programmed` from the node's ACKs.

The translator's status says what the configuration means; this adds whether the node's
Envoy runs it. `Programmed` is True only once Envoy ACKed every xDS resource that carries
the object; a NACK puts Envoy's error text in the condition's message. It also stamps
`lastTransitionTime`, keeping the old time while a condition's status does not change, and
writes everything to a file (mode 0600) that `mesh status` reads.
"""

from __future__ import annotations

import copy
import json
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
    out = copy.deepcopy(status)
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
                if isinstance(item, dict):
                    ident = item.get("name") or json.dumps(item.get("parentRef"), sort_keys=True)
                    match = next((x for x in olist if isinstance(x, dict) and (
                        x.get("name") or json.dumps(x.get("parentRef"), sort_keys=True)) == ident),
                        None)
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

    def update(self, snapshot: StoreSnapshot, statuses: Mapping[ObjectKey, dict[str, Any]],
               owned: Owned, acks: Mapping[tuple[str, str], ResourceStatus],
               file_errors: Mapping[str, str], write: bool = True) -> bool:
        """Recompute every status; write the file if anything changed (and `write`).
        Returns whether anything changed."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        new: dict[ObjectKey, dict[str, Any]] = {}
        objects = {o.key: o for o in snapshot}
        for key, status in statuses.items():
            obj = objects.get(key)
            if obj is None:
                continue
            st = with_programmed(obj, status, owned.get(key, set()), acks)
            stamp_transitions(st, self.current.get(key), now)
            new[key] = st
        changed = new != self.current or dict(file_errors) != self.file_errors
        self.current, self.objects, self.file_errors = new, objects, dict(file_errors)
        if changed and write and self.path is not None:
            self.write_document(self.document())
        return changed

    def document(self) -> dict[str, Any]:
        """Every object with its status, as `kubectl get -o json` lists them."""
        items = []
        for key in sorted(self.objects):
            obj = self.objects[key]
            body = {k: v for k, v in obj.body.items() if k != "status"}
            meta = dict(body.get("metadata") or {})
            meta["generation"] = obj.generation
            if obj.namespace:
                meta["namespace"] = obj.namespace
            body["metadata"] = meta
            if key in self.current:
                body["status"] = self.current[key]
            items.append(body)
        return {"apiVersion": "v1", "kind": "List", "items": items,
                "fileErrors": self.file_errors}

    def write_document(self, doc: dict[str, Any]) -> None:
        """Write `doc` (from `document()`) atomically, mode 0600. Safe off the event loop."""
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, default=str)
        tmp.replace(self.path)
