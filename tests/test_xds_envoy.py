"""The ADS server against a real Envoy, with real HTTP traffic, for both protocols."""

from __future__ import annotations

import pytest
from google.protobuf.message import Message

from mesh.echo import EchoServer
from mesh.envoy.admin import EnvoyAdmin
from mesh.envoy.bootstrap import Protocol
from mesh.sinks.envoy import resources as r
from meshxds import types
from meshxds.acks import AckState
from tests.testbed import Harness, SteadyLoad, http_get, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("protocol", ["sotw", "delta"])]


def config(port: int, routes: dict[str, str], endpoints: dict[str, int]) -> list[Message]:
    """One listener on `port`, one route config, an EDS cluster per entry of `endpoints`."""
    out: list[Message] = []
    for cluster, backend_port in endpoints.items():
        out += [r.eds_cluster(cluster), r.load_assignment(cluster, [("127.0.0.1", backend_port)])]
    out.append(r.http_listener("http", "127.0.0.1", port, "rc"))
    out.append(r.route_configuration("rc", [r.virtual_host(
        "all", ["*"], [r.prefix_route(prefix, cluster) for prefix, cluster in routes.items()])]))
    return out


def pod(port: int, path: str = "/") -> str:
    reply = http_get(port, path)
    assert reply.status == 200, reply
    return str(reply.json()["pod"])


def stat(admin: EnvoyAdmin, name: str) -> int:
    return admin.stats().get(name, 0)


def test_push_config_and_serve(harness: Harness, echo_v1: EchoServer, free_port: int,
                               protocol: Protocol) -> None:
    harness.set_snapshot("node1", config(free_port, {"/": "v1"}, {"v1": echo_v1.port}))
    harness.start_envoy(protocol=protocol)
    harness.wait_settled()
    assert pod(free_port, "/hello?x=1") == "echo-v1"
    status = harness.status()
    assert {s.state for s in status.values()} == {AckState.ACKED}
    assert sorted(n for (_, n) in status) == ["http", "rc", "v1", "v1"]


def test_route_change_is_seen(harness: Harness, echo_v1: EchoServer, echo_v2: EchoServer,
                              free_port: int, protocol: Protocol) -> None:
    eps = {"v1": echo_v1.port, "v2": echo_v2.port}
    harness.set_snapshot("node1", config(free_port, {"/": "v1"}, eps))
    sup = harness.start_envoy(protocol=protocol)
    harness.wait_settled()
    assert pod(free_port) == "echo-v1"
    lds_before = stat(sup.admin, "listener_manager.lds.update_success")
    cds_before = stat(sup.admin, "cluster_manager.cds.update_success")

    changed = harness.set_snapshot("node1", config(free_port, {"/": "v2"}, eps))
    assert changed == [types.ROUTE]
    harness.wait_settled()
    assert pod(free_port) == "echo-v2"
    # Only the route was sent: listeners and clusters were not touched.
    assert stat(sup.admin, "listener_manager.lds.update_success") == lds_before
    assert stat(sup.admin, "cluster_manager.cds.update_success") == cds_before
    assert harness.status()[(types.ROUTE, "rc")].ack.acked_version == "2"


