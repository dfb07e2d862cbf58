"""The ingress-nginx compatibility table against the parser, and `mesh ingress-nginx check`
(mesh/ingress_nginx_check.py) on Ingresses as users have them: a directory, `kubectl get
ingress -A -o yaml` on standard input, JSON; table and JSON output; exit codes 0, 1, 2."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from mesh.cli import main
from mesh.store.objects import parse_object
from mesh.translate import ingress_annotations
from mesh.translate import ingress_nginx_compat as compat
from mesh.translate.ingress_annotations import NGINX

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ingress-nginx"


def ingress(name: str, annotations: dict[str, Any] | None = None, namespace: str = "shop",
            cls: str | None = "nginx", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"rules": [{"host": "shop.example.com", "http": {"paths": [{
        "path": "/", "pathType": "Prefix",
        "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}], **spec}
    if cls is not None:
        body["ingressClassName"] = cls
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": namespace,
                         "annotations": annotations or {}}, "spec": body}


def ingress_class(name: str, controller: str, default: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if default:
        meta["annotations"] = {"ingressclass.kubernetes.io/is-default-class": "true"}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass", "metadata": meta,
            "spec": {"controller": controller}}


def as_list(*items: dict[str, Any]) -> str:
    """What `kubectl get ingress -A -o yaml` prints."""
    return yaml.safe_dump({"apiVersion": "v1", "kind": "List", "metadata": {},
                           "items": list(items)})


def check(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, ["ingress-nginx", "check", *args], input=stdin)


def check_json(*args: str, stdin: str | None = None) -> tuple[int, dict[str, Any]]:
    result = check(*args, "-o", "json", stdin=stdin)
    return result.exit_code, json.loads(result.stdout)


def findings(doc: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """An Ingress's findings by annotation name."""
    [ing] = [i for i in doc["ingresses"] if i["name"] == name]
    return {a["name"]: a for a in ing["annotations"]}


# -- the table against the parser ---------------------------------------------------------------

def test_one_entry_per_annotation_in_families() -> None:
    names = [a.name for a in compat.ANNOTATIONS]
    assert len(names) == len(set(names)) >= 120
    for a in compat.ANNOTATIONS:
        assert a.family in compat.FAMILIES
        if a.level is compat.Level.NOT_SUPPORTED:
            assert a.difference and not a.here, a.name  # a reason, nothing done
        else:
            assert a.here, a.name
        if a.level is compat.Level.PARTLY:
            assert a.difference, a.name  # partly: the difference is told
    # A family's entries are together (the table reads family by family).
    seen = [a.family for a in compat.ANNOTATIONS]
    assert [f for i, f in enumerate(seen) if i == 0 or seen[i - 1] != f] == \
        list(compat.FAMILIES)


def test_the_parser_reads_exactly_the_supported_ones() -> None:
    supported = {a.name for a in compat.ANNOTATIONS if a.supported}
    assert set(ingress_annotations.SUPPORTED) - supported == set(), \
        "the parser reads these; the table says they are not supported"
    assert supported - set(ingress_annotations.SUPPORTED) == set(), \
        "the table says these are supported; the parser does not read them"
    assert set(ingress_annotations.WHY_NOT) == {a.name for a in compat.ANNOTATIONS
                                                if not a.supported}


def _parsed(annotations: dict[str, str]) -> ingress_annotations.IngressSettings:
    return ingress_annotations.parse(parse_object(ingress("x", annotations)))


@pytest.mark.parametrize("name", [a.name for a in compat.ANNOTATIONS if not a.supported])
def test_a_not_supported_annotation_is_not_parsed(name: str) -> None:
    """It does what an unknown name does (nothing), and its warning gives the reason; or,
    the table says so (`closes`), it closes the paths rather than leave them open."""
    s = _parsed({NGINX + name: "1"})
    assert (f"{NGINX}{name} is not supported ({compat.BY_NAME[name].difference}): ignored"
            in s.warnings)
    unknown = replace(_parsed({NGINX + "made-up": "1"}), warnings=())
    if compat.BY_NAME[name].closes:
        assert s.auth is not None and s.auth.closed
    else:
        assert replace(s, warnings=()) == unknown
        assert len(s.warnings) == 1


@pytest.mark.parametrize("name", sorted(ingress_annotations.SUPPORTED))
def test_a_supported_annotation_is_parsed(name: str) -> None:
    s = _parsed({NGINX + name: "1"})
    assert not any(w.startswith(f"{NGINX}{name} is not supported") for w in s.warnings)


