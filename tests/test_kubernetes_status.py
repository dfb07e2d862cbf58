"""Status written back through the status subresource of the real API server (the run's
shared control plane, tests/cluster.py), with the agent's token and RBAC: only when it
changed (lastTransitionTime aside); a 409 from a real write in between retried on a fresh
read; a gone object dropped after a read confirms it; many written a few at a time; a status
the real schema refuses (422) said once, not sent again, the rest written. What the
publisher sends is counted at its own call, on the way to the server."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mesh.kube import status as kube_status
from mesh.kube.client import Call, connect
from mesh.kube.resources import resources
from mesh.kube.status import KubernetesStatusWriter, StatusPublisher
from mesh.lab.controlplane import ControlPlane
from mesh.store.objects import ObjectKey
from tests import manifests
from tests.test_kubernetes_real import agent_namespace, apply, install_crds

GW = "gateway.networking.k8s.io"
NAMESPACE = "real-status"
BY_KIND = {(r.group, r.kind): r for r in resources(None)}
GATEWAYS = BY_KIND[(GW, "Gateway")]


def status(reason: str, when: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {"conditions": [{"type": "Accepted", "status": "True", "reason": reason,
                            "message": "", "observedGeneration": 1,
                            "lastTransitionTime": when}]}


def key(name: str) -> ObjectKey:
    return ObjectKey(GW, "Gateway", NAMESPACE, name)


@dataclass
class Server:
    """The real API server: the agent's kubeconfig, and the admin's reads and writes."""

    cp: ControlPlane
    kubeconfig: Path

    def gateways(self, *names: str) -> list[ObjectKey]:
        apply(self.cp, *(manifests.gateway(None, name=n, namespace=NAMESPACE) for n in names))
        return [key(n) for n in names]

    def get(self, name: str) -> dict[str, Any]:
        code, body = self.cp.request("GET", GATEWAYS.item(NAMESPACE, name))
        assert code == 200, body
        found: dict[str, Any] = body
        return found

    def status(self, name: str) -> Any:
        return self.get(name).get("status")


@pytest.fixture(scope="module")
def server(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Server]:
    install_crds(control_plane)
    path = tmp_path_factory.mktemp("status") / "kubeconfig"
    with agent_namespace(control_plane, NAMESPACE, path) as kubeconfig:
        yield Server(control_plane, kubeconfig)


class Counted:
    """The publisher's requests, recorded on their way to the server."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.requests: list[tuple[str, str]] = []  # (method, path)

    async def __call__(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        self.requests.append((method, path))
        return await self.call(method, path, body)

    @property
    def puts(self) -> int:
        return sum(1 for m, _ in self.requests if m == "PUT")


def run(server: Server, test: Callable[[StatusPublisher, Counted], Awaitable[None]]) -> None:
    """`test` with a publisher on the agent's client (its token, its RBAC)."""
    async def main() -> None:
        async with connect(str(server.kubeconfig)) as http:
            counted = Counted(http.call)
            await test(StatusPublisher(counted, BY_KIND), counted)
    asyncio.run(main())


@pytest.mark.e2e
def test_written_only_when_changed(server: Server) -> None:
    [gw] = server.gateways("changed")

    async def t(pub: StatusPublisher, counted: Counted) -> None:
        await pub.publish({gw: status("Accepted")})
        assert server.status("changed") == status("Accepted") and counted.puts == 1
        version = server.get("changed")["metadata"]["resourceVersion"]
        await pub.publish({gw: status("Accepted", when="2026-06-01T00:00:00Z")})
        assert counted.puts == 1  # only the time differs: not written
        assert server.get("changed")["metadata"]["resourceVersion"] == version
        await pub.publish({gw: status("Other")})
        assert server.status("changed")["conditions"][0]["reason"] == "Other"
        assert counted.puts == 2
    run(server, t)


@pytest.mark.e2e
def test_conflict_is_retried_on_a_fresh_read(server: Server) -> None:
    [gw] = server.gateways("conflict")

    async def t(pub: StatusPublisher, counted: Counted) -> None:
        first = True

        async def racing(method: str, path: str, body: Any) -> tuple[int, Any]:
            nonlocal first
            if method == "PUT" and first:
                first = False  # someone else writes the object between our read and write
                await asyncio.to_thread(server.cp.kubectl, "label", "gateway", "conflict",
                                        "x=1", "-n", NAMESPACE)
            return await counted(method, path, body)

        pub.call = racing
        await pub.publish({gw: status("Accepted")})
        assert pub.writes == 1 and counted.puts == 2  # the server's 409, then the write
        obj = server.get("conflict")
        assert obj["status"] == status("Accepted") and obj["metadata"]["labels"] == {"x": "1"}
    run(server, t)


@pytest.mark.e2e
def test_gone_object_is_dropped_after_a_read(server: Server) -> None:
    [gw] = server.gateways("gone")
    server.cp.kubectl("delete", "gateway", "gone", "-n", NAMESPACE)

    async def t(pub: StatusPublisher, counted: Counted) -> None:
        await pub.publish({gw: status("Accepted")})
        assert pub.writes == 0 and counted.puts == 0
        assert ("GET", GATEWAYS.item(NAMESPACE, "gone")) in counted.requests
    run(server, t)


@pytest.mark.e2e
def test_many_statuses_are_written_a_few_at_a_time(server: Server) -> None:
    names = [f"many-{i}" for i in range(40)]
    keys = server.gateways(*names)

    async def t(pub: StatusPublisher, counted: Counted) -> None:
        in_flight = peak = 0

        async def slow(method: str, path: str, body: Any) -> tuple[int, Any]:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await asyncio.sleep(0.01)  # a loaded API server's round trip
                return await counted(method, path, body)
            finally:
                in_flight -= 1

        pub.call = slow
        await pub.publish({k: status("Accepted") for k in keys})
        assert pub.writes == 40
        assert 1 < peak <= 8, peak
        code, listed = server.cp.request("GET", GATEWAYS.collection(NAMESPACE))
        assert code == 200, listed
        written = {o["metadata"]["name"]: o.get("status") for o in listed["items"]}
        assert all(written[n] == status("Accepted") for n in names)
    run(server, t)


@pytest.mark.e2e
def test_a_refused_status_is_said_once_and_the_rest_goes_on(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    bad, ok = server.gateways("refused", "ok")
    before_ours = server.status("refused")  # the CRD's default: "Waiting for controller"
    # The Gateway's schema allows 8 conditions: the real server refuses this with a 422.
    too_many = {"conditions": [{**status("Accepted")["conditions"][0], "type": f"Extra{i}"}
                               for i in range(9)]}

    async def t(pub: StatusPublisher, counted: Counted) -> None:
        throttled = True

        async def throttling(method: str, path: str, body: Any) -> tuple[int, Any]:
            nonlocal throttled
            # The real server cannot be made to throttle on demand: this one 429 is the
            # call's own, answered as the server's flow control would.
            if method == "PUT" and path.endswith("/ok/status") and throttled:
                throttled = False
                return 429, {"kind": "Status", "message": "too many requests"}
            return await counted(method, path, body)

        pub.call = throttling
        with caplog.at_level(logging.WARNING, logger="mesh.kube.status"):
            await pub.publish({bad: too_many, ok: status("Accepted")})
        said = [r for r in caplog.records if r.getMessage() == "status refused by the API "
                "server"]
        assert len(said) == 1 and said[0].code == 422, said  # type: ignore[attr-defined]
        assert "Too many: 9" in said[0].error  # type: ignore[attr-defined]
        assert server.status("refused") == before_ours and bad in pub.refused  # not retried
        assert server.status("ok") == status("Accepted")  # after the 429, written
        before = len(counted.requests)
        await pub.publish({bad: too_many, ok: status("Accepted")})
        assert len(counted.requests) == before  # the same refused status is not sent again
        await pub.publish({bad: status("Changed"), ok: status("Accepted")})
        assert server.status("refused")["conditions"][0]["reason"] == "Changed"
        assert bad not in pub.refused
    run(server, t)


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


@pytest.mark.e2e
def test_a_write_with_the_watched_version_is_one_request(server: Server) -> None:
    """With the status and resourceVersion the watch saw, a write is a PUT alone; when the
    object changed since (a stale version), the server's 409 makes it read and write."""
    [gw] = server.gateways("versioned")

    async def t(pub: StatusPublisher, counted: Counted) -> None:
        seen = server.get("versioned")
        version = seen["metadata"]["resourceVersion"]
        await pub.publish({gw: status("Accepted")}, {gw: seen.get("status")}, {gw: version})
        assert [m for m, _ in counted.requests] == ["PUT"]
        assert server.status("versioned") == status("Accepted")
        counted.requests.clear()
        # The version is stale now (our own write moved it on): 409, then a read and a write.
        await pub.publish({gw: status("Other")}, {gw: status("Accepted")}, {gw: version})
        assert [m for m, _ in counted.requests] == ["PUT", "GET", "PUT"]
        assert server.status("versioned")["conditions"][0]["reason"] == "Other"
    run(server, t)


def _programmed(reason: str) -> dict[str, Any]:
    return {"parents": [{"conditions": [
        {"type": "Accepted", "status": "True", "reason": "Accepted"},
        {"type": "Programmed", "status": str(reason == "Programmed"), "reason": reason}]}]}


def test_a_new_objects_first_status_waits_a_little_to_be_programmed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A new route waiting for the nodes (Programmed: Pending) is not written at once: it is
    written when programmed, once; if that takes longer than the grace, it is written as it
    is. An object the server already has a status for is written at once."""
    monkeypatch.setattr(kube_status, "FIRST_STATUS_GRACE", 0.3)
    published: list[tuple[float, dict[ObjectKey, Any]]] = []

    class Recorder(StatusPublisher):
        async def publish(self, statuses: Any, server_status: Any = None,
                          versions: Any = None) -> None:
            published.append((time.monotonic(), dict(statuses)))
            self.written.update(statuses)

    async def main() -> None:
        writer = KubernetesStatusWriter(
            Recorder(Counted(lambda *a: asyncio.sleep(0, (200, {})))),
            lambda k: (None, None) if k != old else ({"parents": []}, "7"), None)
        task = asyncio.create_task(writer.run())
        await asyncio.sleep(0.05)
        began = time.monotonic()
        quick, slow = key("quick"), key("slow")
        writer.write({}, {quick: _programmed("Pending"), slow: _programmed("Pending"),
                          old: _programmed("Pending")}, {})
        await asyncio.sleep(0.1)
        assert [set(s) for _, s in published] == [{old}]  # known to the server: at once
        writer.write({}, {quick: _programmed("Programmed"), slow: _programmed("Pending"),
                          old: _programmed("Pending")}, {})
        await asyncio.sleep(0.1)
        assert quick in published[-1][1] and slow not in published[-1][1]
        assert published[-1][1][quick] == _programmed("Programmed")  # written once, done
        await asyncio.sleep(0.3)
        when, last = published[-1]
        assert last[slow] == _programmed("Pending") and when - began >= 0.3
        task.cancel()

    old = key("old")
    asyncio.run(main())
