"""A test double of the Kubernetes API server's protocol, for the Kubernetes provider's tests.

No kube-apiserver can be installed on these machines (none on PyPI, npm or Debian), so the
provider is tested against this: an aiohttp server that keeps objects in memory and speaks
the parts of the API a controller uses, as the API server does:

- list (`GET .../{plural}`) with the collection's `resourceVersion`, `labelSelector`
  (=, ==, !=, `key`, `!key`, `in`, `notin`) and `fieldSelector` (metadata.name,
  metadata.namespace and any dotted field, = and !=);
- watch (`?watch=true`) from a `resourceVersion`: newline-delimited JSON events ADDED,
  MODIFIED, DELETED, BOOKMARK (with `allowWatchBookmarks`), ERROR 410 Expired when the version
  is older than the retained history (`compact()` drops it), `timeoutSeconds`; tests can cut
  every watch mid-stream (`cut_watches()`);
- get, create (POST), replace (PUT, 409 Conflict on a stale `metadata.resourceVersion`),
  delete; the `status` subresource (PUT .../status: only the status changes, same 409);
- `metadata.generation` bumped only on spec changes, and only for kinds that have one (not
  Services, ConfigMaps, Secrets, Namespaces, Nodes, Leases, EndpointSlices);
- Leases (coordination.k8s.io) like any object, with optimistic concurrency: what leader
  election needs.

Resource versions are one counter for the whole server, as etcd's revision.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

# (group, version, plural) -> (kind, namespaced, has generation)
RESOURCES: dict[tuple[str, str, str], tuple[str, bool, bool]] = {
    ("", "v1", "namespaces"): ("Namespace", False, False),
    ("", "v1", "services"): ("Service", True, False),
    ("", "v1", "secrets"): ("Secret", True, False),
    ("", "v1", "configmaps"): ("ConfigMap", True, False),
    ("", "v1", "nodes"): ("Node", False, False),
    ("", "v1", "pods"): ("Pod", True, False),
    ("discovery.k8s.io", "v1", "endpointslices"): ("EndpointSlice", True, False),
    ("networking.k8s.io", "v1", "ingresses"): ("Ingress", True, True),
    ("networking.k8s.io", "v1", "ingressclasses"): ("IngressClass", False, True),
    ("coordination.k8s.io", "v1", "leases"): ("Lease", True, False),
    ("gateway.networking.k8s.io", "v1", "gatewayclasses"): ("GatewayClass", False, True),
    ("gateway.networking.k8s.io", "v1", "gateways"): ("Gateway", True, True),
    ("gateway.networking.k8s.io", "v1", "httproutes"): ("HTTPRoute", True, True),
    ("gateway.networking.k8s.io", "v1", "grpcroutes"): ("GRPCRoute", True, True),
    ("gateway.networking.k8s.io", "v1beta1", "referencegrants"): ("ReferenceGrant", True, True),
    ("mesh.dev", "v1alpha1", "trafficpolicies"): ("TrafficPolicy", True, True),
    ("mesh.dev", "v1alpha1", "meshnodes"): ("MeshNode", False, True),
}
HISTORY = 10_000  # events kept for watches to resume from
BOOKMARK_EVERY = 1.0  # seconds


@dataclass
class _Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    has_generation: bool
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    oldest: int = 0  # watches from before this version get 410

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


def _status(code: int, reason: str, message: str) -> web.Response:
    return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                              "reason": reason, "message": message, "code": code},
                             status=code)


def _field(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return "" if value is None else str(value)


_SET = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


def label_selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    for term in _split_selector(selector):
        term = term.strip()
        if m := _SET.match(term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (op == "in") != (labels.get(key) in values) or (op == "in" and key not in labels):
                return False
        elif "!=" in term:
            key, value = (x.strip() for x in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (x.strip() for x in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_selector_matches(selector: str, obj: Mapping[str, Any]) -> bool:
    for term in (t.strip() for t in selector.split(",") if t.strip()):
        if "!=" in term:
            path, value = term.split("!=", 1)
            if _field(obj, path.strip()) == value.strip():
                return False
        else:
            path, value = term.replace("==", "=").split("=", 1)
            if _field(obj, path.strip()) != value.strip():
                return False
    return True


class FakeAPIServer:
    def __init__(self) -> None:
        self.resources = {key: _Resource(*key, *spec) for key, spec in RESOURCES.items()}
        self.revision = 1
        self._watches: dict[int, web.Request] = {}  # id() -> a watch's request
        self._changed = asyncio.Condition()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.app = web.Application()
        r = self.app.router
        for prefix in ("/api/{version}", "/apis/{group}/{version}"):
            r.add_get(prefix + "/{plural}", self._collection)
            r.add_get(prefix + "/namespaces/{namespace}/{plural}", self._collection)
            r.add_post(prefix + "/{plural}", self._create)
            r.add_post(prefix + "/namespaces/{namespace}/{plural}", self._create)
            for item in (prefix + "/{plural}/{name}",
                         prefix + "/namespaces/{namespace}/{plural}/{name}"):
                r.add_get(item, self._get)
                r.add_put(item, self._replace)
                r.add_delete(item, self._delete)
                r.add_put(item + "/status", self._replace_status)
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.port = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        self._closing = True
        await self.cut_watches()
        await self._notify()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- what tests do ----------------------------------------------------------------------

    def resource(self, group: str, plural: str) -> _Resource:
        return next(r for (g, _, p), r in self.resources.items() if g == group and p == plural)

    async def put_object(self, group: str, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object as a client would (generation and versions as the
        server sets them)."""
        res = self.resource(group, plural)
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace", "") if res.namespaced else "", meta["name"])
        status = obj.get("status")
        if key in res.objects:
            meta["resourceVersion"] = res.objects[key]["metadata"]["resourceVersion"]
            out = self._write(res, key, obj, status_only=False)
        else:
            out = self._write(res, key, obj, status_only=False, create=True)
        if status is not None and out.get("status") != status:
            out = self._write(res, key, {"metadata": {}, "status": status}, status_only=True)
        return out

    async def delete_object(self, group: str, plural: str, namespace: str, name: str) -> None:
        res = self.resource(group, plural)
        self._remove(res, (namespace if res.namespaced else "", name))

    def compact(self) -> None:
        """Forget the event history: a watch from any earlier version gets 410 Gone."""
        for res in self.resources.values():
            res.events.clear()
            res.oldest = self.revision

    async def cut_watches(self) -> None:
        """Close every watch connection mid-stream, as a dying load balancer would."""
        for request in list(self._watches.values()):
            if request.transport is not None:
                request.transport.abort()
        self._watches.clear()
        await self._notify()

    # -- storage ------------------------------------------------------------------------------

    def _bump(self) -> int:
        self.revision += 1
        return self.revision

    def _record(self, res: _Resource, kind: str, obj: dict[str, Any]) -> None:
        res.events.append((int(obj["metadata"]["resourceVersion"]), kind, copy.deepcopy(obj)))
        if len(res.events) > HISTORY:
            dropped = res.events[: len(res.events) - HISTORY]
            del res.events[: len(dropped)]
            res.oldest = dropped[-1][0]
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _write(self, res: _Resource, key: tuple[str, str], obj: dict[str, Any],
               status_only: bool, create: bool = False) -> dict[str, Any]:
        old = res.objects.get(key)
        meta = obj.setdefault("metadata", {})
        if create:
            if old is not None:
                raise web.HTTPConflict(text="exists")
            new = copy.deepcopy(obj)
            new["apiVersion"], new["kind"] = res.api_version, res.kind
            new["metadata"]["uid"] = f"uid-{self.revision + 1}"
            new["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
            if res.has_generation:
                new["metadata"]["generation"] = 1
            new.pop("status", None)  # the status subresource's to write
        else:
            if old is None:
                raise web.HTTPNotFound()
            given = meta.get("resourceVersion")
            if given is not None and given != old["metadata"]["resourceVersion"]:
                raise web.HTTPConflict(text="stale resourceVersion")
            new = copy.deepcopy(old)
            if status_only:
                new["status"] = copy.deepcopy(obj.get("status"))
            else:
                keep_status = old.get("status")
                new = copy.deepcopy(obj)
                new["apiVersion"], new["kind"] = res.api_version, res.kind
                for k in ("uid", "creationTimestamp", "generation"):
                    if k in old["metadata"]:
                        new["metadata"][k] = old["metadata"][k]
                if keep_status is not None:
                    new["status"] = keep_status
                if res.has_generation and new.get("spec") != old.get("spec"):
                    new["metadata"]["generation"] = old["metadata"]["generation"] + 1
            if new == old:
                return old  # no change: no new version, no event
        new["metadata"]["resourceVersion"] = str(self._bump())
        res.objects[key] = new
        self._record(res, "ADDED" if old is None else "MODIFIED", new)
        return new

    def _remove(self, res: _Resource, key: tuple[str, str]) -> dict[str, Any]:
        old = res.objects.pop(key, None)
        if old is None:
            raise web.HTTPNotFound()
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._bump())
        self._record(res, "DELETED", gone)
        return gone

    # -- handlers -------------------------------------------------------------------------

    def _res(self, request: web.Request) -> _Resource:
        m = request.match_info
        res = self.resources.get((m.get("group", ""), m["version"], m["plural"]))
        if res is None:
            raise web.HTTPNotFound(text=f"the server could not find the requested resource "
                                        f"({request.path})")
        return res

    def _key(self, res: _Resource, request: web.Request) -> tuple[str, str]:
        return (request.match_info.get("namespace", "") if res.namespaced else "",
                request.match_info["name"])

    def _selected(self, res: _Resource, request: web.Request, obj: Mapping[str, Any]) -> bool:
        ns = request.match_info.get("namespace")
        meta = obj.get("metadata") or {}
        if ns is not None and meta.get("namespace") != ns:
            return False
        labels = request.query.get("labelSelector")
        if labels and not label_selector_matches(labels, meta.get("labels") or {}):
            return False
        fields = request.query.get("fieldSelector")
        return not fields or field_selector_matches(fields, obj)

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        res = self._res(request)
        if request.query.get("watch") in ("1", "true"):
            return await self._watch(res, request)
        items = [o for _, o in sorted(res.objects.items()) if self._selected(res, request, o)]
        return web.json_response({
            "kind": f"{res.kind}List", "apiVersion": res.api_version,
            "metadata": {"resourceVersion": str(self.revision)}, "items": items})

    async def _watch(self, res: _Resource, request: web.Request) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or self.revision)
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        bookmarks = request.query.get("allowWatchBookmarks") in ("1", "true")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        self._watches[id(request)] = request
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            if since < res.oldest:
                await self._send(resp, "ERROR", {
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "Expired", "code": 410,
                    "message": f"too old resource version: {since} ({res.oldest})"})
                return resp
            last_bookmark = loop.time()
            while loop.time() < deadline and not self._closing:
                if request.transport is None or request.transport.is_closing():
                    break  # the client went away, or the test cut the connection
                for rv, kind, obj in [e for e in res.events if e[0] > since]:
                    since = rv
                    if self._selected(res, request, obj):
                        await self._send(resp, kind, obj)
                if bookmarks and loop.time() - last_bookmark >= BOOKMARK_EVERY:
                    last_bookmark = loop.time()
                    since = max(since, self.revision)
                    await self._send(resp, "BOOKMARK", {
                        "kind": res.kind, "apiVersion": res.api_version,
                        "metadata": {"resourceVersion": str(since)}})
                async with self._changed:
                    try:
                        await asyncio.wait_for(self._changed.wait(),
                                               min(BOOKMARK_EVERY, deadline - loop.time()))
                    except TimeoutError:
                        pass
            return resp
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        finally:
            self._watches.pop(id(request), None)

    @staticmethod
    async def _send(resp: web.StreamResponse, kind: str, obj: Mapping[str, Any]) -> None:
        await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

    async def _get(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path_qs))
        res = self._res(request)
        obj = res.objects.get(self._key(res, request))
        if obj is None:
            return _status(404, "NotFound", f"{res.plural} {request.match_info['name']} not "
                                            "found")
        return web.json_response(obj)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="not JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="not an object")
        return body

    async def _create(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path_qs))
        res = self._res(request)
        body = await self._body(request)
        meta = body.setdefault("metadata", {})
        if res.namespaced:
            meta["namespace"] = request.match_info.get("namespace", meta.get("namespace", ""))
        key = (meta.get("namespace", "") if res.namespaced else "", meta.get("name", ""))
        if key in res.objects:
            return _status(409, "AlreadyExists", f"{res.plural} {key[1]} already exists")
        return web.json_response(self._write(res, key, body, False, create=True), status=201)

    async def _replace(self, request: web.Request, status_only: bool = False) -> web.Response:
        self.requests.append((request.method, request.path_qs))
        res = self._res(request)
        key = self._key(res, request)
        body = await self._body(request)
        try:
            return web.json_response(self._write(res, key, body, status_only))
        except web.HTTPConflict:
            return _status(409, "Conflict", f"Operation cannot be fulfilled on {res.plural} "
                           f"\"{key[1]}\": the object has been modified; please apply your "
                           "changes to the latest version and try again")
        except web.HTTPNotFound:
            return _status(404, "NotFound", f"{res.plural} {key[1]} not found")

    async def _replace_status(self, request: web.Request) -> web.Response:
        return await self._replace(request, status_only=True)

    async def _delete(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path_qs))
        res = self._res(request)
        key = self._key(res, request)
        if key not in res.objects:
            return _status(404, "NotFound", f"{res.plural} {key[1]} not found")
        return web.json_response(self._remove(res, key))


