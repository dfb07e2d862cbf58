"""Programmed over the cluster: each node's MeshNode, and the leader's merge of them. The
merge is pure; the reporter and the watch run against the real API server (the run's shared
control plane, tests/cluster.py) with the agent's ServiceAccount token and RBAC."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mesh.kube.client import Call, connect
from mesh.kube.meshnodes import (
    STALE_AFTER,
    NodeReporter,
    NodeView,
    NodeWatch,
    Pending,
    key_text,
    merge,
    merged_readiness,
    node_view,
)
from mesh.kube.resources import MESH_NODE
from mesh.lab.controlplane import ControlPlane
from mesh.sinks.sink import READY, Readiness, State
from mesh.store.objects import ObjectKey, parse_object
from mesh.store.store import Store
from tests.test_kubernetes_real import agent_namespace, apply, install_crds

GW = "gateway.networking.k8s.io"
ROUTE = ObjectKey(GW, "HTTPRoute", "default", "r")
TEXT = key_text(ROUTE)
NAMESPACE = "real-meshnodes"  # the agent's ServiceAccount
# MeshNodes and Nodes are cluster-wide: names no other test uses.
N1, N2, N3 = "meshnodes-n1", "meshnodes-n2", "meshnodes-n3"


def ran(generation: int) -> NodeView:
    return NodeView({TEXT: generation})


def test_programmed_when_every_node_runs_the_generation() -> None:
    assert merge(ROUTE, 3, {"n1": ran(3), "n2": ran(4)}) == READY


def test_the_lagging_nodes_are_named() -> None:
    r = merge(ROUTE, 3, {"n1": ran(3), "n2": ran(2), "n3": NodeView(),
                         "n4": NodeView(pending={TEXT: Pending(3, State.PENDING, "acks")})})
    assert r.state is State.PENDING
    assert r.message == "generation 3 not yet programmed on n2, n3, n4"


def test_a_refusal_is_quoted_and_wins_over_lag() -> None:
    nack = "Proto constraint validation failed: route: value length must be at least 1"
    r = merge(ROUTE, 3, {"n1": ran(3), "n2": ran(1),
                         "n3": NodeView(pending={TEXT: Pending(3, State.FAILED, nack)})})
    assert r.state is State.FAILED
    assert r.message == f"refused on n3: {nack}; not yet programmed on n2"
    # A refusal of an older generation is only lag for the current one.
    old = merge(ROUTE, 4, {"n3": NodeView(pending={TEXT: Pending(3, State.FAILED, nack)})})
    assert old.state is State.PENDING


def test_many_lagging_nodes_are_counted_not_listed() -> None:
    r = merge(ROUTE, 1, {f"n{i:02}": NodeView() for i in range(12)})
    assert r.message.endswith("n00, n01, n02, n03, n04 and 7 more")


def test_a_view_round_trips_and_bad_entries_are_skipped() -> None:
    view = NodeView({TEXT: 2}, {"a/B/c/d": Pending(1, State.FAILED, "x" * 5000)})
    back = NodeView.from_status(view.to_status())
    assert back.programmed == {TEXT: 2}
    assert back.pending["a/B/c/d"].state is State.FAILED
    assert len(back.pending["a/B/c/d"].message) == 2048  # the CRD's bound
    junk = NodeView.from_status({"programmed": {"x": "1", "y": 2}, "pending": {
        "p": "no", "q": {"state": "Failed"}, "s": {"generation": 1, "state": "Odd"}}})
    assert junk.programmed == {"y": 2} and list(junk.pending) == ["s"]
    assert junk.pending["s"].state is State.PENDING


def test_node_view_and_merged_readiness_follow_the_snapshot() -> None:
    store = Store()
    store.replace("t", [parse_object({
        "apiVersion": f"{GW}/v1", "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "default", "generation": 5}})])
    snap = store.snapshot()
    pending = {ROUTE: Readiness(State.PENDING, "waiting for Envoy")}
    own = node_view(snap, [ROUTE], [pending])
    assert own.pending[TEXT] == Pending(5, State.PENDING, "waiting for Envoy")
    assert node_view(snap, [ROUTE], [{}]).programmed == {TEXT: 5}
    merged = merged_readiness(snap, [ROUTE], {"me": node_view(snap, [ROUTE], [{}]),
                                               "other": ran(4)})
    assert merged[ROUTE].message == "generation 5 not yet programmed on other"


def _heartbeat(age: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def kubeconfig(control_plane: ControlPlane, tmp_path: Path) -> Iterator[Path]:
    """The agent's kubeconfig, and the Node n1 whose MeshNode the reporter writes."""
    cp = control_plane
    install_crds(cp)
    try:
        with agent_namespace(cp, NAMESPACE, tmp_path / "kubeconfig") as path:
            apply(cp, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": N1}})
            yield path
    finally:
        cp.kubectl("delete", "node", N1, "--ignore-not-found", check=False)
        cp.kubectl("delete", "meshnodes", N1, N2, N3, "--ignore-not-found", check=False)


class Recorded:
    """The reporter's requests, recorded on their way to the server."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.requests: list[tuple[str, str]] = []  # (method, path)

    async def __call__(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        self.requests.append((method, path))
        return await self.call(method, path, body)


def beat(cp: ControlPlane, name: str, when: str) -> None:
    """Another node's agent writing its MeshNode (as the admin: created, then its status)."""
    path = MESH_NODE.item("", name)
    code, obj = cp.request("GET", path)
    if code == 404:
        code, obj = cp.request("POST", MESH_NODE.path, {
            "apiVersion": "mesh.dev/v1alpha1", "kind": "MeshNode",
            "metadata": {"name": name}, "spec": {}})
    assert code in (200, 201), obj
    status = {"heartbeatTime": when,
              **NodeView(pending={TEXT: Pending(1, State.FAILED, "NACK")}).to_status()}
    code, body = cp.request("PUT", path + "/status", {**obj, "status": status})
    assert code == 200, body


def mine(views: dict[str, NodeView]) -> dict[str, NodeView]:
    """This test's nodes' views: the cluster is the whole run's (other tests' MeshNodes)."""
    return {k: v for k, v in views.items() if k in (N1, N2, N3)}


@pytest.mark.e2e
def test_reporter_and_watch_against_the_api(control_plane: ControlPlane,
                                            kubeconfig: Path) -> None:
    cp = control_plane

    async def until(what: Any, timeout: float = 5.0) -> None:
        for _ in range(int(timeout / 0.05)):
            if what():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("timed out")

    async def main() -> None:
        async with connect(str(kubeconfig)) as http:
            call = Recorded(http.call)
            reporter = NodeReporter(call, N1, "mesh-abcde", heartbeat=0.5, min_interval=0.05)
            task = asyncio.create_task(reporter.run())
            wtask: asyncio.Task[None] | None = None
            try:
                await asyncio.sleep(0)
                reporter.offer(ran(1))

                def written() -> dict[str, Any] | None:
                    code, obj = cp.request("GET", MESH_NODE.item("", N1))
                    return obj if code == 200 and obj.get("status") else None

                await until(written)
                obj = written()
                assert obj is not None
                owner = obj["metadata"]["ownerReferences"][0]
                code, node = cp.request("GET", "/api/v1/nodes/" + N1)
                assert code == 200, node
                assert owner == {"apiVersion": "v1", "kind": "Node", "name": N1,
                                 "uid": node["metadata"]["uid"]}
                # Found by a list: the RBAC has no get on Nodes.
                assert not any(p.startswith("/api/v1/nodes/") for _, p in call.requests)
                assert obj["status"]["programmed"] == {TEXT: 1}
                assert obj["status"]["agent"] == "mesh-abcde"
                for _ in range(20):  # offered again and again, unchanged: heartbeats only
                    reporter.offer(ran(1))
                    await asyncio.sleep(0.065)
                assert 2 <= reporter.writes <= 4, reporter.writes
                # Two other nodes. Their heartbeatTime is only what their clocks said (n3's
                # years behind): staleness is timed on the watcher's own clock.
                await asyncio.to_thread(beat, cp, N2, _heartbeat(0))
                await asyncio.to_thread(beat, cp, N3, "2020-01-01T00:00:00Z")
                clock = [1000.0]
                watch = NodeWatch(N1, http, clock=lambda: clock[0])
                wtask = asyncio.create_task(watch.run())
                await until(lambda: set(mine(watch.views())) == {N2, N3})  # not itself
                clock[0] += 60
                await asyncio.to_thread(beat, cp, N2, "2026-12-02T23:59:59Z")  # n3 does not

                def n2_seen() -> bool:  # n1's own heartbeats move the watch too
                    return any(o.name == N2 and (o.body.get("status") or {}).get(
                        "heartbeatTime") == "2026-12-02T23:59:59Z" for o in watch.objects)

                await until(n2_seen)
                clock[0] = 1000.0 + STALE_AFTER + 1
                views = mine(watch.views())
                assert list(views) == [N2]  # n3 silent for more than STALE_AFTER
                assert merge(ROUTE, 1, {N1: ran(1), **views}).message == \
                    f"refused on {N2}: NACK"
            finally:
                for t in (task, wtask):
                    if t is not None:
                        t.cancel()
                await asyncio.gather(*(t for t in (task, wtask) if t is not None),
                                     return_exceptions=True)
    asyncio.run(main())
