"""Status written back to the Kubernetes API: the status subresource of each object whose
status changed.

Only a change is written: statuses are compared without `lastTransitionTime` (the time
moves only when a condition does, but a status whose conditions did not change is not
written again for it). A 409 Conflict (someone wrote the object since we read it) is
retried: the object is read again, our status applied on the fresh version, written again.
A 404 is confirmed by a read before the write is dropped: the cache may be behind the
server. Not wired into the agent yet: the leader election that decides who writes comes
with it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from mesh.providers.kubernetes import Resource
from mesh.store.objects import ObjectKey

log = logging.getLogger(__name__)
ATTEMPTS = 3


def comparable(status: Any) -> Any:
    """The status without lastTransitionTime, anywhere in it."""
    if isinstance(status, Mapping):
        return {k: comparable(v) for k, v in status.items() if k != "lastTransitionTime"}
    if isinstance(status, list):
        return [comparable(v) for v in status]
    return status


class StatusPublisher:
    """Writes statuses through an API client (`call(method, path, body) -> (code, doc)`)."""

    def __init__(self, call: Any, resources: Mapping[tuple[str, str], Resource]) -> None:
        self.call = call
        self.resources = resources  # (group, kind) -> its resource
        self.written: dict[ObjectKey, Any] = {}  # what the server has, as we last wrote it
        self.writes = 0  # successful writes, for tests and metrics

    def _path(self, key: ObjectKey) -> str | None:
        r = self.resources.get((key.group, key.kind))
        if r is None:
            return None
        base = f"/apis/{r.group}/{r.version}" if r.group else f"/api/{r.version}"
        ns = f"/namespaces/{key.namespace}" if r.namespaced else ""
        return f"{base}{ns}/{r.plural}/{key.name}"

    async def publish(self, statuses: Mapping[ObjectKey, dict[str, Any]],
                      server_status: Mapping[ObjectKey, Any] | None = None) -> None:
        """Write each status that differs from what the server holds (`server_status`: as
        the watch last saw it; else what we last wrote)."""
        for key, status in statuses.items():
            seen = (server_status or {}).get(key, self.written.get(key))
            if comparable(seen) == comparable(status):
                continue
            await self._write(key, status)

    async def _write(self, key: ObjectKey, status: dict[str, Any]) -> None:
        path = self._path(key)
        if path is None:
            return
        for _ in range(ATTEMPTS):
            code, current = await self.call("GET", path, None)
            if code == 404:
                log.info("object gone before its status was written", extra={"object": str(key)})
                self.written.pop(key, None)
                return
            if code != 200:
                raise RuntimeError(f"GET {path}: {code}")
            if comparable(current.get("status")) == comparable(status):
                self.written[key] = status
                return  # the server has it already
            body = {"apiVersion": current.get("apiVersion"), "kind": current.get("kind"),
                    "metadata": {"name": key.name, "namespace": key.namespace or None,
                                 "resourceVersion": current["metadata"]["resourceVersion"]},
                    "status": status}
            code, _ = await self.call("PUT", path + "/status", body)
            if code == 200:
                self.written[key] = status
                self.writes += 1
                return
            if code == 404:
                continue  # read again: gone, or a cache behind the server
            if code != 409:
                raise RuntimeError(f"PUT {path}/status: {code}")
            log.info("status conflict: read again and retry", extra={"object": str(key)})
        log.warning("status not written after conflicts", extra={"object": str(key)})


def aiohttp_call(session: Any, base: str) -> Any:
    """A `call` for StatusPublisher over an aiohttp session (tests; the agent will use its
    Kubernetes client's)."""
    async def call(method: str, path: str, body: Any) -> tuple[int, Any]:
        async with session.request(method, base + path,
                                   data=None if body is None else json.dumps(body),
                                   headers={"Content-Type": "application/json"}) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None
    return call