# -- the command ----------------------------------------------------------------------------

def test_the_example_as_a_table() -> None:
    result = check(str(EXAMPLE))
    assert result.exit_code == 1, result.output
    out = result.stdout
    for text in ("INGRESS", "SUPPORT", "shop/web", "shop/api", "rewrite-target", "partly",
                 "configuration-snippet", "not supported", "refused",
                 '"three" is refused: not a whole number', "ops/dashboard", "not judged",
                 "class traefik"):
        assert text in out, text
    assert "4 Ingress(es): 2 as under ingress-nginx, 1 with differences, 1 not judged" in out


def test_the_example_as_json() -> None:
    code, doc = check_json(str(EXAMPLE))
    assert code == doc["exitCode"] == 1
    assert doc["summary"] == {"ingresses": 4, "unchanged": 2, "changed": 1, "notJudged": 1,
                              "errors": 0}
    web = findings(doc, "web")
    assert {a["support"] for a in web.values()} == {"supported"}
    api = findings(doc, "api")
    assert api["rewrite-target"]["support"] == "partly"
    assert api["rewrite-target"]["difference"] == compat.BY_NAME["rewrite-target"].difference
    assert api["rewrite-target"]["value"] == "/$2"
    assert api["configuration-snippet"]["support"] == "not supported"
    tries = api["proxy-next-upstream-tries"]
    assert (tries["support"], tries["changes"]) == ("refused", True)
    assert tries["warnings"] == [f'{NGINX}proxy-next-upstream-tries: "three" is refused: '
                                 "not a whole number"]
    [dashboard] = [i for i in doc["ingresses"] if i["name"] == "dashboard"]
    assert (dashboard["judged"], dashboard["class"], dashboard["annotations"]) == \
        (False, "traefik", [])


def test_only_supported_annotations_exit_0() -> None:
    text = as_list(ingress("web", {NGINX + "limit-burst-multiplier": "3",
                                   "mesh.dev/proxy-connect-timeout": "5s"}),
                   ingress("plain"))
    result = check("-", stdin=text)
    assert result.exit_code == 0, result.output
    assert "no ingress-nginx annotations" in result.stdout
    code, doc = check_json("-", stdin=text)
    assert code == 0
    assert findings(doc, "web")["proxy-connect-timeout"]["key"] == \
        "mesh.dev/proxy-connect-timeout"


def test_stdin_multi_document_yaml_and_json() -> None:
    docs = [ingress("a", {NGINX + "auth-type": "basic"}), ingress("b")]
    code, doc = check_json("-", stdin=yaml.safe_dump_all(docs))
    assert code == 1 and [i["name"] for i in doc["ingresses"]] == ["a", "b"]
    assert findings(doc, "a")["auth-type"]["difference"] == \
        compat.BY_NAME["auth-type"].difference
    listed = {"apiVersion": "v1", "kind": "List", "items": docs}
    code, doc = check_json("-", stdin=json.dumps(listed, indent=1))
    assert code == 1 and doc["summary"]["ingresses"] == 2


def test_values_the_parser_refuses_and_its_other_warnings() -> None:
    text = as_list(ingress("a", {NGINX + "limit-rps": "ten",
                                 NGINX + "cors-allow-origin": "https://a.example",
                                 NGINX + "whitelist-source-range": "10.0.0.0/8,nope"}))
    code, doc = check_json("-", stdin=text)
    a = findings(doc, "a")
    assert code == 1
    assert a["limit-rps"]["support"] == "refused"
    assert a["whitelist-source-range"]["support"] == "refused"
    assert "403 until it is fixed" in a["whitelist-source-range"]["warnings"][0]
    # Supported, and ignored as ingress-nginx ignores it: said, not counted as a change.
    cors = a["cors-allow-origin"]
    assert (cors["support"], cors["changes"]) == ("supported", False)
    assert "it needs" in cors["warnings"][0]


def test_unknown_annotations_are_not_supported() -> None:
    code, doc = check_json("-", stdin=as_list(ingress("a", {
        NGINX + "enable-opentracing": "true", "mesh.dev/whatever": "x",
        "other.io/thing": "y"})))
    a = findings(doc, "a")
    assert code == 1 and set(a) == {"enable-opentracing", "whatever"}
    assert a["enable-opentracing"]["support"] == "not supported"
    assert "not an annotation ingress-nginx documents" in a["enable-opentracing"]["difference"]


