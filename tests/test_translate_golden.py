"""Golden files for the translator: input manifests -> IR, and -> status. The expected IR
is in the encoding of tests/ircodec.py, which the Envoy sink's golden test
(test_envoy_golden) reads back as its input: IR -> Envoy resources. Set UPDATE_GOLDEN=1 to
rewrite the expected files (the Envoy ones too, from the IR written) after a deliberate
change, then read the diff."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.providers.files import FileProvider
from mesh.sinks.envoy.translate import EnvoyCache, to_envoy
from mesh.store.kinds import GATEWAY
from mesh.store.objects import ObjectKey, parse_object
from mesh.store.store import Store, StoreSnapshot
from mesh.translate import Translation, TranslationMemo, TranslatorConfig, translate
from mesh.translate.status import GatewayStatus
from tests import ircodec, test_envoy_golden

GOLDEN = Path(__file__).parent / "golden" / "translate"
CASES = sorted(p.stem for p in GOLDEN.glob("*.yaml"))


def golden_files(translation: Translation) -> dict[str, str]:
    """The expected files' text, by stage."""
    status = {str(k): v.to_kubernetes() for k, v in sorted(translation.status.items())}
    return {"ir": ircodec.dump(translation.ir),
            "status": yaml.safe_dump(status, sort_keys=False, width=100)}


def stages(translation: Translation) -> dict[str, Any]:
    """Every stage's output, to compare translations by."""
    return {**golden_files(translation),
            "envoy": test_envoy_golden.resources(translation.ir)}


def load(directory: Path) -> StoreSnapshot:
    store = Store()
    FileProvider(directory, store, clock=lambda: 0.0).load()
    return store.snapshot()


@pytest.mark.parametrize("case", CASES)
def test_translation_matches_golden_files(case: str, tmp_path: Path) -> None:
    shutil.copy(GOLDEN / f"{case}.yaml", tmp_path / "input.yaml")
    snapshot = load(tmp_path)
    assert dict(snapshot.errors) == {}
    # The node whose addresses NodePorts are served on, where a case has a Node of this name.
    translation = translate(snapshot, TranslatorConfig(node_name="golden-node",
                                                       global_rate_limits=True))
    expected_dir = GOLDEN / "expected"
    for stage, text in golden_files(translation).items():
        path = expected_dir / f"{case}.{stage}.yaml"
        if os.environ.get("UPDATE_GOLDEN"):
            expected_dir.mkdir(exist_ok=True)
            path.write_text(text)
        assert text == path.read_text(), f"{case}: {stage} differs from {path}"
    # The IR file is the Envoy stage's input: it must be this IR, nothing left out.
    assert ircodec.load((expected_dir / f"{case}.ir.yaml").read_text()) == translation.ir
    if os.environ.get("UPDATE_GOLDEN"):
        test_envoy_golden.update(case)


def test_translation_is_deterministic(tmp_path: Path) -> None:
    for case in CASES:
        shutil.copy(GOLDEN / f"{case}.yaml", tmp_path / f"{case}.yaml")
    snapshot = load(tmp_path)
    assert stages(translate(snapshot)) == stages(translate(snapshot))


