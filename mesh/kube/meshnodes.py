"""Programmed over the cluster: each node says what its Envoy runs, the leader merges.

Every agent writes its node's `MeshNode` (mesh.dev/v1alpha1, named after the Node): per
object it carries, the generation its Envoy runs (`programmed`), or why it does not run it
(`pending`: Pending, or Failed with the sink's error text, Envoy's NACK). The leader reads
every MeshNode and decides each object's Programmed: True when every live node runs its
current generation; else the message names the nodes that lag and quotes a refusal. A node
whose heartbeat is older than `STALE_AFTER` is gone (its agent died or the node did) and is
left out, so one dead node does not hold every object back.

The view and the merge are pure (`node_view`, `merge`); `NodeReporter` writes the view,
`NodeWatch` follows everyone's, and `MeshNodes`, the component the agent runs, holds both and
is a readiness source of the status report (mesh/sinks/status/report.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mesh.kube.client import API_ERRORS, HTTP, Call
from mesh.kube.leader import LeaderElection
from mesh.kube.resources import MESH_NODE, NODES
from mesh.kube.watch import KindWatch
from mesh.sinks.sink import READY, Readiness, State, combine
from mesh.store.objects import KubeObject, ObjectKey
from mesh.store.store import StoreSnapshot

log = logging.getLogger(__name__)
HEARTBEAT = 30.0  # seconds between writes of an unchanged view
STALE_AFTER = 3 * HEARTBEAT
MIN_WRITE_INTERVAL = 1.0  # a burst of changes costs one write a second per node
MESSAGE_MAX = 2048  # the CRD's bound on a refusal's text
NODES_NAMED = 5  # nodes named in a message before "and N more"


def key_text(key: ObjectKey) -> str:
    return f"{key.group}/{key.kind}/{key.namespace}/{key.name}"


@dataclass(frozen=True)
class Pending:
    generation: int
    state: State
    message: str = ""


@dataclass(frozen=True)
class NodeView:
    """What one node runs: object -> generation, and what it does not run (yet)."""

    programmed: Mapping[str, int] = field(default_factory=dict)
    pending: Mapping[str, Pending] = field(default_factory=dict)

    def to_status(self) -> dict[str, Any]:
        return {"programmedCount": len(self.programmed), "pendingCount": len(self.pending),
                "programmed": dict(sorted(self.programmed.items())),
                "pending": {k: {"generation": p.generation, "state": p.state.value,
                                "message": p.message[:MESSAGE_MAX]}
                            for k, p in sorted(self.pending.items())}}

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> NodeView:
        """A MeshNode's status as written by some agent: anything malformed is skipped."""
        programmed = {k: v for k, v in (status.get("programmed") or {}).items()
                      if isinstance(k, str) and isinstance(v, int)} \
            if isinstance(status.get("programmed"), Mapping) else {}
        pending: dict[str, Pending] = {}
        raw = status.get("pending")
        for k, v in (raw.items() if isinstance(raw, Mapping) else ()):
            if not isinstance(v, Mapping) or not isinstance(v.get("generation"), int):
                continue
            state = State.FAILED if v.get("state") == State.FAILED.value else State.PENDING
            pending[str(k)] = Pending(v["generation"], state, str(v.get("message") or ""))
        return cls(programmed, pending)


def node_view(snapshot: StoreSnapshot, keys: Iterable[ObjectKey],
              readiness: list[Mapping[ObjectKey, Readiness]]) -> NodeView:
    """This node's view: every object with a status, by its sinks' readiness."""
    programmed: dict[str, int] = {}
    pending: dict[str, Pending] = {}
    for key in keys:
        obj = snapshot.get(key.group_kind, key.namespace, key.name)
        if obj is None:
            continue
        r = combine(readiness, key) if readiness else READY
        if r.ready:
            programmed[key_text(key)] = obj.generation
        else:
            pending[key_text(key)] = Pending(obj.generation, r.state, r.message)
    return NodeView(programmed, pending)


def _names(nodes: list[str]) -> str:
    shown = ", ".join(nodes[:NODES_NAMED])
    return shown + (f" and {len(nodes) - NODES_NAMED} more" if len(nodes) > NODES_NAMED else "")


