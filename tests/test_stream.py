"""The xDS rules, checked on the protocol state machine directly (no gRPC, no Envoy)."""

from __future__ import annotations

import asyncio

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2 as pb
from google.protobuf.message import Message

from mesh.sinks.envoy import resources as r
from meshxds import types
from meshxds.acks import AckState
from meshxds.cache import SnapshotCache
from meshxds.stream import Stream


def base(route_cluster: str = "a", clusters: tuple[str, ...] = ("a",),
         port: int = 1) -> list[Message]:
    out: list[Message] = []
    for c in clusters:
        out += [r.eds_cluster(c), r.load_assignment(c, [("127.0.0.1", port)])]
    out.append(r.http_listener("l", "127.0.0.1", 8080, "rc"))
    out.append(r.route_configuration("rc", [r.virtual_host("v", ["*"], [
        r.prefix_route("/", route_cluster)])]))
    return out


@pytest.fixture
def cache() -> SnapshotCache:
    return SnapshotCache()


def sotw(stream: Stream, type_url: str, names: tuple[str, ...] = (), nonce: str = "",
         error: str | None = None) -> None:
    req = pb.DiscoveryRequest(type_url=type_url, resource_names=list(names),
                              response_nonce=nonce)
    if error is not None:
        req.error_detail.message = error
    stream.handle_sotw_request(req)


def cluster_names(resp: pb.DiscoveryResponse) -> list[str]:
    return sorted(cluster_pb2.Cluster.FromString(a.value).name for a in resp.resources)


def by_type(responses: list[pb.DiscoveryResponse]) -> dict[str, pb.DiscoveryResponse]:
    return {resp.type_url: resp for resp in responses}


def connect_sotw(cache: SnapshotCache) -> tuple[Stream, dict[str, pb.DiscoveryResponse]]:
    """A stream that asked for and ACKed everything, like Envoy at start."""
    stream = Stream(cache.node("n"), delta=False)
    cache.node("n").streams.add(stream)
    sotw(stream, types.CLUSTER)
    sotw(stream, types.LISTENER)
    first = by_type(stream.sotw_responses())
    sotw(stream, types.CLUSTER, nonce=first[types.CLUSTER].nonce)
    sotw(stream, types.ENDPOINT, ("a",))
    sotw(stream, types.ROUTE, ("rc",))
    second = by_type(stream.sotw_responses())
    for t, resp in second.items():
        sotw(stream, t, nonce=resp.nonce, names=("a",) if t == types.ENDPOINT else ("rc",))
    for t, resp in first.items():
        if t != types.CLUSTER:
            sotw(stream, t, nonce=resp.nonce)
    return stream, {**first, **second}


def test_nothing_served_before_first_snapshot(cache: SnapshotCache) -> None:
    stream = Stream(cache.node("n"), delta=False)
    sotw(stream, types.CLUSTER)
    assert stream.sotw_responses() == []
    cache.set_snapshot("n", base())
    assert [x.type_url for x in stream.sotw_responses()] == [types.CLUSTER]


def test_versions_per_type_and_hash_per_resource(cache: SnapshotCache) -> None:
    assert cache.set_snapshot("n", base()) == [
        types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE]
    assert cache.set_snapshot("n", base()) == []  # same content: no new version
    assert cache.set_snapshot("n", base(port=2)) == [types.ENDPOINT]
    versions = {t: s.version for t, s in cache.node("n").served.items()}
    assert versions == {types.SECRET: 0, types.CLUSTER: 1, types.ENDPOINT: 2,
                        types.LISTENER: 1, types.ROUTE: 1}


def test_order_and_clusters_before_routes(cache: SnapshotCache) -> None:
    cache.set_snapshot("n", base())
    stream = Stream(cache.node("n"), delta=False)
    for t in (types.ROUTE, types.LISTENER, types.ENDPOINT, types.CLUSTER):
        sotw(stream, t, ("rc",) if t == types.ROUTE else ("a",) if t == types.ENDPOINT else ())
    out = stream.sotw_responses()
    # Listeners and routes wait until the clusters are ACKed (that is: warm).
    assert [x.type_url for x in out] == [types.CLUSTER, types.ENDPOINT]
    sotw(stream, types.CLUSTER, nonce=out[0].nonce)
    assert [x.type_url for x in stream.sotw_responses()] == [types.LISTENER, types.ROUTE]


