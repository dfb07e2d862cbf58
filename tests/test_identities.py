"""Security identities (mesh.policy.identities): which labels make one, and how numbers are
chosen so that every node agrees without talking to the others."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from mesh.kube.client import connect
from mesh.kube.identities import PATH, IdentityAllocator, identity_object
from mesh.lab.controlplane import ControlPlane
from mesh.policy import identities as ids
from tests.meshrun import ROOT
from tests.test_kubernetes_real import agent_namespace, install_crds


def test_replicas_share_an_identity_and_other_labels_make_another() -> None:
    a = ids.identity_labels("shop", {"app": "web", "pod-template-hash": "5d9f"}, {})
    b = ids.identity_labels("shop", {"app": "web", "pod-template-hash": "77aa",
                                     "controller-revision-hash": "x"}, {})
    assert a == b == (("app", "web"), ("io.kubernetes.pod.namespace", "shop"))
    assert ids.identity_labels("shop", {"app": "web", "tier": "front"}, {}) != a
    assert ids.identity_labels("other", {"app": "web"}, {}) != a
    # A namespace's labels are part of it: a namespaceSelector selects on them.
    labelled = ids.identity_labels("shop", {"app": "web"}, {"team": "a"})
    assert ("ns:team", "a") in labelled


def test_candidates_cover_every_number_once_from_a_point_the_labels_give() -> None:
    labels = ids.identity_labels("shop", {"app": "web"}, {})
    first = list(itertools.islice(ids.candidates(labels), 3))
    assert first == list(itertools.islice(ids.candidates(labels), 3))  # the same everywhere
    assert all(ids.FIRST <= n <= ids.LAST for n in first)
    assert first[1] == first[0] + 1 or (first[0] == ids.LAST and first[1] == ids.FIRST)
    everything = list(ids.candidates(labels))
    assert len(everything) == len(set(everything)) == ids.LAST - ids.FIRST + 1
    other = ids.identity_labels("shop", {"app": "api"}, {})
    assert next(ids.candidates(other)) != first[0]


def test_a_taken_number_is_probed_past_and_known_labels_are_found() -> None:
    web = ids.identity_labels("shop", {"app": "web"}, {})
    api = ids.identity_labels("shop", {"app": "api"}, {})
    start = next(ids.candidates(web))
    # Another label set holds web's first number (a collision): web takes the next one.
    table = ids.IdentityTable({start: ids.labels_key(api)})
    assert table.find(web) is None
    second = table.next_free(web)
    assert second != start and second in itertools.islice(ids.candidates(web), 2)
    table = ids.IdentityTable({start: ids.labels_key(api), second: ids.labels_key(web)})
    assert table.find(web) == second and table.find(api) == start
    # Two numbers for one label set (a race, a collection): the lowest is the one used.
    twice = ids.IdentityTable({300: ids.labels_key(web), 299: ids.labels_key(web)})
    assert twice.find(web) == 299


def test_a_full_table_is_an_error_not_a_wrong_number() -> None:
    web = ids.identity_labels("shop", {"app": "web"}, {})
    full = ids.IdentityTable({n: f"x={n}" for n in range(ids.FIRST, ids.LAST + 1)})
    with pytest.raises(ValueError, match="no identity left"):
        full.next_free(web)


@pytest.mark.e2e
def test_the_identity_crd_takes_numbers_and_keeps_labels(control_plane: ControlPlane) -> None:
    """The API server is the arbiter: a number is created once (the second create of it is a
    409 the allocator reads), its labels never change, and only 256-65535 are names."""
    cp = control_plane
    cp.kubectl("apply", "--server-side", "-f", str(ROOT / "gateway-api" / "meshidentity.yaml"))
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
               "crd/meshidentities.mesh.dev")
    path = "/apis/mesh.dev/v1alpha1/meshidentities"

    def identity(name: str, **labels: str) -> dict[str, object]:
        return {"apiVersion": "mesh.dev/v1alpha1", "kind": "MeshIdentity",
                "metadata": {"name": name}, "spec": {"labels": labels}}

    try:
        code, body = cp.request("POST", path, identity("40000", app="web"))
        assert code == 201, body
        code, body = cp.request("POST", path, identity("40000", app="api"))
        assert code == 409, body  # taken: the allocator reads whose it is and probes on
        code, body = cp.request("GET", f"{path}/40000")
        assert code == 200 and body["spec"]["labels"] == {"app": "web"}
        body["spec"]["labels"] = {"app": "api"}
        code, answer = cp.request("PUT", f"{path}/40000", body)
        assert code == 422 and "never change" in str(answer), answer
        for bad in ("12", "70000", "0400", "web"):
            code, answer = cp.request("POST", path, identity(bad, app="web"))
            assert code == 422, (bad, answer)
    finally:
        cp.request("DELETE", f"{path}/40000")


@pytest.mark.e2e
def test_agents_racing_for_a_label_set_agree_and_a_collision_probes_on(
        control_plane: ControlPlane, tmp_path: Path) -> None:
    """Two agents (the agent's token and RBAC) seeing the same new label set at once end
    with one identity between them, one created it; a number another label set holds is
    probed past."""
    cp = control_plane
    install_crds(cp)
    web = ids.identity_labels("race", {"app": "web"}, {})
    api = ids.identity_labels("race", {"app": "api"}, {})
    first = next(ids.candidates(api))
    created: list[str] = []

    async def main(kubeconfig: Path) -> tuple[int, int, int, int]:
        async with connect(str(kubeconfig)) as one, connect(str(kubeconfig)) as two:
            a, b = IdentityAllocator(one.call), IdentityAllocator(two.call)
            x, y = await asyncio.gather(a.allocate(web), b.allocate(web))
            made = a.created + b.created
            # `first`, api's first choice, is taken by another label set.
            code, _ = await one.call("POST", PATH, identity_object(first, (("x", "y"),)))
            assert code == 201
            created.append(str(first))
            z = await a.allocate(api)
            return x, y, made, z

    with agent_namespace(cp, "identities", tmp_path / "kubeconfig") as kubeconfig:
        try:
            x, y, made, z = asyncio.run(main(kubeconfig))
            created += [str(x), str(z)]
            assert x == y and made == 1
            assert z != first and z in itertools.islice(ids.candidates(api), 2)
            code, body = cp.request("GET", f"{PATH}/{z}")
            assert code == 200 and body["spec"]["labels"] == dict(api)
        finally:
            for name in created:
                cp.request("DELETE", f"{PATH}/{name}")


def test_the_translator_maps_pod_addresses_and_names_the_label_sets_without_one() -> None:
    from mesh.store.objects import parse_object
    from mesh.store.store import Store
    from mesh.translate.identities import translate_identities

    web = ids.identity_labels("shop", {"app": "web"}, {"team": "a"})

    def pod(name: str, ip: str, phase: str = "Running", **labels: str) -> dict[str, object]:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "shop", "labels": labels},
                "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]}}

    store = Store()
    store.replace("test", [parse_object(d) for d in [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "shop", "labels": {"team": "a"}}},
        {"apiVersion": "mesh.dev/v1alpha1", "kind": "MeshIdentity",
         "metadata": {"name": "4242"}, "spec": {"labels": dict(web)}},
        pod("web-1", "10.244.1.5", app="web", **{"pod-template-hash": "abc"}),
        pod("web-2", "10.244.2.5", app="web", **{"pod-template-hash": "def"}),
        pod("api-1", "10.244.1.6", app="api"),
        pod("done", "10.244.1.7", phase="Succeeded", app="job")]])
    got = translate_identities(store.snapshot())
    assert got.endpoints == (("10.244.1.5", 4242), ("10.244.2.5", 4242))
    assert got.missing == (ids.identity_labels("shop", {"app": "api"}, {"team": "a"}),)


@pytest.mark.e2e
def test_an_api_server_without_the_crd_is_said_not_installed(
        control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resource the API server does not serve (its CRD not installed: a 404 once RBAC lets
    the request through, so as the admin here) is NotInstalled, which the allocator logs once
    and looks for again later, rather than an error a second."""
    from mesh.kube import identities as kube_ids
    from mesh.kube.client import NotInstalled

    monkeypatch.setattr(kube_ids, "PATH", "/apis/mesh.dev/v1alpha1/nosuchidentities")
    labels = ids.identity_labels("none", {"app": "web"}, {})

    async def main() -> None:
        async with connect(str(control_plane.kubeconfig)) as http:
            with pytest.raises(NotInstalled):
                await IdentityAllocator(http.call).allocate(labels)

    asyncio.run(main())


def test_identities_no_pod_uses_are_named_for_collection() -> None:
    from mesh.store.objects import parse_object
    from mesh.store.store import Store
    from mesh.translate.identities import translate_identities

    web = ids.identity_labels("shop", {"app": "web"}, {})
    old = ids.identity_labels("shop", {"app": "web", "version": "v1"}, {})
    store = Store()
    store.replace("test", [parse_object(d) for d in [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
        {"apiVersion": "mesh.dev/v1alpha1", "kind": "MeshIdentity",
         "metadata": {"name": "4242"}, "spec": {"labels": dict(web)}},
        {"apiVersion": "mesh.dev/v1alpha1", "kind": "MeshIdentity",
         "metadata": {"name": "4243"}, "spec": {"labels": dict(old)}},
        # Not started yet (no address): its identity is still in use.
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
         "status": {"phase": "Pending"}}]])
    assert translate_identities(store.snapshot()).unused == (4243,)