def merge(key: ObjectKey, generation: int, views: Mapping[str, NodeView]) -> Readiness:
    """One object's readiness over the nodes: Failed if some node refused its generation
    (quoting the first refusal), Pending while some node does not run it yet, else Ready."""
    text = key_text(key)
    refused: list[tuple[str, str]] = []
    lagging: list[str] = []
    for node in sorted(views):
        view = views[node]
        ran = view.programmed.get(text)
        if ran is not None and ran >= generation:
            continue
        p = view.pending.get(text)
        if p is not None and p.state is State.FAILED and p.generation >= generation:
            refused.append((node, p.message))
        else:
            lagging.append(node)
    if refused:
        msg = f"refused on {_names([n for n, _ in refused])}: {refused[0][1]}"
        if lagging:
            msg += f"; not yet programmed on {_names(lagging)}"
        return Readiness(State.FAILED, msg)
    if lagging:
        return Readiness(State.PENDING, f"generation {generation} not yet programmed on "
                         f"{_names(lagging)}")
    return READY


def merged_readiness(snapshot: StoreSnapshot, keys: Iterable[ObjectKey],
                     views: Mapping[str, NodeView]) -> dict[ObjectKey, Readiness]:
    out: dict[ObjectKey, Readiness] = {}
    for key in keys:
        obj = snapshot.get(key.group_kind, key.namespace, key.name)
        if obj is not None:
            out[key] = merge(key, obj.generation, views)
    return out


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class NodeReporter:
    """Writes this node's MeshNode: created once (owned by the Node, so the garbage collector
    removes it with the Node), its status when the view changed, else every HEARTBEAT."""

    def __init__(self, call: Call, node: str, identity: str, heartbeat: float = HEARTBEAT,
                 min_interval: float = MIN_WRITE_INTERVAL) -> None:
        self.call = call
        self.node = node
        self.identity = identity
        self.heartbeat = heartbeat
        self.min_interval = min_interval
        self.writes = 0
        self._view: NodeView | None = None
        self._written: NodeView | None = None
        self._offered = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def offer(self, view: NodeView) -> None:
        """From any thread: the node's latest view."""
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._take, view)

    def _take(self, view: NodeView) -> None:
        self._view = view
        self._offered.set()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        last = 0.0
        while True:
            try:
                async with asyncio.timeout(self.heartbeat):
                    await self._offered.wait()
            except TimeoutError:
                pass
            self._offered.clear()
            await asyncio.sleep(max(0.0, self.min_interval - (time.monotonic() - last)))
            if self._view is None:
                continue
            view = self._view
            if view == self._written and time.monotonic() - last < self.heartbeat:
                continue  # offered again, unchanged: the heartbeat is not due yet
            try:
                await self._write(view)
                self._written = view
                self.writes += 1
            except API_ERRORS as e:
                log.warning("cannot write the MeshNode: retrying", extra={"error": repr(e)})
                self._offered.set()
            last = time.monotonic()

    async def _owner(self) -> list[dict[str, Any]]:
        # A list by name, not a get: the agent's RBAC reads Nodes with list and watch only.
        code, nodes = await self.call(
            "GET", f"{NODES.path}?fieldSelector=metadata.name%3D{self.node}", None)
        items = (nodes.get("items") or []) if code == 200 and isinstance(nodes, dict) else []
        uid = (items[0].get("metadata") or {}).get("uid") if items else None
        if not uid:
            return []  # no Node to own it (a test, a lab): it stays until removed by hand
        return [{"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": uid}]

    async def _write(self, view: NodeView) -> None:
        path = MESH_NODE.item("", self.node)
        for _ in range(3):
            code, current = await self.call("GET", path, None)
            if code == 404:
                body = {"apiVersion": "mesh.dev/v1alpha1", "kind": "MeshNode",
                        "metadata": {"name": self.node, "ownerReferences": await self._owner(),
                                     "labels": {"app.kubernetes.io/part-of": "mesh"}},
                        "spec": {}}
                code, current = await self.call("POST", MESH_NODE.path, body)
                if code not in (200, 201) and code != 409:
                    raise RuntimeError(f"POST MeshNode: {code}")
                continue
            if code != 200:
                raise RuntimeError(f"GET MeshNode: {code}")
            status = {"agent": self.identity, "heartbeatTime": _now_text(), **view.to_status()}
            body = {"apiVersion": "mesh.dev/v1alpha1", "kind": "MeshNode",
                    "metadata": {"name": self.node,
                                 "resourceVersion": current["metadata"]["resourceVersion"]},
                    "status": status}
            code, _ = await self.call("PUT", path + "/status", body)
            if code == 200:
                return
            if code not in (404, 409):
                raise RuntimeError(f"PUT MeshNode status: {code}")
        raise RuntimeError("MeshNode kept changing under us")


