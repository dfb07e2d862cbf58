"""List+watch of one kind, holding its objects as the server has them.

Per kind: list (the collection's resourceVersion), then watch from it with bookmarks; a
watch that ends (timeoutSeconds, a cut connection, a silent one past the client's read
timeout) resumes from the last version seen, without a list; 410 Gone lists again; errors
back off (0.2 s doubling to 5 s). A kind whose resource the server does not have (its CRD is
not installed) is reported once, counted as synced and empty, and looked for again every
`MISSING_RETRY` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any, Protocol

import aiohttp

from mesh.kube.client import HTTP, Gone, NotInstalled
from mesh.kube.resources import STATUS_KINDS, Resource
from mesh.store import kinds
from mesh.store.objects import KubeObject, ObjectError, parse_object

log = logging.getLogger(__name__)
WATCH_TIMEOUT = 300  # seconds the server keeps a watch open (timeoutSeconds)
MISSING_RETRY = 10.0
COALESCE = 0.02  # seconds: watch events within this window reach the store together


def _created(meta: Mapping[str, Any]) -> float:
    ts = meta.get("creationTimestamp")
    try:
        return datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def to_object(raw: Mapping[str, Any], r: Resource) -> KubeObject:
    body = dict(raw)
    # Items of a list carry neither apiVersion nor kind.
    body.setdefault("apiVersion", r.api_version)
    body.setdefault("kind", r.kind)
    obj = parse_object(body, source=f"kubernetes:{r.plural}.{r.group}")
    return replace(obj, created=_created(body.get("metadata") or {}))


class Target(Protocol):
    """Where a watch puts its kind's objects: the store, or a MeshNode follower's own."""

    def replace(self, source: str, objects: Iterable[KubeObject]) -> bool: ...


class KindWatch:
    """One kind's list+watch loop, holding its objects as the server has them."""

    def __init__(self, r: Resource, http: HTTP, store: Target,
                 follow_status: bool = False) -> None:
        self.r = r
        # Whether a change of status alone is a change (a MeshNode is all status); else only
        # what the translator reads is (content versions).
        self.follow_status = follow_status
        self.http = http
        self.store = store
        self.objects: dict[tuple[str, str], KubeObject] = {}
        # The status of the kinds we write status for, kept out of the objects: a status
        # write (ours, echoed by the watch) must not look like a change to translate.
        self.statuses: dict[tuple[str, str], Any] = {}
        self.versions: dict[tuple[str, str], str] = {}  # their resourceVersions
        self._own_status = r.group_kind in STATUS_KINDS
        self.version = ""
        self.synced = asyncio.Event()
        self.lists = 0  # how many times it listed (a resumed watch does not)
        self._reported_missing = False
        self.missing = False  # the last list found no such resource
        self._pending: asyncio.TimerHandle | None = None  # a publish due (coalescing)

    def _publish_soon(self) -> None:
        """Publish within COALESCE seconds: a burst of events (10,000 routes applied at
        once) costs one publish per window, not one per event (each is a pass over the
        kind's objects)."""
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(COALESCE, self._flush)

    def _flush(self) -> None:
        self._pending = None
        self._publish()

    def _publish(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self.store.replace(f"kubernetes:{self.r.plural}.{self.r.group}",
                           list(self.objects.values()))

    async def run(self) -> None:
        backoff = 0.2
        while True:
            try:
                if not self.version:
                    await self._list()
                await self._watch()
                backoff = 0.2
            except Gone:
                log.info("watch expired: listing again", extra={"kind": self.r.kind})
                self.version = ""
            except NotInstalled:
                if not self._reported_missing:
                    log.warning("resource not served (CRD not installed?): retrying",
                                extra={"kind": str(self.r.group_kind)})
                    self._reported_missing = True
                self.missing = True
                self.objects.clear()
                self._publish()
                self.synced.set()
                self.version = ""
                await asyncio.sleep(MISSING_RETRY)
            except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as e:
                log.warning("list/watch failed: backing off", extra={
                    "kind": self.r.kind, "error": repr(e), "seconds": backoff})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _query(self, **extra: str) -> dict[str, str]:
        q = dict(extra)
        if self.r.field_selector:
            q["fieldSelector"] = self.r.field_selector
        return q

    async def _list(self) -> None:
        doc = await self.http.get_json(self.r.path, self._query())
        objects = {}
        self.statuses, self.versions = {}, {}
        for raw in doc.get("items") or []:
            try:
                obj = self._object(raw)
            except ObjectError:
                continue
            objects[(obj.namespace, obj.name)] = obj
        self.objects = objects
        self.version = str((doc.get("metadata") or {}).get("resourceVersion") or "")
        self.lists += 1
        self._publish()
        self.synced.set()
        self._reported_missing = self.missing = False

    async def _watch(self) -> None:
        query = self._query(watch="true", allowWatchBookmarks="true",
                            resourceVersion=self.version, timeoutSeconds=str(WATCH_TIMEOUT))
        async for event in self.http.stream(self.r.path, query):
            if not isinstance(event, dict) or not isinstance(event.get("object") or {}, dict):
                raise ValueError("a watch event that is not an object")  # backs off, resumes
            kind, raw = event.get("type"), event.get("object") or {}
            meta = raw.get("metadata") or {}
            if kind == "ERROR":
                if raw.get("code") == 410:
                    raise Gone()
                raise ValueError(f"watch error: {raw.get('message')}")
            self.version = str(meta.get("resourceVersion") or self.version)
            if kind == "BOOKMARK":
                continue
            try:
                obj = self._object(raw)
            except ObjectError:
                continue
            at = (obj.namespace, obj.name)
            if kind == "DELETED":
                self.statuses.pop(at, None)
                self.versions.pop(at, None)
                if self.objects.pop(at, None) is not None:
                    self._publish_soon()
            else:
                prev = self.objects.get(at)
                self.objects[at] = obj
                if prev is None or prev.version != obj.version or (
                        self.follow_status and prev.body.get("status") != obj.body.get("status")):
                    self._publish_soon()  # not for what the translator cannot see

    def _object(self, raw: Mapping[str, Any]) -> KubeObject:
        if self._own_status:
            raw = dict(raw)
            status = raw.pop("status", None)
            if self.r.group_kind == kinds.GATEWAY and isinstance(status, Mapping) and \
                    status.get("addresses"):
                # The one part of our status the translator reads: the pool addresses the
                # status writer gave (mesh.translate.addressing.published).
                raw["status"] = {"addresses": status["addresses"]}
            obj = to_object(raw, self.r)
            self.statuses[(obj.namespace, obj.name)] = status
            meta = raw.get("metadata")
            if isinstance(meta, Mapping) and meta.get("resourceVersion"):
                self.versions[(obj.namespace, obj.name)] = str(meta["resourceVersion"])
            return obj
        return to_object(raw, self.r)
