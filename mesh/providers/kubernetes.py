"""The Kubernetes provider: list+watch of every kind the store holds, into the same store
the file provider fills.

Client: `kubernetes_asyncio` (asyncio, on aiohttp, like the agent), for configuration (in
cluster or a kubeconfig), authentication and TLS; the list and watch requests go through its
`ApiClient.call_api` unparsed, so one loop serves every kind, core and custom, without a
generated model per kind.

Per kind: list (the collection's resourceVersion), then watch from it with bookmarks; a
watch that ends (timeoutSeconds, a cut connection, a silent one past the client's read
timeout) resumes from the last version seen, without a list; 410 Gone lists again; errors
back off (0.2 s doubling to 5 s). A kind whose resource the server does not have (its CRD is
not installed) is reported once, counted as synced and empty, and looked for again every
`MISSING_RETRY` seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from mesh.store import kinds
from mesh.store.kinds import GroupKind
from mesh.store.objects import KubeObject, ObjectError, ObjectKey, parse_object
from mesh.store.store import Store

if TYPE_CHECKING:
    from mesh.agent.leader import LeaseConfig

log = logging.getLogger(__name__)
WATCH_TIMEOUT = 300  # seconds the server keeps a watch open (timeoutSeconds)
READ_TIMEOUT = 90  # a watch silent this long (no event, no bookmark) is dead: reconnect
MISSING_RETRY = 10.0
COALESCE = 0.02  # seconds: watch events within this window reach the store together


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    field_selector: str | None = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def path(self) -> str:
        """The collection over every namespace (list and watch)."""
        return self.collection("")

    def collection(self, namespace: str) -> str:
        """The collection in one namespace (create); "" or a cluster-scoped kind: all."""
        base = f"/apis/{self.api_version}" if self.group else f"/api/{self.version}"
        ns = f"/namespaces/{namespace}" if namespace and self.namespaced else ""
        return f"{base}{ns}/{self.plural}"

    def item(self, namespace: str, name: str) -> str:
        """One object (get, replace; + "/status" for the status subresource)."""
        return f"{self.collection(namespace)}/{name}"

    @property
    def group_kind(self) -> GroupKind:
        return GroupKind(self.group, self.kind)


MESH_NODE = Resource("mesh.dev", "v1alpha1", "meshnodes", "MeshNode", namespaced=False)
LEASE = Resource("coordination.k8s.io", "v1", "leases", "Lease")
NODES = Resource("", "v1", "nodes", "Node", namespaced=False)


def resources(node_name: str | None) -> list[Resource]:
    """Every kind the store holds; this node's Pods only."""
    pods = f"spec.nodeName={node_name}" if node_name else None
    out = [
        Resource("", "v1", "namespaces", "Namespace", namespaced=False),
        Resource("", "v1", "services", "Service"),
        Resource("", "v1", "secrets", "Secret"),
        Resource("", "v1", "configmaps", "ConfigMap"),
        NODES,
        Resource("", "v1", "pods", "Pod", field_selector=pods),
        Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
        Resource("networking.k8s.io", "v1", "ingresses", "Ingress"),
        Resource("networking.k8s.io", "v1", "ingressclasses", "IngressClass", namespaced=False),
        Resource("gateway.networking.k8s.io", "v1", "gatewayclasses", "GatewayClass",
                 namespaced=False),
        Resource("gateway.networking.k8s.io", "v1", "gateways", "Gateway"),
        Resource("gateway.networking.k8s.io", "v1", "listenersets", "ListenerSet"),
        Resource("gateway.networking.x-k8s.io", "v1alpha1", "xlistenersets", "XListenerSet"),
        Resource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute"),
        Resource("gateway.networking.k8s.io", "v1", "grpcroutes", "GRPCRoute"),
        Resource("gateway.networking.k8s.io", "v1alpha2", "tlsroutes", "TLSRoute"),
        Resource("gateway.networking.k8s.io", "v1beta1", "referencegrants", "ReferenceGrant"),
        Resource("gateway.networking.k8s.io", "v1", "backendtlspolicies", "BackendTLSPolicy"),
        Resource("gateway.networking.x-k8s.io", "v1alpha1", "xbackendtrafficpolicies",
                 "XBackendTrafficPolicy"),
        Resource("mesh.dev", "v1alpha1", "trafficpolicies", "TrafficPolicy"),
    ]
    missing = kinds.KINDS - {r.group_kind for r in out}
    assert not missing, f"kinds the store holds without a resource to watch: {missing}"
    return out