class NodeWatch:
    """Every node's MeshNode, followed by list+watch (the leader's input for the merge). Not
    the store: a MeshNode is all status, which the store does not count as a change."""

    def __init__(self, own: str, http: HTTP,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.own = own
        self.http = http
        self.clock = clock
        self.objects: list[KubeObject] = []
        self.revision = 0
        self.synced = asyncio.Event()  # listed once: the merge may start
        self._changed = asyncio.Event()
        # When each node's status last changed, on our own clock: nodes' clocks differ, and a
        # heartbeatTime is only text someone wrote (as leader election does it).
        self._seen: dict[str, tuple[Any, float]] = {}

    def replace(self, source: str, objects: Iterable[KubeObject]) -> bool:
        """The watch's whole list of MeshNodes, after each event."""
        self.objects = list(objects)
        now = self.clock()
        seen = {}
        for obj in self.objects:
            status = obj.body.get("status")
            last = self._seen.get(obj.name)
            seen[obj.name] = last if last is not None and last[0] == status else (status, now)
        self._seen = seen
        self.revision += 1
        self.synced.set()
        self._changed.set()
        self._changed = asyncio.Event()
        return True

    async def run(self) -> None:
        await KindWatch(MESH_NODE, self.http, self, follow_status=True).run()

    async def wait_progress(self) -> None:
        await self._changed.wait()

    def views(self) -> dict[str, NodeView]:
        """The live nodes' views but this node's (its own comes from its sinks). On the loop:
        a copy the status thread can read."""
        out = {}
        now = self.clock()
        for obj in self.objects:
            status = obj.body.get("status")
            if obj.name == self.own or not isinstance(status, Mapping):
                continue
            _, changed = self._seen.get(obj.name, (None, now))
            if now - changed > STALE_AFTER:
                continue  # no heartbeat for three intervals: its agent is gone
            out[obj.name] = NodeView.from_status(status)
        return out


@dataclass(frozen=True)
class ClusterView:
    """One status round's look at the cluster, taken on the loop and read on the status
    thread: the other live nodes' views while this agent may write status, else None."""

    own: str
    reporter: NodeReporter
    others: Mapping[str, NodeView] | None

    def readiness(self, snapshot: StoreSnapshot, keys: Collection[ObjectKey],
                  local: list[Mapping[ObjectKey, Readiness]]
                  ) -> list[Mapping[ObjectKey, Readiness]] | None:
        """This node's view (from its sinks' readiness, `local`) goes to its MeshNode; while
        leading, Programmed is every live node's, merged; else this node's sinks' alone."""
        own = node_view(snapshot, keys, local)
        self.reporter.offer(own)
        if self.others is None:
            return None
        return [merged_readiness(snapshot, keys, {**self.others, self.own: own})]


class MeshNodes:
    """MeshNode reporting, the component the agent runs: this node's MeshNode written, every
    node's followed, and, for the status report, a readiness source: while this agent leads,
    Programmed is every live node's view merged."""

    def __init__(self, http: HTTP, node: str, identity: str,
                 election: LeaderElection | None) -> None:
        self.own = node
        self.reporter = NodeReporter(http.call, node, identity)
        self.watch = NodeWatch(node, http)
        self.election = election
        # Set when leadership flips (ours to clear); None: no election, always leading.
        self.flips = election.subscribe() if election is not None else None

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.reporter.run(), name="meshnode-reporter")
            tg.create_task(self.watch.run(), name="meshnode-watch")

    def leading(self) -> bool:
        """Whether this agent writes status: the Lease's holder (or alone, with no Lease)."""
        return self.election.leading if self.election is not None else True

    def may_write(self) -> bool:
        """Whether status may go to the API server: leading, and every node's view known
        (a new leader's first round must not publish its own node's alone)."""
        return self.leading() and self.watch.synced.is_set()

    def view(self) -> ClusterView:
        """On the loop: the other nodes' views while this agent may write (a copy the status
        thread can read), else none (no merge)."""
        return ClusterView(self.own, self.reporter,
                           self.watch.views() if self.may_write() else None)

    async def wait_progress(self) -> None:
        # A follower does not merge: other nodes' heartbeats are no news to it.
        waits: list[asyncio.Task[Any]] = []
        if self.may_write() or not self.watch.synced.is_set():
            waits.append(asyncio.create_task(self.watch.wait_progress()))
        if self.flips is not None:
            waits.append(asyncio.create_task(self.flips.wait()))
        if not waits:
            await asyncio.Event().wait()  # no election, nothing to follow
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self.flips is not None:
            self.flips.clear()
