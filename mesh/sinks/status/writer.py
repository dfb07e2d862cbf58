"""Status writers: where each object's status goes. The file (`status.json`, mode 0600, what
`mesh status` reads) always; in Kubernetes mode also the API server's status subresource
(mesh/kube/status.py), by the leader."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from mesh.sinks.status.report import EVENTS
from mesh.store.objects import KubeObject, ObjectKey


class StatusWriter(Protocol):
    def write(self, objects: Mapping[ObjectKey, KubeObject],
              statuses: Mapping[ObjectKey, dict[str, Any]], errors: Mapping[str, str]) -> None:
        """Publish every object's status (blocking I/O: called from a worker thread)."""


class FileStatusWriter:
    """Every object with its status, as `kubectl get -o json` lists them, in one file
    written atomically (mode 0600), plus the input errors per source (`fileErrors`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Per object: the text of its last entry and what it was made of, so 10,000 routes
        # do not cost 10,000 encodings a change.
        self._items: dict[ObjectKey, tuple[str, dict[str, Any], str]] = {}

    def serialize(self, objects: Mapping[ObjectKey, KubeObject],
                  statuses: Mapping[ObjectKey, dict[str, Any]], errors: Mapping[str, str]) -> str:
        parts = []
        cache: dict[ObjectKey, tuple[str, dict[str, Any], str]] = {}
        # Kind first, as `mesh status` lists them (the key itself starts with the group).
        for key in sorted(objects, key=lambda k: (k.kind, k.group, k.namespace, k.name)):
            obj = objects[key]
            status = statuses.get(key, {})
            hit = self._items.get(key)
            if hit is not None and hit[0] == obj.version and hit[1] == status:
                text = hit[2]
            else:
                body = {k: v for k, v in obj.body.items() if k != "status"}
                meta = dict(body.get("metadata") or {})
                meta["generation"] = obj.generation
                if obj.namespace:
                    meta["namespace"] = obj.namespace
                body["metadata"] = meta
                status = dict(status)
                events = status.pop(EVENTS, None)
                if status:
                    body["status"] = status
                if events:
                    body["events"] = events
                text = json.dumps(body, default=str)
            cache[key] = (obj.version, status, text)
            parts.append(text)
        self._items = cache
        return '{"apiVersion": "v1", "kind": "List", "items": [' + ", ".join(parts) + \
            '], "fileErrors": ' + json.dumps(dict(errors)) + "}"

    def write(self, objects: Mapping[ObjectKey, KubeObject],
              statuses: Mapping[ObjectKey, dict[str, Any]], errors: Mapping[str, str]) -> None:
        text = self.serialize(objects, statuses, errors)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        tmp.replace(self.path)


class Writers:
    """Several writers, each given every status (the file, and the API server's)."""

    def __init__(self, *writers: StatusWriter) -> None:
        self.writers = writers

    def write(self, objects: Mapping[ObjectKey, KubeObject],
              statuses: Mapping[ObjectKey, dict[str, Any]], errors: Mapping[str, str]) -> None:
        failed: OSError | None = None
        for w in self.writers:
            try:  # a full disk must not keep status from the API server
                w.write(objects, statuses, errors)
            except OSError as e:
                failed = e
        if failed is not None:
            raise failed
