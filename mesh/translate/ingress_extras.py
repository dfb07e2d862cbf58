"""ingress-nginx annotations beyond the first table's, parsed into typed settings: request
body size (proxy-body-size), consistent hashing (upstream-hash-by), mirroring to a Service
(mirror-target), a Service for paths whose Service has no endpoints (default-backend). The
auth family is `ingress_auth`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from mesh import ir
from mesh.translate.annotation_values import Refused, service_url

NAMES = frozenset({"proxy-body-size", "upstream-hash-by", "mirror-target", "mirror-host",
                   "mirror-request-body", "default-backend"})
MAX_URL = 2048
# A body is held whole in the node's proxy while it is checked: no more than this.
MAX_BODY = 64 * 1024 * 1024
_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
# upstream-hash-by: one nginx variable we can hash by, alone ("$x" or "${x}").
_REQUEST_URI = re.compile(r"\$(request_uri|\{request_uri\})$")
_HOST = re.compile(r"^[A-Za-z0-9.-]{1,253}(:\d{1,5})?$")
_HASH_VAR = re.compile(r"^\$(?:\{([A-Za-z0-9_]{1,128})\}|([A-Za-z0-9_]{1,128}))$")


@dataclass(frozen=True)
class Extras:
    """What this module's annotations ask of an Ingress's routes and backends."""

    hash_policy: ir.HashPolicy | None = None  # upstream-hash-by (the backend copy hashes)
    mirror: Mirror | None = None  # mirror-target
    default_backend: str | None = None  # a Service of the Ingress's namespace


@dataclass(frozen=True)
class Mirror:
    """Every request is copied to a Service port (answers ignored), with this Host."""

    namespace: str
    service: str
    port: int
    host: str


NOTHING = Extras()


def parse(r: Any, namespace: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    size = r.get("proxy-body-size", _size)
    if size is not None and size > MAX_BODY:
        r.warnings.append(f'{r.key("proxy-body-size")}: "{r.text("proxy-body-size")}" is not '
                          f"enforced: limits above {MAX_BODY // 1024 ** 2}m are not (the body "
                          "would be held in memory); bodies of any size pass")
    elif size:  # 0: no limit, as nginx's client_max_body_size 0
        out["max_request_bytes"] = size
    # A value we cannot hash by is refused: the requests are then balanced as without the
    # annotation (fail safe: hashing is about where a request goes, not whether it may).
    out["extras"] = Extras(hash_policy=r.get("upstream-hash-by", _hash_by),
                           mirror=_mirror(r, namespace),
                           default_backend=r.get("default-backend", _service_name))
    return out


def _mirror(r: Any, namespace: str) -> Mirror | None:
    if not r.has("mirror-target"):
        r.ignore({"mirror-host", "mirror-request-body"} & r.values.keys(),
                 f"it needs {r.key('mirror-target')}")
        return None
    target = r.get("mirror-target", lambda t: _mirror_target(t, namespace))
    host = r.get("mirror-host", lambda t: t if _HOST.match(t) else _fail("not a host name"))
    body = r.get("mirror-request-body", lambda t: t if t in ("on", "off") else _fail(
        '"on" or "off"'), "on")
    if target is None:  # refused: nothing is mirrored (mirroring protects nothing)
        return None
    if body == "off":
        r.warnings.append(f'{r.key("mirror-request-body")}: "off" is not supported: the '
                          "copies carry the request's body")
    ns, name, port, url_host = target
    return Mirror(ns, name, port, host or url_host)


def _mirror_target(text: str, namespace: str) -> tuple[str, str, int, str]:
    """`http://name.namespace.svc...[:port]$request_uri` (the request's path and query)."""
    if len(text) > MAX_URL:
        raise _no(f"longer than {MAX_URL} characters")
    m = _REQUEST_URI.search(text)
    base = text[:m.start()] if m else text
    svc = service_url(base, namespace, "targets", "; nothing is mirrored")
    u = svc.url
    if m is None or u.path or u.query or u.fragment or u.username or "$" in base:
        raise _no("the target must end in $request_uri, after the host and port (the copy "
                  "keeps the request's path and query); nothing is mirrored")
    return svc.namespace, svc.name, svc.port, svc.host


def _service_name(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", text):
        raise _no("not a Service name (a Service of the Ingress's namespace)")
    return text


def _fail(why: str) -> Any:
    raise _no(why)


def _hash_by(text: str) -> ir.HashPolicy:
    m = _HASH_VAR.match(text)
    var = (m.group(1) or m.group(2)) if m else ""
    low = var.lower()
    if low == "request_uri":
        return ir.HashPolicy("Path")
    if low == "remote_addr":
        return ir.HashPolicy("SourceIP")
    if low.startswith("http_") and len(low) > 5:
        return ir.HashPolicy("Header", low[5:].replace("_", "-"))
    if low.startswith("cookie_") and len(low) > 7:
        return ir.HashPolicy("Cookie", var[7:])
    raise _no("only one of $request_uri, $remote_addr, $http_<name>, $cookie_<name>, alone "
              "(no other variable, no text, no combination); requests are balanced without "
              "hashing")


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d{1,12})([kKmMgG]?)", text)
    if m is None:
        raise _no("not a size (a number, with k, m or g)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def apply(max_request_bytes: int | None, extras: Extras, route: ir.Route,
          resolve: Callable[[str, str, int], str | None], warnings: list[str]) -> ir.Route:
    """The route with the settings; `resolve(namespace, service, port)` is the IR backend of
    a Service port (None: it cannot be used)."""
    a = route.action
    if not isinstance(a, ir.Forward):
        return route
    m = extras.mirror
    if m is not None:
        backend = resolve(m.namespace, m.service, m.port)
        if backend is None:
            msg = (f"mirror-target: Service {m.namespace}/{m.service} port {m.port} cannot be "
                   "used (missing, or in another namespace without a ReferenceGrant): nothing "
                   "is mirrored")
            if msg not in warnings:
                warnings.append(msg)
        else:
            route = replace(route, action=replace(a, mirrors=(
                *a.mirrors, ir.Mirror(backend, host=m.host))))
    if max_request_bytes is not None:
        route = replace(route, max_request_bytes=max_request_bytes)
    if extras.hash_policy is not None:
        route = replace(route, hash_policy=extras.hash_policy)
    return route


def _no(why: str) -> ValueError:
    """A refused value, as the annotation reader reports it."""
    return Refused(why)

