"""The Kubernetes provider against the real API server (the run's shared control plane,
tests/cluster.py), with the agent's token and RBAC: objects created, changed and deleted
reach the store; a Service change (Services have no generation) is followed; this node's
Pods only; a kind the server does not serve (a CRD not installed) does not block the first
sync. The API double (tests/kubeapi.py) keeps the one thing the real server cannot be made
to do on demand: cut a watch mid-stream, and forget history (410) at a chosen moment."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient, Configuration

from mesh.kube.client import HTTP, connect
from mesh.lab.controlplane import ControlPlane
from mesh.providers.kubernetes import KubernetesProvider
from mesh.store import kinds
from mesh.store.store import Store
from tests import manifests
from tests.cluster import eventually
from tests.kubeapi import FakeAPIServer
from tests.test_kubernetes_real import agent_namespace, apply, install_crds

GW = "gateway.networking.k8s.io"
NAMESPACE = "real-provider"


def gateway(name: str, port: int = 80, namespace: str = "default") -> dict[str, Any]:
    return manifests.gateway(None, manifests.listener("http", port), name=name,
                             namespace=namespace)


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


async def provided(http: HTTP, node: str,
                   test: Callable[[Store, KubernetesProvider], Awaitable[None]]) -> None:
    """`test` with a provider for `node` reading through `http`, once it synced."""
    store = Store()
    provider = KubernetesProvider(http, store, node_name=node)
    task = asyncio.create_task(provider.run())
    try:
        await asyncio.wait_for(provider.synced.wait(), 10)
        await test(store, provider)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def port_of(store: Store, name: str, namespace: str = NAMESPACE) -> int | None:
    obj = store.snapshot().get(kinds.GATEWAY, namespace, name)
    return None if obj is None else int(obj.spec["listeners"][0]["port"])


# -- against the real API server ------------------------------------------------------------


@dataclass
class Server:
    cp: ControlPlane
    kubeconfig: Path  # the agent's

    async def apply(self, *objects: dict[str, Any]) -> None:
        await asyncio.to_thread(apply, self.cp, *objects)

    async def kubectl(self, *args: str) -> None:
        await asyncio.to_thread(self.cp.kubectl, *args, "-n", NAMESPACE)


@pytest.fixture(scope="module")
def server(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Server]:
    install_crds(control_plane)
    path = tmp_path_factory.mktemp("provider") / "kubeconfig"
    with agent_namespace(control_plane, NAMESPACE, path) as kubeconfig:
        yield Server(control_plane, kubeconfig)


def run(server: Server, test: Callable[[Store, KubernetesProvider], Awaitable[None]],
        node: str = "provider-node") -> None:
    async def main() -> None:
        async with connect(str(server.kubeconfig)) as http:
            await provided(http, node, test)
    asyncio.run(main())


@pytest.mark.e2e
def test_created_changed_deleted_reach_the_store(server: Server) -> None:
    async def t(store: Store, provider: KubernetesProvider) -> None:
        st = provider.status()
        assert set(st.values()) == {"synced", "not installed"}  # missing CRDs count as synced
        # Gateway API v1.6.1 serves ListenerSet, no longer its experimental XListenerSet.
        assert st["XListenerSet.gateway.networking.x-k8s.io"] == "not installed"
        assert st["HTTPRoute.gateway.networking.k8s.io"] == "synced"
        await server.apply(gateway("a", namespace=NAMESPACE))
        await until(lambda: port_of(store, "a") == 80)
        await server.apply(gateway("a", 81, namespace=NAMESPACE))
        await until(lambda: port_of(store, "a") == 81)
        assert store.snapshot().get(kinds.GATEWAY, NAMESPACE, "a").generation == 2  # type: ignore[union-attr]
        await server.kubectl("delete", "gateway", "a")
        await until(lambda: port_of(store, "a") is None)
    run(server, t)


@pytest.mark.e2e
def test_service_change_without_generation_is_followed(server: Server) -> None:
    def svc(port: int) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "s", "namespace": NAMESPACE},
                "spec": {"ports": [{"port": port}]}}

    async def t(store: Store, provider: KubernetesProvider) -> None:
        def port() -> Any:
            obj = store.snapshot().get(kinds.SERVICE, NAMESPACE, "s")
            return obj.spec["ports"][0]["port"] if obj is not None else None

        await server.apply(svc(80))
        await until(lambda: port() == 80)
        await server.apply(svc(8080))
        await until(lambda: port() == 8080)
    run(server, t)
    code, body = server.cp.request("GET", f"/api/v1/namespaces/{NAMESPACE}/services/s")
    assert code == 200 and "generation" not in body["metadata"]  # what makes it a test


@pytest.mark.e2e
def test_every_nodes_pods(server: Server) -> None:
    """Every node's Pods reach the store (network policy needs every pod's identity and named
    ports); what is this node's is the translator's to pick, by spec.nodeName."""
    # A Pod needs its namespace's default ServiceAccount, which a controller makes.
    eventually("the namespace's default ServiceAccount", lambda: server.cp.request(
        "GET", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default")[0] == 200)

    async def t(store: Store, provider: KubernetesProvider) -> None:
        # Bound to Nodes that do not exist: no kubelet runs them, the scheduler leaves them.
        await server.apply(*({"apiVersion": "v1", "kind": "Pod",
                              "metadata": {"name": name, "namespace": NAMESPACE},
                              "spec": {"nodeName": node, "containers": [
                                  {"name": "c", "image": "none"}]}}
                             for name, node in (("here", "pods-here"),
                                                ("there", "pods-there"))))
        await until(lambda: store.snapshot().get(kinds.POD, NAMESPACE, "here") is not None)
        await until(lambda: store.snapshot().get(kinds.POD, NAMESPACE, "there") is not None)
        there = store.snapshot().get(kinds.POD, NAMESPACE, "there")
        assert there is not None and there.spec["nodeName"] == "pods-there"
    try:
        run(server, t, node="pods-here")
    finally:  # no kubelet confirms a graceful delete
        server.cp.kubectl("delete", "pods", "here", "there", "-n", NAMESPACE,
                          "--grace-period=0", "--force", "--ignore-not-found", check=False)


# -- against the double ---------------------------------------------------------------------


def run_double(test: Callable[[FakeAPIServer, Store, KubernetesProvider], Awaitable[None]]
               ) -> None:
    async def main() -> None:
        api = FakeAPIServer()
        base = await api.start()
        try:
            async with ApiClient(Configuration(host=base)) as client:
                await provided(HTTP(client), "node1",
                               lambda store, provider: test(api, store, provider))
        finally:
            await api.stop()
    asyncio.run(main())


def test_cut_watch_resumes_without_a_list_and_410_lists_again() -> None:
    # The double: a real API server cannot be made to cut a watch mid-stream, nor to forget
    # the history a watch resumes from (410 Gone) at a chosen moment.
    async def t(api: FakeAPIServer, store: Store, provider: KubernetesProvider) -> None:
        w = next(w for w in provider.watches if w.r.plural == "gateways")
        lists = w.lists
        await api.cut_watches()
        await api.put_object(GW, "gateways", gateway("b"))  # while the watch is down
        await until(lambda: port_of(store, "b", "default") == 80)
        assert w.lists == lists  # resumed from its version
        await api.cut_watches()
        # While it reconnects (after its backoff), the history it would resume from goes.
        await api.put_object(GW, "gateways", gateway("c"))
        api.compact()
        await until(lambda: port_of(store, "c", "default") == 80 and w.lists == lists + 1)
        assert port_of(store, "b", "default") == 80  # nothing lost
    run_double(t)