def test_stale_nonce_is_ignored(cache: SnapshotCache) -> None:
    cache.set_snapshot("n", base())
    stream, sent = connect_sotw(cache)
    cache.set_snapshot("n", base(port=2))
    new = by_type(stream.sotw_responses())[types.ENDPOINT]
    # An answer to the old response, even a NACK, changes nothing.
    sotw(stream, types.ENDPOINT, ("a",), nonce=sent[types.ENDPOINT].nonce, error="late")
    status = {(s.type_url, s.name): s for s in cache.status("n")}
    assert status[(types.ENDPOINT, "a")].ack.nack_message == ""
    assert status[(types.ENDPOINT, "a")].state is AckState.PENDING
    sotw(stream, types.ENDPOINT, ("a",), nonce=new.nonce)
    assert cache.programmed("n", types.ENDPOINT, "a")


def test_nack_is_recorded_and_not_resent(cache: SnapshotCache) -> None:
    cache.set_snapshot("n", base())
    stream, _ = connect_sotw(cache)
    cache.set_snapshot("n", base(route_cluster="b"))
    resp = by_type(stream.sotw_responses())[types.ROUTE]
    sotw(stream, types.ROUTE, ("rc",), nonce=resp.nonce, error="bad route: boom")
    assert stream.sotw_responses() == []  # no resend of the rejected version
    cache.set_snapshot("n", base(route_cluster="b"))
    assert stream.sotw_responses() == []
    s = next(x for x in cache.status("n") if x.type_url == types.ROUTE)
    assert (s.state, s.ack.nack_message, s.ack.nack_version, s.ack.acked_version) == (
        AckState.NACKED, "bad route: boom", "2", "1")


def test_changed_subscription_is_answered_at_same_version(cache: SnapshotCache) -> None:
    cache.set_snapshot("n", base(clusters=("a", "b")))
    stream, sent = connect_sotw(cache)
    sotw(stream, types.ENDPOINT, ("a", "b"), nonce="")
    out = by_type(stream.sotw_responses())[types.ENDPOINT]
    assert out.version_info == sent[types.ENDPOINT].version_info
    assert len(out.resources) == 2


def test_partial_nack_names_the_rejected_resource(cache: SnapshotCache) -> None:
    cache.set_snapshot("n", [*base(), r.http_listener("l2", "127.0.0.1", 8081, "rc")])
    stream = Stream(cache.node("n"), delta=False)
    sotw(stream, types.LISTENER)
    resp = stream.sotw_responses()[0]
    sotw(stream, types.LISTENER, nonce=resp.nonce,
         error="Error adding/updating listener(s) l2: cannot bind")
    states = {s.name: s.state for s in cache.status("n") if s.type_url == types.LISTENER}
    assert states == {"l": AckState.ACKED, "l2": AckState.NACKED}


def test_nack_naming_nothing_rejects_the_whole_response(cache: SnapshotCache) -> None:
    cache.set_snapshot("n", [*base(), r.http_listener("l2", "127.0.0.1", 8081, "rc")])
    stream = Stream(cache.node("n"), delta=False)
    sotw(stream, types.LISTENER)
    resp = stream.sotw_responses()[0]
    # "l" appears only inside another word: it must not count as named.
    sotw(stream, types.LISTENER, nonce=resp.nonce, error="malformed listeners")
    states = {s.name: s.state for s in cache.status("n") if s.type_url == types.LISTENER}
    assert states == {"l": AckState.NACKED, "l2": AckState.NACKED}


def test_cluster_change_forces_endpoints_resend(cache: SnapshotCache) -> None:
    cache.set_snapshot("n", base())
    stream, _ = connect_sotw(cache)
    changed = [r.eds_cluster("a", connect_timeout=3), *base()[1:]]
    assert cache.set_snapshot("n", changed) == [types.CLUSTER]
    out = [x.type_url for x in stream.sotw_responses()]
    assert out == [types.CLUSTER, types.ENDPOINT]


def test_removed_cluster_held_until_routes_acked(cache: SnapshotCache) -> None:
    cache.set_snapshot("n", base())
    stream, _ = connect_sotw(cache)
    cache.set_snapshot("n", base(route_cluster="b", clusters=("b",)))
    cds = by_type(stream.sotw_responses())[types.CLUSTER]
    assert cluster_names(cds) == ["a", "b"]  # "a" is still served
    sotw(stream, types.CLUSTER, nonce=cds.nonce)
    sotw(stream, types.ENDPOINT, ("a", "b"))
    out = by_type(stream.sotw_responses())
    rds = out[types.ROUTE]
    assert len(cache.node("n").served[types.CLUSTER].resources) == 2
    sotw(stream, types.ROUTE, ("rc",), nonce=rds.nonce)  # the route ACK releases "a"
    assert sorted(cache.node("n").served[types.CLUSTER].resources) == ["b"]
    assert cluster_names(by_type(stream.sotw_responses())[types.CLUSTER]) == ["b"]


def test_missing_load_assignment_is_served_empty(cache: SnapshotCache) -> None:
    cache.set_snapshot("n", [r.eds_cluster("lonely")])
    assert "lonely" in cache.node("n").served[types.ENDPOINT].resources


