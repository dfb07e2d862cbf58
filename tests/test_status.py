"""The status report's Programmed condition, from the sinks' readiness (and, for the Envoy
sink, from ACK states), without Envoy."""

from __future__ import annotations

from mesh.sinks.envoy.sink import readiness_of
from mesh.sinks.sink import Readiness
from mesh.sinks.status.report import StatusReport
from mesh.store.kinds import GATEWAY_GROUP
from mesh.store.objects import KubeObject, ObjectKey, parse_object
from mesh.store.store import StoreSnapshot
from mesh.translate.model import ParentRef
from mesh.translate.status import (
    Conditions,
    ParentStatus,
    Reason,
    RouteStatus,
    Type,
    condition,
)
from meshxds.acks import ResourceAck, ResourceStatus
from meshxds.types import ROUTE

TABLE = (ROUTE, "127.0.0.1:80")


def route(name: str, label: str = "") -> KubeObject:
    return parse_object({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                         "metadata": {"name": name, "namespace": "default",
                                      "labels": {"edit": label}},
                         "spec": {"parentRefs": [{"name": "gw"}]}})


def accepted(obj: KubeObject) -> RouteStatus:
    return RouteStatus([ParentStatus(ParentRef(GATEWAY_GROUP, "Gateway", "default", "gw"),
                                     "mesh", Conditions([
        condition(Type.ACCEPTED, True, Reason.ACCEPTED, "attached", obj.generation)]))])


def table(state: str, hash_: str) -> dict[tuple[str, str], ResourceStatus]:
    ack = ResourceAck(acked_hash=hash_ if state == "acked" else "old",
                      nack_hash=hash_ if state == "nacked" else "",
                      nack_message="regex too big" if state == "nacked" else "")
    return {TABLE: ResourceStatus("n", ROUTE, TABLE[1], "1", hash_, ack)}


def envoy(owned: dict[ObjectKey, set[tuple[str, str]]],
          acks: dict[tuple[str, str], ResourceStatus]) -> dict[ObjectKey, Readiness]:
    return {k: readiness_of(v, acks) for k, v in owned.items()}


def programmed(report: StatusReport, obj: KubeObject) -> tuple[str, str]:
    c = next(c for c in report.current[obj.key]["parents"][0]["conditions"]
             if c["type"] == "Programmed")
    return c["status"], c["reason"]


def test_a_shared_table_in_flight_does_not_unprogram_unchanged_routes() -> None:
    a, b = route("a"), route("b")
    snapshot = StoreSnapshot.of([a, b])
    owned = {a.key: {TABLE}, b.key: {TABLE}}
    report = StatusReport()
    status = {a.key: accepted(a), b.key: accepted(b)}
    report.update(snapshot, status, [envoy(owned, table("acked", "h1"))])
    assert programmed(report, a) == programmed(report, b) == ("True", "Programmed")

    # b changes: the table both share is sent again. Envoy still runs a as it was.
    b2 = route("b", label="changed")
    status = {a.key: status[a.key], b.key: accepted(b2)}
    report.update(StoreSnapshot.of([a, b2]), status, [envoy(owned, table("pending", "h2"))])
    assert programmed(report, a) == ("True", "Programmed")
    assert programmed(report, b2) == ("False", "Pending")

    # Envoy rejects the new table: both hear of it (the message says which route's part).
    report.update(StoreSnapshot.of([a, b2]), status, [envoy(owned, table("nacked", "h2"))])
    assert programmed(report, b2) == ("False", "Invalid")
    assert programmed(report, a) == ("False", "Invalid")
    message = next(c for c in report.current[a.key]["parents"][0]["conditions"]
                   if c["type"] == "Programmed")["message"]
    assert message == "Envoy rejected route 127.0.0.1:80: regex too big"


def test_every_sink_must_be_ready() -> None:
    """Programmed needs every sink: a failure of any one is what the condition says."""
    from mesh.sinks.sink import READY, State

    a = route("a")
    report = StatusReport()
    failed = Readiness(State.FAILED, "map write: E2BIG")
    report.update(StoreSnapshot.of([a]), {a.key: accepted(a)}, [{a.key: READY},
                                                                {a.key: failed}])
    c = next(c for c in report.current[a.key]["parents"][0]["conditions"]
             if c["type"] == "Programmed")
    assert (c["status"], c["reason"], c["message"]) == ("False", "Invalid", "map write: E2BIG")