def test_bad_route_is_nacked_and_old_route_keeps_answering(
        harness: Harness, echo_v1: EchoServer, free_port: int, protocol: Protocol) -> None:
    good = config(free_port, {"/": "v1"}, {"v1": echo_v1.port})
    harness.set_snapshot("node1", good)
    sup = harness.start_envoy(protocol=protocol)
    harness.wait_settled()

    bad = [m for m in good if types.type_url_of(m) != types.ROUTE]
    bad.append(r.route_configuration("rc", [r.virtual_host(
        "all", ["*"], [r.regex_route("/(unclosed", "v1"), r.prefix_route("/", "v1")])]))
    harness.set_snapshot("node1", bad)

    route = wait_until(lambda: (s := harness.status()[(types.ROUTE, "rc")]).state
                       is AckState.NACKED and s, what="the route NACK")
    assert "unclosed" in route.ack.nack_message or "regex" in route.ack.nack_message.lower()
    assert route.ack.nack_version == "2"
    assert route.ack.acked_version == "1"  # Envoy runs the last good version
    assert not route.programmed
    assert pod(free_port, "/still-works") == "echo-v1"
    # Everything else stays programmed.
    others = [s for k, s in harness.status().items() if k != (types.ROUTE, "rc")]
    assert all(s.programmed for s in others)
    # The NACKed version is not sent again.
    rejected = stat(sup.admin, "http.http.rds.rc.update_rejected")
    assert rejected == 1
    harness.set_snapshot("node1", bad)  # same content again: nothing to send
    http_get(free_port)
    assert stat(sup.admin, "http.http.rds.rc.update_rejected") == 1

    # A fixed route is accepted and clears the error state.
    harness.set_snapshot("node1", config(free_port, {"/": "v1", "/new": "v1"},
                                         {"v1": echo_v1.port}))
    harness.wait_settled()
    assert harness.status()[(types.ROUTE, "rc")].state is AckState.ACKED


def test_endpoint_change_touches_no_listener_or_route(
        harness: Harness, echo_v1: EchoServer, echo_v2: EchoServer, free_port: int,
        protocol: Protocol) -> None:
    harness.set_snapshot("node1", config(free_port, {"/": "svc"}, {"svc": echo_v1.port}))
    sup = harness.start_envoy(protocol=protocol)
    harness.wait_settled()
    assert pod(free_port) == "echo-v1"
    before = sup.admin.stats()

    changed = harness.set_snapshot("node1", config(free_port, {"/": "svc"},
                                                   {"svc": echo_v2.port}))
    assert changed == [types.ENDPOINT]
    harness.wait_settled()
    assert pod(free_port) == "echo-v2"
    after = sup.admin.stats()
    for name in ("listener_manager.lds.update_attempt", "http.http.rds.rc.update_attempt",
                 "cluster_manager.cds.update_attempt", "listener_manager.listener_modified"):
        assert after[name] == before[name], name


def test_cluster_change_resends_endpoints(harness: Harness, echo_v1: EchoServer, free_port: int,
                                          protocol: Protocol) -> None:
    harness.set_snapshot("node1", config(free_port, {"/": "svc"}, {"svc": echo_v1.port}))
    sup = harness.start_envoy(protocol=protocol)
    harness.wait_settled()

    changed = harness.set_snapshot("node1", [
        r.eds_cluster("svc", connect_timeout=2.0),
        r.load_assignment("svc", [("127.0.0.1", echo_v1.port)]),
        *[m for m in config(free_port, {"/": "svc"}, {}) if types.type_url_of(m) != types.CLUSTER],
    ])
    assert changed == [types.CLUSTER]  # the endpoints themselves did not change
    harness.wait_settled()  # the CDS ACK comes only once the new cluster has its endpoints
    assert stat(sup.admin, "cluster_manager.warming_clusters") == 0
    assert stat(sup.admin, "cluster_manager.cds.update_success") == 2
    dump = sup.admin.config_dump("dynamic_active_clusters")
    timeouts = [c["cluster"]["connect_timeout"] for c in dump["configs"]]
    assert timeouts == ["2s"]
    assert pod(free_port) == "echo-v1"


# Each switch has a window of about one xDS round trip in which a route could point at a cluster
# that is not warm yet: enough switches make a regression show reliably (seen: every run
# failed without the wait for the cluster ACK: 4 runs out of 4).
SWITCHES = 30


