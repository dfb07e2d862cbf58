"""External authorization over HTTP (`envoy.filters.http.ext_authz`): ingress-nginx's
auth-url. The listener's instance is disabled; a route that asks for a check enables it and
names its service (`check_settings.http_service`), so a new auth service changes only the
route table.

Envoy asks the service at `path_prefix` followed by the request's path: the prefix is the
service's own path and query, ending in a query parameter (`EXT_AUTH_PATH_PARAM`) that takes
the request's path, so the service is asked at its path as with nginx. Envoy cannot change
the check's method or Host (pseudo-headers: an attempt aborts Envoy at the first request):
the check keeps the request's method and Host. A service that cannot be reached, or answers
5xx, gives 500 (as nginx); only 200 lets a request through.

`STRIP` (`envoy.filters.http.header_mutation`, just before) removes the client's own copies
of the headers the service's answer sets on the request, as nginx replaces them (with
nothing, when the service does not send them): a client cannot pass them off as the
service's.
"""

from __future__ import annotations

from envoy.config.core.v3 import http_uri_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import http_status_pb2

from mesh import ir
from mesh.sinks.envoy import resources as r

EXT_AUTH_PATH_PARAM = "mesh-original-path"
# What ingress-nginx adds to its auth subrequest, in Envoy's formatter.
_CHECK_HEADERS = (
    ("x-original-url", "%REQ(:SCHEME)%://%REQ(:AUTHORITY)%%REQ(:PATH)%"),
    ("x-original-method", "%REQ(:METHOD)%"),
    ("x-sent-from", "nginx-ingress-controller"),
    ("x-real-ip", "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
)


def _check_path(a: ir.ExtAuth) -> str:
    return a.path + ("&" if "?" in a.path else "?") + EXT_AUTH_PATH_PARAM + "="


class _ExtAuthz:
    name = "envoy.filters.http.ext_authz"

    def listener_filter(self) -> hcm_pb2.HttpFilter:
        f = hcm_pb2.HttpFilter(name=self.name, disabled=True)
        f.typed_config.Pack(ext_authz_pb2.ExtAuthz(
            # Never called: every route that enables the filter names its own service.
            http_service=ext_authz_pb2.HttpService(server_uri=http_uri_pb2.HttpUri(
                uri="http://mesh-ext-authz-none", cluster="mesh-ext-authz-none",
                timeout=r.duration(1.0))),
            # The client's headers go to the service, as nginx's auth subrequest has them.
            allowed_headers=string_pb2.ListStringMatcher(patterns=[string_pb2.StringMatcher(
                safe_regex=regex_pb2.RegexMatcher(regex=".*"))]),
            status_on_error=http_status_pb2.HttpStatus(code=http_status_pb2.InternalServerError),
        ))
        return f

    def route_config(self, route: ir.Route) -> rc.FilterConfig | None:
        a = route.ext_auth
        if a is None or a.backend is None:
            return None
        service = ext_authz_pb2.HttpService(
            server_uri=http_uri_pb2.HttpUri(uri="http://" + a.backend.replace("/", "."),
                                            cluster=a.backend, timeout=r.duration(a.timeout)),
            path_prefix=_check_path(a))
        add = service.authorization_request.headers_to_add
        for key, value in _CHECK_HEADERS:
            add.add(key=key, value=value)
        add.add(key="x-auth-request-redirect", value=a.redirect or "%REQ(:PATH)%")
        for h in a.upstream_headers:
            service.authorization_response.allowed_upstream_headers.patterns.add(
                exact=h, ignore_case=True)
        per_route = ext_authz_pb2.ExtAuthzPerRoute(
            check_settings=ext_authz_pb2.CheckSettings(http_service=service))
        out = rc.FilterConfig()
        out.config.Pack(per_route)
        return out


class _Strip:
    name = "envoy.filters.http.header_mutation/ext-authz"

    def listener_filter(self) -> hcm_pb2.HttpFilter:
        f = hcm_pb2.HttpFilter(name=self.name, disabled=True)
        f.typed_config.Pack(header_mutation_pb2.HeaderMutation())
        return f

    def route_config(self, route: ir.Route) -> rc.FilterConfig | None:
        a = route.ext_auth
        if a is None or not a.upstream_headers:
            return None
        cfg = header_mutation_pb2.HeaderMutationPerRoute()
        for h in a.upstream_headers:
            cfg.mutations.request_mutations.add(remove=h)
        out = rc.FilterConfig()
        out.config.Pack(cfg)
        return out


EXT_AUTHZ = _ExtAuthz()
STRIP = _Strip()
