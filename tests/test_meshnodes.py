"""Programmed over the cluster: each node's MeshNode, and the leader's merge of them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import aiohttp
from kubernetes_asyncio.client import ApiClient, Configuration

from mesh.kube.client import HTTP, aiohttp_call
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
from mesh.sinks.sink import READY, Readiness, State
from mesh.store.objects import ObjectKey, parse_object
from mesh.store.store import Store
from tests.kubeapi import FakeAPIServer

GW = "gateway.networking.k8s.io"
ROUTE = ObjectKey(GW, "HTTPRoute", "default", "r")
TEXT = key_text(ROUTE)


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


def test_reporter_and_watch_against_the_api() -> None:
    async def main() -> None:
        api = FakeAPIServer()
        base = await api.start()
        await api.put_object("", "nodes", {"metadata": {"name": "n1"}})
        try:
            async with aiohttp.ClientSession() as session:
                call = aiohttp_call(session, base)
                reporter = NodeReporter(call, "n1", "mesh-abcde", heartbeat=0.5,
                                        min_interval=0.05)
                task = asyncio.create_task(reporter.run())
                await asyncio.sleep(0)
                reporter.offer(ran(1))
                objs = api.resource("mesh.dev", "meshnodes").objects
                for _ in range(100):
                    if ("", "n1") in objs and objs[("", "n1")].get("status"):
                        break
                    await asyncio.sleep(0.05)
                obj = objs[("", "n1")]
                owner = obj["metadata"]["ownerReferences"][0]
                node_uid = api.resource("", "nodes").objects[("", "n1")]["metadata"]["uid"]
                assert owner == {"apiVersion": "v1", "kind": "Node", "name": "n1",
                                 "uid": node_uid}
                # Found by a list: the RBAC has no get on Nodes.
                assert not any(p.startswith("/api/v1/nodes/") for _, p in api.requests)
                assert obj["status"]["programmed"] == {TEXT: 1}
                assert obj["status"]["agent"] == "mesh-abcde"
                for _ in range(20):  # offered again and again, unchanged: heartbeats only
                    reporter.offer(ran(1))
                    await asyncio.sleep(0.065)
                assert 2 <= reporter.writes <= 4, reporter.writes
                # Two other nodes. Their heartbeatTime is only text (a skewed clock, no
                # zone at all): staleness is timed on the watcher's own clock.
                async def beat(name: str, when: str) -> None:
                    await api.put_object("mesh.dev", "meshnodes", {
                        "metadata": {"name": name}, "spec": {},
                        "status": {"heartbeatTime": when, **NodeView(pending={TEXT: Pending(
                            1, State.FAILED, "NACK")}).to_status()}})

                await beat("n2", _heartbeat(0))
                await beat("n3", "2020-01-01T00:00:00")
                clock = [1000.0]
                client = ApiClient(Configuration(host=base))
                http = HTTP(client)
                watch = NodeWatch("n1", http, clock=lambda: clock[0])
                wtask = asyncio.create_task(watch.run())
                for _ in range(100):
                    if watch.views():
                        break
                    await asyncio.sleep(0.05)
                assert sorted(watch.views()) == ["n2", "n3"]  # not itself; both just seen
                clock[0] += 60
                seen = watch.revision
                await beat("n2", "2026-12-02T23:59:59Z")  # n2 beats again, n3 does not
                for _ in range(100):
                    if watch.revision > seen:
                        break
                    await asyncio.sleep(0.02)
                clock[0] = 1000.0 + STALE_AFTER + 1
                views = watch.views()
                assert list(views) == ["n2"]  # n3 silent for more than STALE_AFTER
                assert merge(ROUTE, 1, {"n1": ran(1), **views}).message == "refused on n2: NACK"
                for t in (task, wtask):
                    t.cancel()
                await asyncio.gather(task, wtask, return_exceptions=True)
                await client.close()
        finally:
            await api.stop()
    asyncio.run(main())
