"""ingress-nginx's external authentication annotations (auth-url and its family), parsed
into typed settings and applied to an Ingress's IR routes as `ir.ExtAuth`.

The auth service must be a Service of the cluster, named by its DNS name in auth-url
(`http://name.namespace.svc.cluster.local[:port]/path?query`), in the Ingress's namespace or
one whose ReferenceGrant lets Ingresses in. Whatever we cannot do as nginx would fails
closed: the paths answer 500 and the Ingress gets a warning, never an open door. Settings
that only tune the check (cache, keep-alive) are ignored with a warning.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from mesh import ir
from mesh.translate.annotation_values import Refused, service_url

# What is read here. The rest of the family is not supported (the annotation table says
# why, and the Ingress gets the warning): auth-type and auth-snippet still close the paths.
NAMES = frozenset({"auth-url", "auth-response-headers", "auth-request-redirect",
                   "auth-signin", "auth-signin-redirect-param"})
MAX_URL = 2048
MAX_HEADERS = 32
_HEADER = re.compile(r"^[A-Za-z0-9!#$&'*+.^_`|~-]{1,128}$")  # no % (Envoy's formatter)
# auth-signin: an http(s) URL or a path, with nginx variables of the request (the sign-in
# redirect fills them in); no quote, space, backslash, angle bracket or brace.
_URL_REST = r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%?#|]*"
_SIGNIN = re.compile(rf"^(https?://[A-Za-z0-9.\-\[\]:$_]+([/?#]{_URL_REST})?|/{_URL_REST})$")
SIGNIN_VARIABLES = frozenset({"scheme", "pass_access_scheme", "host", "http_host",
                              "best_http_host", "request_uri", "escaped_request_uri"})
_VARIABLE = re.compile(r"\$([A-Za-z0-9_]*)")
_PARAM = re.compile(r"^[A-Za-z0-9._~-]{1,64}$")
_PATH = re.compile(r"^/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*(\?[A-Za-z0-9\-._~!$&'()*+,;=:@/%?]*)?$")


@dataclass(frozen=True)
class Auth:
    """auth-url as the IR needs it; `closed`: why every request is refused instead."""

    namespace: str = ""
    service: str = ""
    port: int = 80
    path: str = "/"
    upstream_headers: tuple[str, ...] = ()
    redirect: str | None = None
    closed: str | None = None
    signin: str | None = None
    signin_param: str = "rd"


def parse(r: Any, namespace: str) -> dict[str, Any]:
    """{"auth": Auth} when the Ingress asks for authentication (auth-url or auth-type)."""
    if r.has("auth-type") or r.has("auth-secret"):
        # Basic and digest authentication against a Secret: not done here (a warning says
        # so). Closed rather than open: the paths answer 500 until it is removed.
        return {"auth": Auth(closed="auth-type")}
    if not r.has("auth-url"):
        r.ignore(sorted((NAMES - {"auth-url"}) & r.values.keys()),
                 f"it needs {r.key('auth-url')}")
        return {}
    try:
        ns, name, port, path = _url(r.text("auth-url") or "", namespace)
    except ValueError as e:
        r.refuse("auth-url", f"{e}; the paths answer 500 (closed) until it is fixed")
        return {"auth": Auth(closed="auth-url")}
    if r.has("auth-snippet"):  # not supported (a warning says so): closed
        return {"auth": Auth(closed="auth-snippet")}
    headers = r.get("auth-response-headers", _headers, ())
    redirect = r.get("auth-request-redirect", _redirect)
    signin = r.get("auth-signin", _signin)
    param = r.get("auth-signin-redirect-param", _param, "rd")
    if signin is None:
        r.ignore({"auth-signin-redirect-param"} & r.values.keys(),
                 f"it needs {r.key('auth-signin')}")
    return {"auth": Auth(ns, name, port, path, headers, redirect, signin=signin,
                         signin_param=param)}


def _url(text: str, namespace: str) -> tuple[str, str, int, str]:
    if len(text) > MAX_URL:
        raise _no(f"longer than {MAX_URL} characters")
    if "$" in text:
        raise _no("nginx variables are not supported")
    svc = service_url(text, namespace, "auth services")
    u = svc.url
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    if not _PATH.match(path) or u.fragment or u.username or u.password:
        raise _no("not a plain path and query")
    return svc.namespace, svc.name, svc.port, path


def _headers(text: str) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
    bad = [h for h in out if not _HEADER.match(h) or h.startswith(":") or h == "host"]
    if bad:
        raise _no(f"{', '.join(bad)}: not a header name")
    if len(out) > MAX_HEADERS:
        raise _no(f"more than {MAX_HEADERS} headers")
    return out


def _redirect(text: str) -> str:
    if len(text) > MAX_URL or any(c in text for c in "\r\n\0") or not text.isprintable():
        raise _no("not a header value")
    return text.replace("%", "%%")  # literal for Envoy's formatter


def _signin(text: str) -> str:
    text = text.replace(" ", "")  # as ingress-nginx's validation
    if len(text) > MAX_URL or not _SIGNIN.match(text):
        raise _no("not an http(s) URL or a path; 401 answers go to the client as they are")
    unknown = sorted({v for v in _VARIABLE.findall(text) if v not in SIGNIN_VARIABLES})
    if unknown:
        raise _no(f"{', '.join('$' + v for v in unknown)}: only the variables "
                  f"{', '.join('$' + v for v in sorted(SIGNIN_VARIABLES))} are known; 401 "
                  "answers go to the client as they are")
    return text


def _param(text: str) -> str:
    if not _PARAM.match(text):
        raise _no("not a query parameter name (letters, digits, ._~-); rd is used")
    return text


def apply(auth: Auth | None, route: ir.Route,
          resolve: Callable[[str, str, int], str | None], warnings: list[str]) -> ir.Route:
    """The route with its authentication: `resolve(namespace, service, port)` is the IR
    backend of the auth service (None: it cannot be used)."""
    if auth is None or not isinstance(route.action, ir.Forward):
        return route
    if auth.closed is not None:
        return replace(route, action=ir.DirectResponse(500, ""))
    backend = resolve(auth.namespace, auth.service, auth.port)
    if backend is None:
        msg = (f"auth-url: Service {auth.namespace}/{auth.service} port {auth.port} cannot be "
               "used (missing, or in another namespace without a ReferenceGrant): the paths "
               "answer 500 (closed)")
        if msg not in warnings:
            warnings.append(msg)
        return replace(route, action=ir.DirectResponse(500, ""))
    return replace(route, ext_auth=ir.ExtAuth(
        backend=backend, path=auth.path, upstream_headers=auth.upstream_headers,
        redirect=auth.redirect, signin=auth.signin, signin_param=auth.signin_param))


def _no(why: str) -> ValueError:
    """A refused value, as the annotation reader reports it."""
    return Refused(why)