GW = "gateway.networking.k8s.io"


class BackgroundAPI:
    """The double on an event loop of its own thread; tests call into it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.api = FakeAPIServer()
        self.url = self.call(self.api.start())

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def put(self, group: str, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self.call(self.api.put_object(group, plural, obj))
        return out

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for `mesh run --kubeconfig` that points at the double."""
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}))
        return path

    def gateway_and_echo(self, echo_port: int, *addresses: str) -> None:
        """Our GatewayClass, a Gateway `default/gw` with an HTTP listener on 8080 (on
        `addresses`, else as the agent's --gateway-addresses says) and a Service `echo` whose
        one endpoint is 127.0.0.1:`echo_port`."""
        self.put(GW, "gatewayclasses", {"metadata": {"name": "mesh"}, "spec": {
            "controllerName": "mesh.dev/gateway-controller"}})
        self.put(GW, "gateways", {"metadata": {"name": "gw", "namespace": "default"}, "spec": {
            "gatewayClassName": "mesh",
            "addresses": [{"type": "IPAddress", "value": a} for a in addresses],
            "listeners": [{"name": "http", "port": 8080, "protocol": "HTTP"}]}})
        self.put("", "services", {"metadata": {"name": "echo", "namespace": "default"},
                                  "spec": {"ports": [{"name": "http", "port": 80}]}})
        self.put("discovery.k8s.io", "endpointslices", {
            "metadata": {"name": "echo-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": echo_port}],
            "endpoints": [{"addresses": ["127.0.0.1"]}]})

    def stop(self) -> None:
        self.call(self.api.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