def test_classes_decide_what_is_judged() -> None:
    text = as_list(
        ingress_class("internal", "k8s.io/ingress-nginx"),
        ingress_class("traefik", "traefik.io/ingress-controller", default=True),
        ingress("by-class", {NGINX + "server-snippet": "x"}, cls="internal"),
        ingress("by-annotation", {NGINX + "server-snippet": "x",
                                  "kubernetes.io/ingress.class": "nginx"}, cls=None),
        ingress("defaulted", {NGINX + "server-snippet": "x"}, cls=None),
        ingress("other", {NGINX + "server-snippet": "x"}, cls="alb"))
    code, doc = check_json("-", stdin=text)
    judged = {i["name"]: i["judged"] for i in doc["ingresses"]}
    assert judged == {"by-class": True, "by-annotation": True, "defaulted": False,
                      "other": False}
    assert code == 1
    code, doc = check_json("-", "--class", "alb", "--class", "traefik", stdin=text)
    judged = {i["name"]: i["judged"] for i in doc["ingresses"]}
    assert judged == {"by-class": True, "by-annotation": False, "defaulted": True,
                      "other": True}


def test_no_class_and_no_default_is_judged_with_a_note() -> None:
    code, doc = check_json("-", stdin=as_list(ingress("a", cls=None)))
    [a] = doc["ingresses"]
    assert (code, a["judged"], a["class"]) == (0, True, None)
    assert "default" in a["note"]


def test_only_ingresses_are_judged() -> None:
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "annotations": {NGINX + "server-snippet": "x"}}}
    code, doc = check_json("-", stdin=as_list(service))
    assert (code, doc["ingresses"], doc["errors"]) == (0, [], [])


def test_tls_without_annotations_loses_the_redirect() -> None:
    tls = [{"hosts": ["shop.example.com"], "secretName": "shop-tls"}]
    code, doc = check_json("-", stdin=as_list(ingress("a", tls=tls)))
    assert code == 1
    assert findings(doc, "a")["ssl-redirect (default)"]["support"] == "partly"
    code, doc = check_json("-", stdin=as_list(ingress("a", {NGINX + "force-ssl-redirect": "true"},
                                                      tls=tls)))
    assert code == 0


def test_an_ingress_the_mesh_would_not_serve() -> None:
    bad = ingress("a")
    bad["spec"]["rules"][0]["http"]["paths"][0]["backend"] = {
        "resource": {"kind": "Bucket", "name": "b"}}
    code, doc = check_json("-", stdin=as_list(bad))
    assert code == 1
    assert "would not serve" in findings(doc, "a")["Ingress"]["difference"]


def test_a_directory_with_a_bad_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "good.yaml").write_text(yaml.safe_dump(ingress("good")))
    (tmp_path / "bad.yaml").write_text("kind: [unclosed\n")
    (tmp_path / "scalar.json").write_text('"just a string"')
    (tmp_path / "notes.txt").write_text("not a manifest")
    (tmp_path / ".hidden.yaml").write_text("kind: [unclosed\n")
    code, doc = check_json(str(tmp_path))
    assert code == 2
    assert [i["name"] for i in doc["ingresses"]] == ["good"]
    assert sorted(e["source"] for e in doc["errors"]) == [str(tmp_path / "bad.yaml"),
                                                          str(tmp_path / "scalar.json")]
    result = check(str(tmp_path))
    assert result.exit_code == 2
    assert f"cannot read {tmp_path / 'bad.yaml'}:" in result.stderr
    assert "shop/good" in result.stdout


def test_unreadable_input_exits_2(tmp_path: Path) -> None:
    assert check("-", stdin="a: b: c\n").exit_code == 2
    binary = tmp_path / "x.yaml"
    binary.write_bytes(b"\x00\x01")
    code, doc = check_json(str(binary))
    assert code == 2 and "binary" in doc["errors"][0]["error"]
    assert check(str(tmp_path / "missing")).exit_code == 2  # click: no such path


def test_as_a_subprocess() -> None:
    text = as_list(ingress("a", {NGINX + "rewrite-target": "/$1"}))
    proc = subprocess.run([sys.executable, "-m", "mesh.cli", "ingress-nginx", "check", "-",
                           "-o", "json"], input=text, capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=False)
    assert proc.returncode == 1, proc.stderr
    assert findings(json.loads(proc.stdout), "a")["rewrite-target"]["support"] == "partly"