# The kinds whose status the leader writes (each has a status subresource); the translator
# gives status to nothing else that the API would take (an IngressClass has no status).
STATUS_KINDS = frozenset({
    kinds.GATEWAY_CLASS, kinds.GATEWAY, kinds.LISTENER_SET, kinds.X_LISTENER_SET,
    kinds.HTTP_ROUTE, kinds.GRPC_ROUTE, kinds.TLS_ROUTE, kinds.BACKEND_TLS_POLICY,
    kinds.X_BACKEND_TRAFFIC_POLICY, kinds.TRAFFIC_POLICY, kinds.INGRESS})


def cluster_rules() -> list[dict[str, list[str]]]:
    """The cluster-wide RBAC rules the agent needs, exactly: list+watch of every kind it
    reads, get + update of the status of the kinds it writes status for (it reads an object
    again before a write and after a conflict), and MeshNodes (get, create and update of the
    status, which each agent does for its own node's only, though RBAC cannot say "own";
    the leader lists and watches them all). The chart's ClusterRole is
    checked against this in tests/test_chart.py."""
    rules: list[dict[str, list[str]]] = []
    by_group: dict[str, list[str]] = {}
    for r in resources(None):
        by_group.setdefault(r.group, []).append(r.plural)
    for group, plurals in sorted(by_group.items()):
        rules.append({"apiGroups": [group], "resources": sorted(plurals),
                      "verbs": ["list", "watch"]})
    status: dict[str, list[str]] = {}
    for r in resources(None):
        if r.group_kind in STATUS_KINDS:
            status.setdefault(r.group, []).append(r.plural)
    for group, plurals in sorted(status.items()):
        rules.append({"apiGroups": [group], "resources": sorted(plurals), "verbs": ["get"]})
        rules.append({"apiGroups": [group], "resources": sorted(f"{p}/status" for p in plurals),
                      "verbs": ["update"]})
    rules.append({"apiGroups": [MESH_NODE.group], "resources": [MESH_NODE.plural],
                  "verbs": ["get", "list", "watch", "create"]})
    rules.append({"apiGroups": [MESH_NODE.group], "resources": [f"{MESH_NODE.plural}/status"],
                  "verbs": ["update"]})
    return rules


def namespace_rules() -> list[dict[str, list[str]]]:
    """The rules in the agent's own namespace: the leader election's Lease."""
    return [{"apiGroups": [LEASE.group], "resources": [LEASE.plural],
             "verbs": ["get", "create", "update"]}]


# What a request to the API server may end in besides an answer: the network's errors, and a
# body of the wrong shape (a proxy's error page, a truncated object). The writers' loops log
# these and try again; nothing the server says may end the agent.
API_ERRORS = (OSError, TimeoutError, aiohttp.ClientError, RuntimeError, ValueError, KeyError,
              TypeError, AttributeError)


class Gone(Exception):
    """410: the version to resume from is too old: list again."""


class NotInstalled(Exception):
    """404 on the collection: the server has no such resource (its CRD is missing)."""


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
        self.statuses = {}
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
            obj = to_object(raw, self.r)
            self.statuses[(obj.namespace, obj.name)] = status
            return obj
        return to_object(raw, self.r)


