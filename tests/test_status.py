"""The status sink's Programmed condition, from ACK states, without Envoy."""

from __future__ import annotations

from typing import Any

from mesh.gateway.conditions import condition
from mesh.k8s import KubeObject, StoreSnapshot, parse_object
from mesh.status import StatusSink
from meshxds.acks import ResourceAck, ResourceStatus
from meshxds.types import ROUTE

TABLE = (ROUTE, "127.0.0.1:80")


def route(name: str) -> KubeObject:
    return parse_object({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                         "metadata": {"name": name, "namespace": "default"},
                         "spec": {"parentRefs": [{"name": "gw"}]}})


def accepted(obj: KubeObject) -> dict[str, Any]:
    return {"parents": [{"parentRef": {"name": "gw"}, "conditions": [
        condition("Accepted", True, "Accepted", "attached", obj.generation)]}]}


def table(state: str, hash_: str) -> dict[tuple[str, str], ResourceStatus]:
    ack = ResourceAck(acked_hash=hash_ if state == "acked" else "old",
                      nack_hash=hash_ if state == "nacked" else "",
                      nack_message="regex too big" if state == "nacked" else "")
    return {TABLE: ResourceStatus("n", ROUTE, TABLE[1], "1", hash_, ack)}


def programmed(sink: StatusSink, obj: KubeObject) -> tuple[str, str]:
    c = next(c for c in sink.current[obj.key]["parents"][0]["conditions"]
             if c["type"] == "Programmed")
    return c["status"], c["reason"]


def test_a_shared_table_in_flight_does_not_unprogram_unchanged_routes() -> None:
    a, b = route("a"), route("b")
    snapshot = StoreSnapshot.of([a, b])
    owned = {a.key: {TABLE}, b.key: {TABLE}}
    sink = StatusSink(None)
    status = {a.key: accepted(a), b.key: accepted(b)}
    sink.update(snapshot, status, owned, table("acked", "h1"), {})
    assert programmed(sink, a) == programmed(sink, b) == ("True", "Programmed")

    # b changes: the table both share is sent again. Envoy still runs a as it was.
    b2 = route("b")
    status = {a.key: status[a.key], b.key: accepted(b2)}
    sink.update(StoreSnapshot.of([a, b2]), status, owned, table("pending", "h2"), {})
    assert programmed(sink, a) == ("True", "Programmed")
    assert programmed(sink, b2) == ("False", "Pending")

    # Envoy rejects the new table: both hear of it (the message says which route's part).
    sink.update(StoreSnapshot.of([a, b2]), status, owned, table("nacked", "h2"), {})
    assert programmed(sink, b2) == ("False", "Invalid")
    assert programmed(sink, a) == ("False", "Invalid")