def test_cached_translation_equals_a_fresh_one(tmp_path: Path) -> None:
    """The agent reuses unchanged routes' outcomes: after any sequence of edits the result
    must be what a translation from scratch gives."""
    store = Store()
    provider = FileProvider(tmp_path, store, clock=lambda: 0.0)
    cache = TranslationMemo()
    for case in CASES:
        shutil.copy(GOLDEN / f"{case}.yaml", tmp_path / f"{case}.yaml")
    steps: list[Callable[[], object]] = [
        lambda: None,  # first translation fills the cache
        lambda: None,  # nothing changed: everything reused
        lambda: (tmp_path / "http-basic.yaml").write_text(
            (GOLDEN / "http-basic.yaml").read_text().replace("/old", "/older")),
        lambda: (tmp_path / "references.yaml").write_text(
            (GOLDEN / "references.yaml").read_text().replace("weight: 90", "weight: 50")),
        # A Service change (a world object) invalidates the reused outcomes.
        lambda: (tmp_path / "http-basic.yaml").write_text(
            (GOLDEN / "http-basic.yaml").read_text().replace("port: 8080", "port: 8081")),
        lambda: (tmp_path / "listeners.yaml").unlink(),
    ]
    envoy_cache = EnvoyCache()
    for step in steps:
        step()
        provider.load()
        snapshot = store.snapshot()
        translation = translate(snapshot, memo=cache)
        assert stages(translation) == stages(translate(snapshot))
        # The xDS translator's own cache gives the same bytes as a conversion from scratch.
        cached_bytes = [m.SerializeToString(deterministic=True)
                        for m in to_envoy(translation.ir, envoy_cache).resources]
        fresh_bytes = [m.SerializeToString(deterministic=True)
                       for m in to_envoy(translation.ir).resources]
        assert cached_bytes == fresh_bytes
    assert cache.hits > 0


def test_cached_translation_follows_content_not_generation() -> None:
    """As an API server sends them: a Service's port changes and its generation does not
    (core kinds have none); a route changes under the same generation (what the memo keys
    on must be content, whatever a server does with generations). The memo must see each
    change, as a fresh translation does."""
    docs = list(yaml.safe_load_all((GOLDEN / "http-basic.yaml").read_text()))

    def snapshot(port: int, path: str) -> StoreSnapshot:
        objects = []
        for d in docs:
            d = {**d, "metadata": {**d["metadata"], "generation": 1}}
            if d["kind"] == "Service":
                d["spec"] = {**d["spec"], "ports": [{**p, "port": port}
                                                    for p in d["spec"]["ports"]]}
            if d["kind"] == "HTTPRoute":
                d = json.loads(json.dumps(d).replace('"/old"', json.dumps(path)))
            objects.append(parse_object(d))
        return StoreSnapshot.of(objects)

    memo = TranslationMemo()
    steps = [snapshot(8080, "/old"), snapshot(8081, "/old"), snapshot(8081, "/older")]
    assert all(o.generation == 1 for s in steps for o in s)
    previous = None
    for snap in steps:
        cached = translate(snap, memo=memo)
        assert stages(cached) == stages(translate(snap))
        assert stages(cached) != previous
        previous = stages(cached)


def test_static_addresses_the_node_has_are_served_and_others_reported() -> None:
    """spec.addresses: served on those the node has (and loopback), the others named in
    Programmed=False AddressNotUsable; the Gateway stays Accepted."""
    docs = [
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
         "metadata": {"name": "mesh"}, "spec": {"controllerName": "mesh.dev/gateway-controller"}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "gw", "namespace": "default"},
         "spec": {"gatewayClassName": "mesh",
                  "addresses": [{"value": "10.0.0.1"}, {"type": "IPAddress", "value": "10.9.9.9"},
                                {"value": "127.0.0.5"}],
                  "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}},
        # The node's facts, as the node provider puts them in the store.
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
         "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}},
    ]
    snapshot = StoreSnapshot.of(parse_object(d) for d in docs)
    out = translate(snapshot, TranslatorConfig(node_name="node-a"))
    status = out.status[ObjectKey(GATEWAY.group, "Gateway", "default", "gw")]
    assert isinstance(status, GatewayStatus)
    gw = status.to_kubernetes()
    assert [a["value"] for a in gw["addresses"]] == ["10.0.0.1", "127.0.0.5"]
    conds = {c["type"]: c for c in gw["conditions"]}
    assert conds["Accepted"]["status"] == "True"
    assert (conds["Programmed"]["status"], conds["Programmed"]["reason"]) == \
        ("False", "AddressNotUsable")
    assert "10.9.9.9" in conds["Programmed"]["message"]
    assert sorted(li.name for li in out.ir.listeners) == ["10.0.0.1:80", "127.0.0.5:80"]