class HTTP:
    """The API server's HTTP, through kubernetes_asyncio's client (auth, TLS)."""

    def __init__(self, api: Any) -> None:
        self.api = api  # kubernetes_asyncio.client.ApiClient

    async def _call(self, path: str, query: dict[str, str], read_timeout: float) -> Any:
        resp = await self._request(path, query, read_timeout)
        if resp.status < 400:
            return resp
        text = (await resp.read())[:500].decode(errors="replace")
        resp.release()
        if resp.status == 404:
            raise NotInstalled()
        if resp.status == 410:
            raise Gone()
        raise ValueError(f"{path}: {resp.status} {text}")

    async def _request(self, path: str, query: dict[str, str], read_timeout: float) -> Any:
        # Unparsed (_preload_content=False): the client hands the response back whatever
        # its status; `_call` reads the status.
        return await self.api.call_api(
            path, "GET", query_params=list(query.items()), auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=read_timeout))

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One JSON request: (status code, the decoded body or None). For the writers (status,
        MeshNode, the Lease), which decide per code what to do."""
        resp = await self.api.call_api(
            path, method, auth_settings=["BearerToken"], body=body,
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=30))
        try:
            text = await resp.read()
        finally:
            resp.release()
        try:
            return resp.status, json.loads(text) if text else None
        except ValueError:
            return resp.status, None

    async def get_json(self, path: str, query: dict[str, str]) -> dict[str, Any]:
        resp = await self._call(path, query, 60)
        try:
            data = json.loads(await resp.read())
        finally:
            resp.release()
        if not isinstance(data, dict):
            raise ValueError("not a list")
        return data

    async def stream(self, path: str, query: dict[str, str]) -> Any:
        resp = await self._call(path, query, READ_TIMEOUT)
        try:
            async for line in resp.content:
                if line.strip():
                    yield json.loads(line)
        finally:
            resp.release()


class KubernetesProvider:
    """Every kind's watch, and `synced` once each has listed (or was found missing) once."""

    def __init__(self, api: Any, store: Store, node_name: str | None) -> None:
        http = HTTP(api)
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

    def server_status(self, key: ObjectKey) -> Any:
        """An object's status as the watch last saw it (kinds we write status for)."""
        w = self._by_kind.get(key.group_kind)
        return None if w is None else w.statuses.get((key.namespace, key.name))


class KubernetesSource:
    """The provider with its client: configuration loaded (a kubeconfig, or in-cluster), the
    client opened for as long as the agent runs, and what writes back through it: status
    (the leader's, elected on a Lease when `lease` is given, else this agent's alone), this
    node's MeshNode, and the watch on every node's for the leader's merge."""

    def __init__(self, store: Store, node_name: str, kubeconfig: str | None,
                 lease: LeaseConfig | None = None, controller: str = "",
                 identity: str | None = None) -> None:
        from mesh.agent.leader import LeaderElection
        from mesh.sinks.status.kubernetes import KubernetesStatusWriter, StatusPublisher
        from mesh.sinks.status.nodes import ClusterStatus, NodeReporter, NodeWatch

        self.store = store
        self.node_name = node_name
        self.kubeconfig = kubeconfig
        self.synced = asyncio.Event()
        self.provider: KubernetesProvider | None = None
        self._http: HTTP | None = None
        self._opened = asyncio.Event()
        self.election = LeaderElection(self.call, lease) if lease is not None else None
        self.reporter = NodeReporter(self.call, node_name, identity or node_name)
        self.node_watch = NodeWatch(node_name)
        self.cluster = ClusterStatus(
            node_name, self.reporter, self.node_watch, self.leading,
            self.election.subscribe() if self.election is not None else None)
        by_kind = {(r.group, r.kind): r for r in resources(None)}
        self.status_writer = KubernetesStatusWriter(
            StatusPublisher(self.call, by_kind, controller, self.cluster.may_write),
            self._server_status, self.election.subscribe() if self.election is not None else None)

    def leading(self) -> bool:
        """Whether this agent writes status: the Lease's holder (or alone, with no Lease)."""
        return self.election.leading if self.election is not None else True

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        await self._opened.wait()
        assert self._http is not None
        return await self._http.call(method, path, body)

    def _server_status(self, key: ObjectKey) -> Any:
        return self.provider.server_status(key) if self.provider is not None else None

    def health(self) -> dict[str, Any]:
        return {"synced": self.provider.status() if self.provider is not None else {},
                "leader": self.election.status() if self.election is not None else None,
                "meshNodeWrites": self.reporter.writes}

    async def run(self) -> None:
        from kubernetes_asyncio import config
        from kubernetes_asyncio.client import ApiClient, Configuration

        cfg = Configuration()
        if self.kubeconfig is not None:
            await config.load_kube_config(config_file=self.kubeconfig,
                                          client_configuration=cfg)
        else:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        async with ApiClient(cfg) as api:
            self.provider = KubernetesProvider(api, self.store, self.node_name)
            http = self._http = self.provider.http
            self._opened.set()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.provider.run(), name="kubernetes-provider")
                tg.create_task(self.status_writer.run(), name="kubernetes-status")
                tg.create_task(self.reporter.run(), name="meshnode-reporter")
                tg.create_task(self.node_watch.run(
                    lambda nw: KindWatch(MESH_NODE, http, nw, follow_status=True)),
                    name="meshnode-watch")
                if self.election is not None:
                    tg.create_task(self.election.run(), name="leader-election")
                await self.provider.synced.wait()
                self.synced.set()
