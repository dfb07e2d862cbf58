"""The Kubernetes API test double (tests/kubeapi.py) speaks the protocol the provider relies
on: checked here with a plain HTTP client, so that a provider test failing means the
provider, not the double."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests import manifests
from tests.kubeapi import FakeAPIServer, label_selector_matches

GW = "/apis/gateway.networking.k8s.io/v1"


def run(test: Callable[[FakeAPIServer, aiohttp.ClientSession, str], Awaitable[None]]) -> None:
    async def main() -> None:
        api = FakeAPIServer()
        base = await api.start()
        try:
            async with aiohttp.ClientSession() as http:
                await test(api, http, base)
        finally:
            await api.stop()
    asyncio.run(main())


def gateway(name: str, port: int = 80, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return manifests.gateway(None, manifests.listener("http", port), name=name,
                             labels=labels or {})


async def events(http: aiohttp.ClientSession, url: str, n: int) -> list[dict[str, Any]]:
    out = []
    async with http.get(url) as resp:
        async for line in resp.content:
            out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def test_list_watch_resume_and_410() -> None:
    async def t(api: FakeAPIServer, http: aiohttp.ClientSession, base: str) -> None:
        await api.put_object("gateway.networking.k8s.io", "gateways", gateway("a"))
        async with http.get(f"{base}{GW}/gateways") as r:
            listed = await r.json()
        rv = listed["metadata"]["resourceVersion"]
        assert [i["metadata"]["name"] for i in listed["items"]] == ["a"]
        await api.put_object("gateway.networking.k8s.io", "gateways", gateway("b"))
        await api.put_object("gateway.networking.k8s.io", "gateways", gateway("a", 81))
        await api.delete_object("gateway.networking.k8s.io", "gateways", "default", "b")
        got = await events(http, f"{base}{GW}/gateways?watch=true&resourceVersion={rv}", 3)
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in got] == [
            ("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
        api.compact()
        (err,) = await events(http, f"{base}{GW}/gateways?watch=true&resourceVersion={rv}", 1)
        assert err["type"] == "ERROR" and err["object"]["code"] == 410
    run(t)


def test_bookmarks_timeout_and_selectors() -> None:
    async def t(api: FakeAPIServer, http: aiohttp.ClientSession, base: str) -> None:
        await api.put_object("gateway.networking.k8s.io", "gateways",
                             gateway("a", labels={"team": "x"}))
        await api.put_object("gateway.networking.k8s.io", "gateways",
                             gateway("b", labels={"team": "y"}))
        async with http.get(f"{base}{GW}/gateways?labelSelector=team%3Dx") as r:
            assert [i["metadata"]["name"] for i in (await r.json())["items"]] == ["a"]
        async with http.get(f"{base}{GW}/gateways?fieldSelector=metadata.name%3Db") as r:
            assert [i["metadata"]["name"] for i in (await r.json())["items"]] == ["b"]
        (mark,) = await events(http, f"{base}{GW}/gateways?watch=true&allowWatchBookmarks="
                                     "true&resourceVersion=1&labelSelector=team%3Dnone", 1)
        assert mark["type"] == "BOOKMARK"
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with http.get(f"{base}{GW}/gateways?watch=true&timeoutSeconds=1") as r:
            assert await r.read() == b""
        assert loop.time() - started < 3
    run(t)
    assert label_selector_matches("a in (1, 2),!b", {"a": "2"})
    assert not label_selector_matches("a notin (1)", {"a": "1"})


def test_status_subresource_conflicts_and_generation() -> None:
    async def t(api: FakeAPIServer, http: aiohttp.ClientSession, base: str) -> None:
        g = await api.put_object("gateway.networking.k8s.io", "gateways", gateway("a"))
        url = f"{base}{GW}/namespaces/default/gateways/a"
        status = {"metadata": {"resourceVersion": g["metadata"]["resourceVersion"]},
                  "status": {"conditions": [{"type": "Accepted", "status": "True"}]}}
        async with http.put(url + "/status", json=status) as r:
            assert r.status == 200
            written = await r.json()
        assert written["metadata"]["generation"] == 1  # status is not spec
        async with http.put(url + "/status", json=status) as r:  # the old version: stale
            assert r.status == 409 and (await r.json())["reason"] == "Conflict"
        changed = gateway("a", 81)
        changed["metadata"]["resourceVersion"] = written["metadata"]["resourceVersion"]
        async with http.put(url, json=changed) as r:
            after = await r.json()
        assert after["metadata"]["generation"] == 2 and after["status"] == written["status"]
        svc = {"metadata": {"name": "s", "namespace": "default"}, "spec": {"ports": []}}
        await api.put_object("", "services", svc)
        svc2 = {"metadata": {"name": "s", "namespace": "default"},
                "spec": {"ports": [{"port": 80}]}}
        s = await api.put_object("", "services", svc2)
        assert "generation" not in s["metadata"]  # Services have none
        lease = {"metadata": {"name": "leader", "namespace": "mesh"},
                 "spec": {"holderIdentity": "a"}}
        async with http.post(f"{base}/apis/coordination.k8s.io/v1/namespaces/mesh/leases",
                             json=lease) as r:
            assert r.status == 201
        async with http.post(f"{base}/apis/coordination.k8s.io/v1/namespaces/mesh/leases",
                             json=lease) as r:
            assert r.status == 409
    run(t)


def test_cut_watches_end_the_stream() -> None:
    async def t(api: FakeAPIServer, http: aiohttp.ClientSession, base: str) -> None:
        async with http.get(f"{base}{GW}/gateways?watch=true") as r:
            await asyncio.sleep(0.1)
            await api.cut_watches()
            try:
                await asyncio.wait_for(r.read(), 3)
            except aiohttp.ClientPayloadError:
                pass  # cut mid-stream: what a client sees of a dead connection
    run(t)