def test_cluster_switches_under_load_fail_no_request(
        harness: Harness, echo_v1: EchoServer, echo_v2: EchoServer, free_port: int,
        protocol: Protocol) -> None:
    harness.set_snapshot("node1", config(free_port, {"/": "c0"}, {"c0": echo_v1.port}))
    sup = harness.start_envoy(protocol=protocol)
    harness.wait_settled()

    def active_clusters() -> list[str]:
        dump = sup.admin.config_dump("dynamic_active_clusters")
        return sorted(c["cluster"]["name"] for c in dump["configs"])

    with SteadyLoad(free_port, threads=3, interval=0.001) as load:
        wait_until(lambda: load.result.ok > 20, what="traffic")
        # Each step moves the route to a new cluster and removes the previous one at once.
        for i in range(1, SWITCHES + 1):
            backend = (echo_v1 if i % 2 == 0 else echo_v2).port
            harness.set_snapshot("node1", config(free_port, {"/": f"c{i}"}, {f"c{i}": backend}))
            harness.wait_settled()
            wait_until(lambda i=i: active_clusters() == [f"c{i}"],  # type: ignore[misc]
                       what=f"only c{i} left")
            n = load.result.ok
            wait_until(lambda n=n: load.result.ok > n + 10,  # type: ignore[misc]
                       what="more traffic")
    assert load.result.failed == 0, load.result.errors[:5]
    assert (types.CLUSTER, f"c{SWITCHES - 1}") not in harness.status()
    assert pod(free_port) == ("echo-v1" if SWITCHES % 2 == 0 else "echo-v2")


def test_partial_listener_nack(harness: Harness, echo_v1: EchoServer, free_port: int,
                               protocol: Protocol) -> None:
    good = config(free_port, {"/": "v1"}, {"v1": echo_v1.port})
    bad_listener = r.http_listener("bad", "127.0.0.1", free_port + 1, "rc")
    bad_listener.filter_chains[0].filters[0].typed_config.type_url = (
        "type.googleapis.com/does.not.Exist")
    harness.set_snapshot("node1", [*good, bad_listener])
    harness.start_envoy(protocol=protocol, wait_ready=False)
    status = wait_until(lambda: (s := harness.status())[(types.LISTENER, "bad")].state
                        is AckState.NACKED and s, what="the listener NACK")
    assert status[(types.LISTENER, "http")].state is AckState.ACKED
    assert "bad" in status[(types.LISTENER, "bad")].ack.nack_message
    assert wait_until(lambda: pod(free_port) == "echo-v1", what="the good listener")


def test_nothing_served_before_first_build(harness: Harness, echo_v1: EchoServer,
                                           free_port: int, protocol: Protocol) -> None:
    sup = harness.start_envoy(protocol=protocol, wait_ready=False)
    wait_until(lambda: harness.sync(lambda: bool(harness.cache.node("node1").streams)),
               what="Envoy to connect")
    assert not sup.admin.ready()  # connected, and still waiting for its first config
    harness.set_snapshot("node1", config(free_port, {"/": "v1"}, {"v1": echo_v1.port}))
    harness.call(sup.wait_ready(timeout=10))
    assert pod(free_port) == "echo-v1"


def test_cluster_kept_while_the_route_that_left_it_is_rejected(
        harness: Harness, echo_v1: EchoServer, echo_v2: EchoServer, free_port: int,
        protocol: Protocol) -> None:
    harness.set_snapshot("node1", config(free_port, {"/": "old"}, {"old": echo_v1.port}))
    sup = harness.start_envoy(protocol=protocol)
    harness.wait_settled()
    # The new route, which no longer uses "old", is invalid: Envoy keeps the old route, so
    # removing "old" now would break it.
    new = [m for m in config(free_port, {}, {"new": echo_v2.port})
           if types.type_url_of(m) != types.ROUTE]
    new.append(r.route_configuration("rc", [r.virtual_host(
        "all", ["*"], [r.regex_route("(", "new"), r.prefix_route("/", "new")])]))
    harness.set_snapshot("node1", new)
    wait_until(lambda: harness.status()[(types.ROUTE, "rc")].state is AckState.NACKED,
               what="the route NACK")
    names = {c["cluster"]["name"] for c in sup.admin.config_dump(
        "dynamic_active_clusters")["configs"]}
    assert names == {"old", "new"}
    assert pod(free_port) == "echo-v1"
    # Once a good route is ACKed, the old cluster goes.
    harness.set_snapshot("node1", config(free_port, {"/": "new"}, {"new": echo_v2.port}))
    wait_until(lambda: {c["cluster"]["name"] for c in sup.admin.config_dump(
        "dynamic_active_clusters")["configs"]} == {"new"}, what="old cluster removed")
    assert pod(free_port) == "echo-v2"
