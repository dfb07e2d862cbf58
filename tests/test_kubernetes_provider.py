"""The Kubernetes provider against the API test double (tests/kubeapi.py): objects created,
changed and deleted reach the store; a cut watch resumes without a list; 410 lists again and
loses nothing; a Service change without a generation bump is followed; kinds the server does
not serve (CRDs not installed) do not block the first sync."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes_asyncio.client import ApiClient, Configuration

from mesh.kube.client import HTTP
from mesh.providers.kubernetes import KubernetesProvider
from mesh.store import kinds
from mesh.store.store import Store
from tests import manifests
from tests.kubeapi import FakeAPIServer

GW = "gateway.networking.k8s.io"


def gateway(name: str, port: int = 80) -> dict[str, Any]:
    return manifests.gateway(None, manifests.listener("http", port), name=name)


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


def run(test: Callable[[FakeAPIServer, Store, KubernetesProvider], Awaitable[None]]) -> None:
    async def main() -> None:
        api = FakeAPIServer()
        base = await api.start()
        store = Store()
        cfg = Configuration(host=base)
        async with ApiClient(cfg) as client:
            provider = KubernetesProvider(HTTP(client), store, node_name="node1")
            task = asyncio.create_task(provider.run())
            try:
                await asyncio.wait_for(provider.synced.wait(), 10)
                await test(api, store, provider)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await api.stop()
    asyncio.run(main())


def port_of(store: Store, name: str) -> int | None:
    obj = store.snapshot().get(kinds.GATEWAY, "default", name)
    return None if obj is None else int(obj.spec["listeners"][0]["port"])


def watch(provider: KubernetesProvider, plural: str) -> Any:
    return next(w for w in provider.watches if w.r.plural == plural)


def test_created_changed_deleted_reach_the_store() -> None:
    async def t(api: FakeAPIServer, store: Store, provider: KubernetesProvider) -> None:
        st = provider.status()
        assert set(st.values()) == {"synced", "not installed"}  # missing CRDs count as synced
        assert st["TLSRoute.gateway.networking.k8s.io"] == "not installed"
        assert st["HTTPRoute.gateway.networking.k8s.io"] == "synced"
        await api.put_object(GW, "gateways", gateway("a"))
        await until(lambda: port_of(store, "a") == 80)
        await api.put_object(GW, "gateways", gateway("a", 81))
        await until(lambda: port_of(store, "a") == 81)
        assert store.snapshot().get(kinds.GATEWAY, "default", "a").generation == 2  # type: ignore[union-attr]
        await api.delete_object(GW, "gateways", "default", "a")
        await until(lambda: port_of(store, "a") is None)
    run(t)


def test_cut_watch_resumes_without_a_list_and_410_lists_again() -> None:
    async def t(api: FakeAPIServer, store: Store, provider: KubernetesProvider) -> None:
        w = watch(provider, "gateways")
        lists = w.lists
        await api.cut_watches()
        await api.put_object(GW, "gateways", gateway("b"))  # while the watch is down
        await until(lambda: port_of(store, "b") == 80)
        assert w.lists == lists  # resumed from its version
        await api.cut_watches()
        # While it reconnects (after its backoff), the history it would resume from goes.
        await api.put_object(GW, "gateways", gateway("c"))
        api.compact()
        await until(lambda: port_of(store, "c") == 80 and w.lists == lists + 1)
        assert port_of(store, "b") == 80  # nothing lost
    run(t)


def test_service_change_without_generation_is_followed() -> None:
    async def t(api: FakeAPIServer, store: Store, provider: KubernetesProvider) -> None:
        svc: dict[str, Any] = {"metadata": {"name": "s", "namespace": "default"},
                               "spec": {"ports": [{"port": 80}]}}
        await api.put_object("", "services", svc)
        await until(lambda: store.snapshot().get(kinds.SERVICE, "default", "s") is not None)
        svc = {"metadata": {"name": "s", "namespace": "default"},
               "spec": {"ports": [{"port": 8080}]}}
        await api.put_object("", "services", svc)

        def port() -> Any:
            obj = store.snapshot().get(kinds.SERVICE, "default", "s")
            return obj.spec["ports"][0]["port"] if obj is not None else None
        await until(lambda: port() == 8080)
    run(t)


def test_only_this_nodes_pods() -> None:
    async def t(api: FakeAPIServer, store: Store, provider: KubernetesProvider) -> None:
        for name, node in (("here", "node1"), ("there", "node2")):
            await api.put_object("", "pods", {"metadata": {"name": name, "namespace": "default"},
                                              "spec": {"nodeName": node}})
        await until(lambda: store.snapshot().get(kinds.POD, "default", "here") is not None)
        await asyncio.sleep(0.2)
        assert store.snapshot().get(kinds.POD, "default", "there") is None
    run(t)
