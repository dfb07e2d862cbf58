"""The Kubernetes provider: list+watch of every kind the store holds (mesh/kube/watch.py),
into the same store the file provider fills. The API client it reads through is opened and
closed by the agent (mesh/kube/client.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mesh.kube.client import HTTP
from mesh.kube.resources import resources
from mesh.kube.watch import KindWatch
from mesh.store.objects import ObjectKey
from mesh.store.store import Store

log = logging.getLogger(__name__)


class KubernetesProvider:
    """Every kind's watch, and `synced` once each has listed (or was found missing) once."""

    def __init__(self, http: HTTP, store: Store, node_name: str | None) -> None:
        self.http = http
        self.watches = [KindWatch(r, http, store) for r in resources(node_name)]
        self._by_kind = {w.r.group_kind: w for w in self.watches}
        self.synced = asyncio.Event()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for w in self.watches:
                tg.create_task(w.run(), name=f"watch-{w.r.plural}")
            await asyncio.gather(*(w.synced.wait() for w in self.watches))
            self.synced.set()
            log.info("kubernetes synced", extra={"kinds": len(self.watches)})

    def status(self) -> dict[str, str]:
        """Per kind: "synced" (listed at least once), "not installed" (the server has no such
        resource: counted as synced, empty, looked for again) or "listing"."""
        return {str(w.r.group_kind): "not installed" if w.missing else
                "synced" if w.synced.is_set() else "listing" for w in self.watches}

    def server_status(self, key: ObjectKey) -> tuple[Any, str | None]:
        """An object's status and resourceVersion as the watch last saw them (kinds we write
        status for)."""
        w = self._by_kind.get(key.group_kind)
        if w is None:
            return None, None
        at = (key.namespace, key.name)
        return w.statuses.get(at), w.versions.get(at)
