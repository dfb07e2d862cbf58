"""Manifest input that must not hurt the agent: bounded documents, one bad document among
good ones, per-document parsing, and type errors that name their field."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mesh import documents
from mesh.documents import DocumentError, Limits
from mesh.providers.files import FileProvider
from mesh.store.kinds import HTTP_ROUTE, SERVICE
from mesh.store.store import Store
from mesh.translate import translate


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def service(name: str, port: int | str = 80) -> str:
    return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n"
            f"spec:\n  ports: [{{port: {port!r} }}]\n")


def route(name: str, port: object = 80) -> str:
    return (f"apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
            f"metadata: {{name: {name}, namespace: default}}\n"
            f"spec:\n  parentRefs: [{{name: gw}}]\n"
            f"  rules: [{{backendRefs: [{{name: echo, port: {port}}}]}}]\n")


def test_alias_bomb_is_refused_quickly() -> None:
    text = billion_laughs()
    assert len(text) < 1024
    start = time.perf_counter()
    with pytest.raises(DocumentError, match="expands to more than"):
        documents.load_yaml(text)
    assert time.perf_counter() - start < 1.0


def test_aliases_within_the_limit_still_work() -> None:
    assert documents.load_yaml("a: &x [1, 2]\nb: *x\n") == [{"a": [1, 2], "b": [1, 2]}]


@pytest.mark.parametrize("text, message", [
    ("a: " + "[" * 200 + "]" * 200, "nests deeper"),
    ("".join(" " * i + "k:\n" for i in range(100)), "nests deeper"),
    ("a: *nowhere\n", "undefined alias"),
    ("a: &x [1, *x]\n", "cycle"),
])
def test_pathological_yaml_is_refused(text: str, message: str) -> None:
    with pytest.raises(DocumentError, match=message):
        documents.load_yaml(text)


def test_deep_json_is_refused() -> None:
    with pytest.raises(DocumentError, match="nests deeper"):
        documents.load_json("[" * 10_000 + "]" * 10_000)


def test_binary_and_oversized_files_are_refused() -> None:
    with pytest.raises(DocumentError, match="binary"):
        documents.check_text(b"\x7fELF\x00\x01")
    with pytest.raises(DocumentError, match="not UTF-8"):
        documents.check_text(b"\xff\xfe")
    with pytest.raises(DocumentError, match="over the limit"):
        documents.check_text(b"a" * 101, Limits(file_bytes=100))


def test_split_follows_kubectl_separators() -> None:
    text = "a: 1\n---\nb: 2\n--- # comment\nc: |\n  ---not a separator\n---\n"
    assert [documents.load_yaml(d) for d in documents.split(text)] == [
        [{"a": 1}], [{"b": 2}], [{"c": "---not a separator\n"}]]


def load(tmp_path: Path) -> tuple[Store, FileProvider]:
    store = Store()
    provider = FileProvider(tmp_path, store, clock=lambda: 0.0)
    provider.load()
    return store, provider


def test_a_bad_document_keeps_the_good_ones_and_is_named(tmp_path: Path) -> None:
    (tmp_path / "all.yaml").write_text("---\n".join(
        [service("one"), billion_laughs(), service("three")]))
    store, _ = load(tmp_path)
    snap = store.snapshot()
    assert {o.name for o in snap.of_kind(SERVICE)} == {"one", "three"}
    error = snap.errors[str(tmp_path / "all.yaml")]
    assert error.startswith("document 2: ") and "expands to more than" in error


def test_other_files_keep_working_next_to_a_bomb(tmp_path: Path) -> None:
    (tmp_path / "bomb.yaml").write_text(billion_laughs())
    (tmp_path / "big.yaml").write_bytes(b"a: " + b"x" * 2000 + b"\n")
    (tmp_path / "blob.yaml").write_bytes(b"\x00\x01\x02")
    (tmp_path / "svc.yaml").write_text(service("echo"))
    store = Store()
    FileProvider(tmp_path, store, limits=Limits(file_bytes=1000)).load()
    snap = store.snapshot()
    assert [o.name for o in snap.of_kind(SERVICE)] == ["echo"]
    assert set(snap.errors) == {str(tmp_path / n) for n in ("bomb.yaml", "big.yaml", "blob.yaml")}
    assert "binary" in snap.errors[str(tmp_path / "blob.yaml")]
    assert "over the limit" in snap.errors[str(tmp_path / "big.yaml")]


def test_a_broken_edit_keeps_the_last_good_objects(tmp_path: Path) -> None:
    f = tmp_path / "svc.yaml"
    f.write_text(service("a") + "---\n" + service("b"))
    store, provider = load(tmp_path)
    f.write_text(service("a") + "---\nkind: [unclosed\n")
    provider.load()
    snap = store.snapshot()
    assert {o.name for o in snap.of_kind(SERVICE)} == {"a", "b"}
    assert snap.errors[str(f)].startswith("document 2: ")
    f.write_text(service("a"))
    provider.load()
    snap = store.snapshot()
    assert [o.name for o in snap.of_kind(SERVICE)] == ["a"] and not snap.errors


def test_only_changed_documents_are_parsed(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "routes.yaml"
    f.write_text("---\n".join(route(f"r{i}") for i in range(200)))
    store, provider = load(tmp_path)
    parsed: list[str] = []
    real = documents.load_yaml

    def counting(text: str, limits: Limits = documents.DEFAULT_LIMITS) -> list[object]:
        parsed.append(text)
        return real(text, limits)

    monkeypatch.setattr(documents, "load_yaml", counting)
    before = store.snapshot()
    f.write_text("---\n".join(route(f"r{i}", 81 if i == 7 else 80) for i in range(200)))
    assert provider.load()
    after = store.snapshot()
    assert len(parsed) == 1 and "name: r7" in parsed[0]
    changed = [o.name for o in after.of_kind(HTTP_ROUTE)
               if o.version != before.get(HTTP_ROUTE, "default", o.name).version]  # type: ignore[union-attr]
    assert changed == ["r7"]


GATEWAY = """apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: mesh}
spec: {controllerName: mesh.dev/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: mesh
  listeners: [{name: http, port: 80, protocol: HTTP}]
"""


def test_a_wrong_type_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text(GATEWAY)
    (tmp_path / "r.yaml").write_text(route("r", port='"abc"'))
    store, _ = load(tmp_path)
    snap = store.snapshot()
    out = translate(snap)
    status = out.status[next(o.key for o in snap.of_kind(HTTP_ROUTE))].to_kubernetes()
    accepted = status["parents"][0]["conditions"][0]
    assert (accepted["type"], accepted["status"], accepted["reason"]) == (
        "Accepted", "False", "UnsupportedValue")
    assert accepted["message"] == "backendRefs[].port must be an integer, not the string 'abc'"


def test_aliases_of_a_long_string_are_refused() -> None:
    # 20 KB of text, aliased a thousand times: 24 KB that would build 20 MB.
    text = "a: &s " + "x" * 20_000 + "\nb: [" + ", ".join(["*s"] * 1000) + "]\n"
    with pytest.raises(DocumentError, match="bytes of text"):
        documents.load_yaml(text)


@pytest.mark.parametrize("text", [
    "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {1: a, b: c}\n",
    "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {~: 1, a: 2}\n",
    "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {port: " + "9" * 5000 + "}\n",
    "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {? [a, b] : c}\n",
])
def test_documents_no_api_server_would_take_are_refused_not_fatal(
        tmp_path: Path, text: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    (tmp_path / "good.yaml").write_text(service("good"))
    store, _ = load(tmp_path)
    snap = store.snapshot()
    assert [o.name for o in snap.of_kind(SERVICE)] == ["good"]
    assert snap.errors[str(tmp_path / "bad.yaml")].startswith("document 1: ")


def test_a_list_counts_its_items_against_the_document_limit(tmp_path: Path) -> None:
    items = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{i}"}}
             for i in range(200)]
    (tmp_path / "list.json").write_text(json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": items}))
    store = Store()
    FileProvider(tmp_path, store, limits=Limits(document_bytes=1000)).load()
    assert len(store.snapshot().of_kind(SERVICE)) == 200


def test_a_node_whose_addresses_change_is_a_new_version(tmp_path: Path) -> None:
    from mesh.store.kinds import NODE

    f = tmp_path / "node.yaml"
    node = ("apiVersion: v1\nkind: Node\nmetadata: {name: n}\n"
            "status:\n  addresses: [{type: InternalIP, address: %s}]\n")
    f.write_text(node % "10.0.0.1")
    store, provider = load(tmp_path)
    before = store.snapshot().get(NODE, "", "n")
    f.write_text(node % "10.0.0.2")
    assert provider.load()
    after = store.snapshot().get(NODE, "", "n")
    assert before is not None and after is not None and before.version != after.version


def test_a_resources_file_is_bounded_too(tmp_path: Path) -> None:
    """`mesh run --resources FILE` reads raw Envoy resources under the same limits."""
    from mesh.sinks.envoy.resource_file import ResourceFileError, load_resources

    f = tmp_path / "resources.yaml"
    f.write_text("resources: []\n" + billion_laughs())
    start = time.perf_counter()
    with pytest.raises(ResourceFileError, match="expands to more than"):
        load_resources(f)
    assert time.perf_counter() - start < 1.0