def test_duplicate_names_are_refused(cache: SnapshotCache) -> None:
    with pytest.raises(ValueError, match="duplicate cluster 'a'"):
        cache.set_snapshot("n", [r.eds_cluster("a"), r.eds_cluster("a")])


def delta(stream: Stream, type_url: str, subscribe: tuple[str, ...] = (),
          unsubscribe: tuple[str, ...] = (), nonce: str = "", error: str | None = None,
          initial: dict[str, str] | None = None) -> None:
    req = pb.DeltaDiscoveryRequest(
        type_url=type_url, resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe), response_nonce=nonce,
        initial_resource_versions=initial or {})
    if error is not None:
        req.error_detail.message = error
    stream.handle_delta_request(req)


def test_delta_sends_only_what_changed(cache: SnapshotCache) -> None:
    cache.set_snapshot("n", base(clusters=("a", "b")))
    stream = Stream(cache.node("n"), delta=True)
    delta(stream, types.ENDPOINT, ("a", "b"))
    first = stream.delta_responses()[0]
    assert sorted(x.name for x in first.resources) == ["a", "b"]
    delta(stream, types.ENDPOINT, nonce=first.nonce)
    cache.set_snapshot("n", [*base(clusters=("b",)), r.eds_cluster("a"),
                             r.load_assignment("a", [("127.0.0.1", 9)])])
    second = stream.delta_responses()[0]
    assert [x.name for x in second.resources] == ["a"]


def test_delta_reconnect_does_not_resend_what_envoy_has(cache: SnapshotCache) -> None:
    cache.set_snapshot("n", base())
    have = {n: res.hash for n, res in cache.node("n").served[types.CLUSTER].resources.items()}
    stream = Stream(cache.node("n"), delta=True)
    cache.node("n").streams.add(stream)
    delta(stream, types.CLUSTER, initial=have)
    out = stream.delta_responses()
    # Answered (Envoy waits for a first answer), with nothing re-sent.
    assert [(x.type_url, len(x.resources), len(x.removed_resources)) for x in out] == [
        (types.CLUSTER, 0, 0)]
    assert cache.programmed("n", types.CLUSTER, "a")


def test_delta_removal_and_unknown_subscription(cache: SnapshotCache) -> None:
    cache.set_snapshot("n", base())
    stream = Stream(cache.node("n"), delta=True)
    delta(stream, types.ROUTE, ("rc", "ghost"))
    out = stream.delta_responses()[0]
    assert [x.name for x in out.resources] == ["rc"]
    assert list(out.removed_resources) == ["ghost"]  # told once that it does not exist
    delta(stream, types.ROUTE, nonce=out.nonce)
    assert stream.delta_responses() == []
    cache.set_snapshot("n", [m for m in base() if types.type_url_of(m) != types.ROUTE])
    out = stream.delta_responses()[0]
    assert list(out.removed_resources) == ["rc"]


def test_delta_nack_is_not_resent(cache: SnapshotCache) -> None:
    cache.set_snapshot("n", base())
    stream = Stream(cache.node("n"), delta=True)
    delta(stream, types.ROUTE, ("rc",))
    out = stream.delta_responses()[0]
    delta(stream, types.ROUTE, nonce=out.nonce, error="nope")
    assert stream.delta_responses() == []
    assert not cache.programmed("n", types.ROUTE, "rc")


def test_wait_settled_wakes_on_ack(cache: SnapshotCache) -> None:
    async def run() -> None:
        cache.set_snapshot("n", base())
        stream = Stream(cache.node("n"), delta=False)
        cache.node("n").streams.add(stream)
        waiter = asyncio.create_task(cache.node("n").wait_settled())
        await asyncio.sleep(0)
        sotw(stream, types.CLUSTER)
        sotw(stream, types.LISTENER)
        sotw(stream, types.ENDPOINT, ("a",))
        sotw(stream, types.ROUTE, ("rc",))
        for _ in range(3):
            for resp in stream.sotw_responses():
                names = {types.ENDPOINT: ("a",), types.ROUTE: ("rc",)}.get(resp.type_url, ())
                sotw(stream, resp.type_url, names, nonce=resp.nonce)
        async with asyncio.timeout(1):
            await waiter

    asyncio.run(run())


def test_delta_first_wildcard_request_is_answered_when_empty(cache: SnapshotCache) -> None:
    cache.set_snapshot("n", [])
    stream = Stream(cache.node("n"), delta=True)
    delta(stream, types.CLUSTER)
    out = stream.delta_responses()
    assert [(x.type_url, len(x.resources)) for x in out] == [(types.CLUSTER, 0)]
    delta(stream, types.CLUSTER, nonce=out[0].nonce)
    assert stream.delta_responses() == []