@pytest.mark.e2e
def test_the_leader_collects_identities_unused_for_the_grace_period(
        control_plane: ControlPlane, tmp_path: Path) -> None:
    """With the agent's token and RBAC: an identity unused for the grace period is deleted,
    one used again before it is kept, and nothing is deleted while not leading."""
    from mesh import ir
    from mesh.kube.identities import IdentityCollector

    cp = control_plane
    install_crds(cp)
    now = [0.0]
    for n in (41000, 41001):
        cp.request("POST", PATH, identity_object(n, (("app", f"gc{n}"),)))

    async def main(kubeconfig: Path) -> tuple[int, int]:
        async with connect(str(kubeconfig)) as http:
            leading = [False]
            gc = IdentityCollector(http.call, lambda: leading[0], None, grace=60, every=0.05,
                                   clock=lambda: now[0])
            task = asyncio.create_task(gc.run())
            gc.apply(ir.IR(identities=ir.IdentityMap(unused=(41000, 41001))))
            now[0] = 30.0
            gc.apply(ir.IR(identities=ir.IdentityMap(unused=(41000,))))  # 41001 used again
            now[0] = 61.0
            gc.apply(ir.IR(identities=ir.IdentityMap(unused=(41000,))))
            await asyncio.sleep(0.3)
            not_leading = gc.deleted
            leading[0] = True
            gc.apply(ir.IR(identities=ir.IdentityMap(unused=(41000,))))
            for _ in range(50):
                if gc.deleted:
                    break
                await asyncio.sleep(0.1)
            task.cancel()
            return not_leading, gc.deleted

    with agent_namespace(cp, "identity-gc", tmp_path / "kubeconfig") as kubeconfig:
        try:
            assert asyncio.run(main(kubeconfig)) == (0, 1)
            assert cp.request("GET", f"{PATH}/41000")[0] == 404
            assert cp.request("GET", f"{PATH}/41001")[0] == 200
        finally:
            for n in (41000, 41001):
                cp.request("DELETE", f"{PATH}/{n}")
