"""The cases of ../shared/ingress-nginx/cases.yaml, read and checked against the schema its
header comment (and README) gives.

The data is read at run time, never copied into the project. Every key is checked: a key
the runner does not know (a new expectation, say) makes the case fail with that reason
instead of being skipped silently, so a case can only pass on what was really judged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "ingress-nginx"
NGINX = "nginx.ingress.kubernetes.io/"

CASE_KEYS = {"id", "file", "title", "annotation", "note", "derived", "ingresses", "requests",
             "steps"}
STEP_KEYS = {"apply", "requests"}
INGRESS_KEYS = {"name", "host", "path", "backend", "paths", "default_backend", "tls",
                "annotations", "raw_annotations"}
PATH_KEYS = {"path", "backend"}
REQUEST_KEYS = {"method", "path", "host", "scheme", "headers", "cookies", "repeat",
                "capture_cookie", "expect", "distribution"}
EXPECT_KEYS = {"status", "backend", "path_startswith", "headers_equal", "headers_list_equal",
               "headers_present", "headers_absent", "set_cookie_contains",
               "set_cookie_not_contains", "set_cookie_empty", "set_cookie_expires_in",
               "backend_host", "backend_header_equal", "backend_header_absent",
               "distribution"}
DISTRIBUTION_KEYS = {"n", "min_each"}
BACKENDS = ("main", "canary")  # the echo deployments; any other name is no Service


@dataclass
class Request:
    method: str
    path: str
    host: str | None  # None: the Ingress address itself
    scheme: str
    headers: dict[str, str]
    cookies: dict[str, str]  # values may be "${NAME}": a cookie captured earlier
    repeat: int
    capture_cookie: str | None
    expect: dict[str, Any]
    distribution: dict[str, int] | None

    def describe(self, address: str = "") -> str:
        host = self.host if self.host is not None else address or "<address>"
        extra = [f"{k}: {v}" for k, v in self.headers.items()]
        if self.cookies:
            extra.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        return f"{self.method} {self.scheme}://{host}{self.path}" + \
            (f" [{', '.join(extra)}]" if extra else "")


@dataclass
class Step:
    apply: list[dict[str, Any]]  # the Ingresses as the data gives them
    requests: list[Request]


@dataclass
class Case:
    id: str
    file: str
    title: str
    annotation: str
    note: str
    derived: bool
    steps: list[Step]
    problems: list[str] = field(default_factory=list)  # what the runner cannot run

    @property
    def forwarded_headers(self) -> bool:
        """Whether upstream runs this case with the controller option use-forwarded-headers
        (its ipdenylist tests: X-Forwarded-For names the client)."""
        return self.file == "ipdenylist.go" or "use-forwarded-headers" in self.note or any(
            k.lower() == "x-forwarded-for" for s in self.steps for r in s.requests
            for k in r.headers)

    @property
    def request_count(self) -> int:
        return sum(len(s.requests) for s in self.steps)


def _unknown(where: str, got: dict[str, Any], known: set[str]) -> list[str]:
    return [f"{where}: unknown key {k!r} (the runner does not implement it)"
            for k in sorted(set(got) - known)]


def _request(raw: dict[str, Any], default_host: str, where: str,
             problems: list[str]) -> Request:
    problems += _unknown(where, raw, REQUEST_KEYS)
    expect = dict(raw.get("expect") or {})
    problems += _unknown(f"{where} expect", expect, EXPECT_KEYS)
    distribution = raw.get("distribution") or expect.pop("distribution", None)
    if distribution is not None:
        problems += _unknown(f"{where} distribution", distribution, DISTRIBUTION_KEYS)
        if not {"n", "min_each"} <= set(distribution):
            problems.append(f"{where}: distribution needs n and min_each")
    if not expect and distribution is None:
        problems.append(f"{where}: nothing is expected")
    host = raw["host"] if "host" in raw else default_host
    return Request(
        method=str(raw.get("method") or "GET"), path=str(raw.get("path") or "/"),
        host=str(host) if host else None, scheme=str(raw.get("scheme") or "http"),
        headers={str(k): str(v) for k, v in (raw.get("headers") or {}).items()},
        cookies={str(k): str(v) for k, v in (raw.get("cookies") or {}).items()},
        repeat=int(raw.get("repeat") or 1), capture_cookie=raw.get("capture_cookie"),
        expect=expect,
        distribution={k: int(v) for k, v in distribution.items()} if distribution else None)


def parse_case(raw: dict[str, Any]) -> Case:
    problems = _unknown("case", raw, CASE_KEYS)
    if "steps" in raw:
        raw_steps = list(raw["steps"])
        if "ingresses" in raw or "requests" in raw:
            problems.append("case: both steps and ingresses/requests")
    else:
        raw_steps = [{"apply": raw.get("ingresses") or [], "requests": raw.get("requests") or []}]
    first: dict[str, Any] = next((i for s in raw_steps for i in s.get("apply") or []), {})
    default_host = str(first.get("host") or "")
    steps = []
    for n, s in enumerate(raw_steps, 1):
        problems += _unknown(f"step {n}", s, STEP_KEYS)
        apply = list(s.get("apply") or [])
        for ing in apply:
            problems += _unknown(f"step {n} Ingress {ing.get('name')}", ing, INGRESS_KEYS)
            for p in ing.get("paths") or []:
                problems += _unknown(f"step {n} Ingress {ing.get('name')} path", p, PATH_KEYS)
            if "name" not in ing:
                problems.append(f"step {n}: an Ingress without a name")
        reqs = [_request(r, default_host, f"step {n} request {i}", problems)
                for i, r in enumerate(s.get("requests") or [], 1)]
        steps.append(Step(apply, reqs))
    case = Case(id=str(raw.get("id")), file=str(raw.get("file") or ""),
                title=str(raw.get("title") or ""), annotation=str(raw.get("annotation") or ""),
                note=str(raw.get("note") or ""), derived=bool(raw.get("derived")),
                steps=steps, problems=problems)
    if not case.request_count:
        problems.append("the case sends no request")
    return case


def load(data: Path | None = None) -> list[Case]:
    doc = yaml.safe_load(((data or DEFAULT_DATA) / "cases.yaml").read_text())
    return [parse_case(c) for c in doc["cases"]]


# -- manifests ---------------------------------------------------------------------------------

def all_annotations(ing: dict[str, Any]) -> dict[str, str]:
    """Its annotations as written on the object (a key without "/" is ingress-nginx's)."""
    out = {(k if "/" in k else NGINX + k): str(v)
           for k, v in (ing.get("annotations") or {}).items()}
    out.update({str(k): str(v) for k, v in (ing.get("raw_annotations") or {}).items()})
    return out


def _backend(name: str) -> dict[str, Any]:
    return {"service": {"name": name, "port": {"number": 80}}}


def tls_secret_name(ing: dict[str, Any]) -> str:
    """The Secret of an Ingress's certificate: named after its host, as upstream's
    framework does, or after the Ingress without one."""
    return str(ing.get("host") or ing["name"])


def ingress(ing: dict[str, Any], namespace: str, created: str,
            class_name: str = "mesh") -> dict[str, Any]:
    """The Ingress as upstream's e2e framework builds it (NewSingleIngress: one rule, paths
    of type Prefix; NewSingleCatchAllIngress: a default backend only)."""
    spec: dict[str, Any] = {"ingressClassName": class_name}
    paths = ing.get("paths")
    if paths is None and "path" in ing:
        paths = [{"path": ing["path"], "backend": ing["backend"]}]
    if paths is not None:
        rule: dict[str, Any] = {"http": {"paths": [
            {"path": p["path"], "pathType": "Prefix", "backend": _backend(p["backend"])}
            for p in paths]}}
        if ing.get("host"):
            rule["host"] = ing["host"]
        spec["rules"] = [rule]
    if ing.get("default_backend"):
        spec["defaultBackend"] = _backend(ing["default_backend"])
    if ing.get("tls"):
        spec["tls"] = [{"hosts": list(ing["tls"]), "secretName": tls_secret_name(ing)}]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": ing["name"], "namespace": namespace,
                         "annotations": all_annotations(ing), "creationTimestamp": created},
            "spec": spec}
