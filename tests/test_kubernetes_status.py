"""Status written back through the status subresource, against the API double: only when it
changed (lastTransitionTime aside), 409 conflicts retried on a fresh read, a gone object
dropped after a read confirms it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from mesh.kube.client import aiohttp_call
from mesh.kube.resources import resources
from mesh.kube.status import StatusPublisher
from mesh.store.objects import ObjectKey
from tests.kubeapi import FakeAPIServer

GW = "gateway.networking.k8s.io"
KEY = ObjectKey(GW, "Gateway", "default", "gw")


def status(reason: str, when: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {"conditions": [{"type": "Accepted", "status": "True", "reason": reason,
                            "message": "", "observedGeneration": 1,
                            "lastTransitionTime": when}]}


def run(test: Callable[[FakeAPIServer, StatusPublisher, Any], Awaitable[None]]) -> None:
    async def main() -> None:
        api = FakeAPIServer()
        base = await api.start()
        await api.put_object(GW, "gateways", {"metadata": {"name": "gw", "namespace": "default"},
                                              "spec": {"gatewayClassName": "mesh"}})
        try:
            async with aiohttp.ClientSession() as http:
                call = aiohttp_call(http, base)
                by_kind = {(r.group, r.kind): r for r in resources(None)}
                await test(api, StatusPublisher(call, by_kind), call)
        finally:
            await api.stop()
    asyncio.run(main())


def server_status(api: FakeAPIServer) -> Any:
    return api.resource(GW, "gateways").objects[("default", "gw")].get("status")


def puts(api: FakeAPIServer) -> int:
    return sum(1 for m, p in api.requests if m == "PUT")


def test_written_only_when_changed() -> None:
    async def t(api: FakeAPIServer, pub: StatusPublisher, _: Any) -> None:
        await pub.publish({KEY: status("Accepted")})
        assert server_status(api) == status("Accepted") and puts(api) == 1
        await pub.publish({KEY: status("Accepted", when="2026-06-01T00:00:00Z")})
        assert puts(api) == 1  # only the time differs: not written
        await pub.publish({KEY: status("Other")})
        assert server_status(api)["conditions"][0]["reason"] == "Other" and puts(api) == 2
    run(t)


def test_conflict_is_retried_on_a_fresh_read() -> None:
    async def t(api: FakeAPIServer, pub: StatusPublisher, call: Any) -> None:
        first = True

        async def racing(method: str, path: str, body: Any) -> tuple[int, Any]:
            nonlocal first
            if method == "PUT" and first:
                first = False  # someone else writes the object between our read and write
                await api.put_object(GW, "gateways", {
                    "metadata": {"name": "gw", "namespace": "default", "labels": {"x": "1"}},
                    "spec": {"gatewayClassName": "mesh"}})
            out: tuple[int, Any] = await call(method, path, body)
            return out

        pub.call = racing
        await pub.publish({KEY: status("Accepted")})
        assert pub.writes == 1 and puts(api) == 2  # a 409, then the write on the fresh read
        obj = api.resource(GW, "gateways").objects[("default", "gw")]
        assert obj["status"] == status("Accepted") and obj["metadata"]["labels"] == {"x": "1"}
    run(t)


def test_gone_object_is_dropped_after_a_read() -> None:
    async def t(api: FakeAPIServer, pub: StatusPublisher, _: Any) -> None:
        await api.delete_object(GW, "gateways", "default", "gw")
        await pub.publish({KEY: status("Accepted")})
        assert pub.writes == 0 and puts(api) == 0
        assert ("GET", "/apis/gateway.networking.k8s.io/v1/namespaces/default/gateways/gw") \
            in api.requests
    run(t)


def test_many_statuses_are_written_a_few_at_a_time() -> None:
    async def t(api: FakeAPIServer, pub: StatusPublisher, call: Any) -> None:
        keys = []
        for i in range(40):
            await api.put_object(GW, "gateways", {
                "metadata": {"name": f"g{i}", "namespace": "default"},
                "spec": {"gatewayClassName": "mesh"}})
            keys.append(ObjectKey(GW, "Gateway", "default", f"g{i}"))
        in_flight = peak = 0

        async def slow(method: str, path: str, body: Any) -> tuple[int, Any]:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await asyncio.sleep(0.01)  # an API server's round trip
                out: tuple[int, Any] = await call(method, path, body)
                return out
            finally:
                in_flight -= 1

        pub.call = slow
        await pub.publish({k: status("Accepted") for k in keys})
        assert pub.writes == 40
        assert 1 < peak <= 8, peak
        written = api.resource(GW, "gateways").objects
        assert all(written[("default", k.name)]["status"] == status("Accepted") for k in keys)
    run(t)


def test_a_refused_status_is_said_once_and_the_rest_goes_on() -> None:
    async def t(api: FakeAPIServer, pub: StatusPublisher, call: Any) -> None:
        await api.put_object(GW, "gateways", {"metadata": {"name": "ok", "namespace": "default"},
                                              "spec": {"gatewayClassName": "mesh"}})
        ok = ObjectKey(GW, "Gateway", "default", "ok")
        throttled = True

        async def server(method: str, path: str, body: Any) -> tuple[int, Any]:
            nonlocal throttled
            if method == "PUT" and path.endswith("/gw/status"):
                return 422, {"kind": "Status", "message": "status.conditions: Too many: 9"}
            if method == "PUT" and path.endswith("/ok/status") and throttled:
                throttled = False
                return 429, {"kind": "Status", "message": "too many requests"}
            out: tuple[int, Any] = await call(method, path, body)
            return out

        pub.call = server
        await pub.publish({KEY: status("Accepted"), ok: status("Accepted")})
        assert server_status(api) is None and KEY in pub.refused  # refused, not retried
        assert api.resource(GW, "gateways").objects[("default", "ok")]["status"] == \
            status("Accepted")  # after the 429, written
        before = len(api.requests)
        await pub.publish({KEY: status("Accepted"), ok: status("Accepted")})
        assert len(api.requests) == before  # the same refused status is not sent again
        pub.call = call
        await pub.publish({KEY: status("Changed"), ok: status("Accepted")})
        assert server_status(api)["conditions"][0]["reason"] == "Changed"
        assert KEY not in pub.refused
    run(t)


def test_our_entries_stay_where_they_were_among_other_controllers() -> None:
    from mesh.kube.status import with_foreign

    a = {"parentRef": {"name": "a"}, "controllerName": "other/a"}
    b = {"parentRef": {"name": "b"}, "controllerName": "other/b"}
    ours_old = {"parentRef": {"name": "gw"}, "controllerName": "mesh", "conditions": []}
    ours_new = {**ours_old, "conditions": [{"type": "Accepted"}]}
    merged = with_foreign({"parents": [ours_new]}, {"parents": [a, ours_old, b]}, "mesh")
    assert merged["parents"] == [a, ours_new, b]  # no reordering fight with a or b
    assert with_foreign({"parents": [ours_new]}, {"parents": [a]}, "mesh")["parents"] == \
        [a, ours_new]  # first time: after theirs
